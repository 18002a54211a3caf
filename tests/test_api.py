"""The public Python API: names, signatures and behaviour on ONNX models."""

import inspect as pyinspect

import onnx
import pytest

import rescompile
from rescompile.validation import assert_ok


def test_public_names_are_pinned():
    assert sorted(rescompile.__all__) == sorted(
        ["inspect", "apply", "validate", "InspectReport", "RescompileError", "__version__"]
    )
    assert list(pyinspect.signature(rescompile.inspect).parameters)[:2] == ["model", "example_inputs"]
    assert list(pyinspect.signature(rescompile.apply).parameters)[:3] == ["model", "passes", "example_inputs"]
    assert list(pyinspect.signature(rescompile.validate).parameters)[:3] == [
        "original",
        "rewritten",
        "inputs",
    ]


def test_inspect_apply_validate_on_onnx(onnx_model):
    path = onnx_model("vit")
    report = rescompile.inspect(path)
    assert len(report.residuals) == 4 and len(report.streams) == 1
    assert report.to_json()["residuals"][0]["kind"] == "identity"
    proto = rescompile.apply(str(path), ["rezero"])
    assert isinstance(proto, onnx.ModelProto)
    assert sum(n.op_type == "Mul" for n in proto.graph.node) >= 4
    result = rescompile.validate(str(path), proto)
    assert_ok(result)
    changed = rescompile.apply(onnx.load(str(path)), "rezero:init=0")
    assert not rescompile.validate(str(path), changed).ok


def test_api_errors_are_rescompile_errors(tmp_path):
    with pytest.raises(rescompile.RescompileError, match="no such file"):
        rescompile.inspect(tmp_path / "missing.onnx")
    with pytest.raises(rescompile.RescompileError, match="unknown pass"):
        rescompile.apply(tmp_path / "x.onnx", ["nope"])
