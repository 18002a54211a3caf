"""ONNX import/export: lossless, bit-identical in ONNX Runtime, atomic, clear errors."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rescompile.errors import RescompileError
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.validation import random_onnx_inputs, run_onnx

MODELS = [
    ("gpt2", "dynamo"),
    ("llama", "dynamo"),
    ("bert", "legacy"),
    ("vit", "dynamo"),
    ("resnet50", "dynamo"),
    ("resnet50", "legacy"),
]


@pytest.mark.parametrize("name,exporter", MODELS)
def test_round_trip_is_bit_identical_and_checks(onnx_model, tmp_path, name, exporter):
    src = onnx_model(name, exporter)
    out = tmp_path / "rt.onnx"
    save_onnx(load_onnx(src), out)
    onnx.checker.check_model(str(out), full_check=True)
    for seed in (0, 1):
        feeds, _ = random_onnx_inputs(str(src), seed=seed)
        a, b = run_onnx(str(src), feeds), run_onnx(str(out), feeds)
        assert list(a) == list(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), k


def test_export_preserves_model_properties(onnx_model, tmp_path):
    src = onnx_model("gpt2")
    model = ir.load(src)
    model.metadata_props["origin"] = "test"
    model.doc_string = "doc"
    out = tmp_path / "rt.onnx"
    save_onnx(load_onnx(model), out)
    back = ir.load(out)
    assert back.opset_imports == model.opset_imports
    assert back.ir_version == model.ir_version and back.producer_name == model.producer_name
    assert back.metadata_props["origin"] == "test" and back.doc_string == "doc"
    assert [v.name for v in back.graph.inputs] == [v.name for v in model.graph.inputs]
    assert [v.name for v in back.graph.outputs] == [v.name for v in model.graph.outputs]
    assert set(back.graph.initializers) == set(model.graph.initializers)
    assert [n.op_type for n in back.graph] == [n.op_type for n in model.graph]


def test_external_data_is_kept_external_and_input_untouched(onnx_model, tmp_path):
    src = onnx_model("gpt2")  # dynamo writes weights to a .data file
    before = {f.name: f.read_bytes() for f in src.parent.glob(src.name + "*")}
    assert len(before) == 2
    written = save_onnx(load_onnx(src), tmp_path / "out.onnx")
    assert sorted(p.name for p in written) == ["out.onnx", "out.onnx.data"]
    assert {f.name: f.read_bytes() for f in src.parent.glob(src.name + "*")} == before


def test_output_is_deterministic(onnx_model, tmp_path):
    src = onnx_model("bert", "legacy")
    save_onnx(load_onnx(src), tmp_path / "a.onnx")
    save_onnx(load_onnx(src), tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_model_proto_input(onnx_model):
    proto = onnx.load(str(onnx_model("resnet50", "legacy")))
    graph = load_onnx(proto)
    assert len(graph) == len(proto.graph.node)


def test_failed_check_leaves_no_output(onnx_model, tmp_path):
    def refuse(path):
        assert path.exists()
        raise RescompileError("no")

    with pytest.raises(RescompileError):
        save_onnx(load_onnx(onnx_model("gpt2")), tmp_path / "out.onnx", check=refuse)
    assert list(tmp_path.iterdir()) == []


def test_shapes_and_roles_are_imported(onnx_model):
    graph = load_onnx(onnx_model("gpt2"))
    assert graph.inputs[0].shape == (2, 8) and graph.inputs[0].dtype == "int64"
    assert all(v.role in ("param", "const") for v in graph.initializers.values())
    assert any(v.role == "param" and v.shape == (101, 32) for v in graph.initializers.values())
    known = [o for n in graph for o in n.outputs if o.shape is not None]
    assert len(known) > 0.9 * sum(len(n.outputs) for n in graph)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        (b"", "file is empty"),
        (b"this is not onnx at all \x00\xff" * 10, "not a readable ONNX model"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RescompileError, match=message) as info:
        load_onnx(path)
    assert "\n" not in str(info.value)


def test_truncated_file(onnx_model, tmp_path):
    data = onnx_model("bert", "legacy").read_bytes()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(RescompileError, match="truncated|not a readable"):
        load_onnx(path)


def test_unsupported_opset(onnx_model, tmp_path):
    model = onnx.load(str(onnx_model("plain_mlp", "legacy")))
    model.opset_import[0].version = 9
    with pytest.raises(RescompileError, match="unsupported opset 9"):
        load_onnx(model)


def _handmade_model(with_shapes: bool):
    """x -> f(x) (a local function) -> + x, without value_info unless asked."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel() * 0.5)
    func = helper.make_function(
        "local",
        "Branch",
        ["a", "b"],
        ["c"],
        [helper.make_node("MatMul", ["a", "b"], ["m"]), helper.make_node("Relu", ["m"], ["c"])],
        [helper.make_opsetid("", 18)],
    )
    nodes = [
        helper.make_node("Branch", ["x", "w"], ["f"], domain="local", name="branch"),
        helper.make_node("MatMul", ["f", "w"], ["g"], name="mm"),
        helper.make_node("Add", ["x", "g"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    if with_shapes:
        graph.value_info.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "fg"])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)], functions=[func]
    )


def test_local_functions_survive_and_missing_shapes_are_inferred(tmp_path):
    model = _handmade_model(with_shapes=False)
    graph = load_onnx(model)
    mm = next(n for n in graph if n.name == "mm")
    assert mm.outputs[0].shape == (2, 4)  # inferred, the file had none
    out = tmp_path / "f.onnx"
    save_onnx(graph, out)
    back = onnx.load(str(out))
    assert [f.name for f in back.functions] == ["Branch"] and back.functions[0].domain == "local"
    onnx.checker.check_model(back, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    a = run_onnx(model.SerializeToString(), {"x": x})["y"]
    b = run_onnx(str(out), {"x": x})["y"]
    assert np.array_equal(a, b)


def test_an_added_mask_initializer_is_a_constant_not_a_parameter(tmp_path):
    """A float initializer holding 'minus infinity' and only added (a causal mask: torch's buffer)
    is no trainable parameter; a bias that is only added stays one. Counting the mask made the
    frontends disagree on block parameters (a fuzz finding)."""
    from onnx import TensorProto, helper, numpy_helper

    from rescompile.analysis.cost import count_params
    from rescompile.ir import CONST, PARAM

    t = 3
    mask = np.triu(np.full((t, t), -1e9, np.float32), 1)
    inits = [
        numpy_helper.from_array(mask, "causal"),
        numpy_helper.from_array(
            np.where(np.triu(np.ones((t, t)), 1) > 0, -np.inf, 0).astype(np.float32), "inf_mask"
        ),
        numpy_helper.from_array(np.linspace(-1, 1, t).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "x"], ["scores"]),
        helper.make_node("Add", ["scores", "causal"], ["masked"]),
        helper.make_node("Add", ["masked", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, t])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, t])],
        inits[:1] + inits[2:],
    )
    path = tmp_path / "mask.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    loaded = load_onnx(str(path))
    assert loaded.initializers["causal"].role == CONST
    assert loaded.initializers["bias"].role == PARAM
    assert count_params(loaded) == t
