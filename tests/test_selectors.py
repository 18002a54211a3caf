"""Site and stream selectors that match nothing are errors naming the selector and what the
model has (one line; the CLI exits 2 without writing); a model with no residuals at all is a
no-op with a warning under the default selector."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rescompile.api import build_passes
from rescompile.cli import main
from rescompile.frontends.onnx import load_onnx
from rescompile.infra import PassError, PassManager
from rescompile.ir import Graph, Node, Value
from rescompile.passes import PASSES


def two_streams(blocks: int = 4) -> Graph:
    """Two independent residual MLP streams of `blocks` sites each, from two inputs."""
    graph = Graph()
    outputs = []
    for s in range(2):
        x = graph.add_input(Value(f"x{s}", dtype="float32", shape=(2, 4)))
        for i in range(blocks):
            w = graph.add_param(f"w{s}_{i}", np.eye(4, dtype=np.float32), dtype="float32")
            mm = graph.append(Node("MatMul", [x, w], name=f"mm{s}_{i}"))
            relu = graph.append(Node("Relu", [mm.output], name=f"relu{s}_{i}"))
            add = graph.append(Node("Add", [x, relu.output], name=f"add{s}_{i}"))
            for node in (mm, relu, add):
                node.output.dtype, node.output.shape = "float32", (2, 4)
            x = add.output
        outputs.append(x)
    graph.set_outputs(outputs)
    return graph


SITE_PASSES = sorted(n for n, c in PASSES.items() if "sites" in c.Options.__dataclass_fields__)
STREAM_PASSES = sorted(n for n, c in PASSES.items() if "streams" in c.Options.__dataclass_fields__)


def test_every_selecting_pass_is_listed():
    assert SITE_PASSES and STREAM_PASSES
    assert {"rezero", "layerscale", "laurel", "gate", "decay", "deepnorm", "depthscale", "fold"} <= set(
        SITE_PASSES
    )
    assert {"hyper", "frac", "dense"} <= set(STREAM_PASSES)


@pytest.mark.parametrize("name", SITE_PASSES)
@pytest.mark.parametrize(
    "spec,extra",
    [
        ("stream:7", ""),
        ("depth:4-", ""),
        ("stream:1;depth:9-", ""),
        ("kind:projection", ", kinds identity"),
        ("name:nothing*", ", named 'add0_0' ... 'add1_3'"),
    ],
)
def test_site_selector_matching_nothing_is_an_error(name, spec, extra):
    graph = two_streams()
    with pytest.raises(PassError) as info:
        PassManager([PASSES[name](sites=spec)])(graph)
    assert str(info.value) == (
        f"pass {name}: sites={spec} matches no site; the model has 8 sites in streams 0-1, depths 0-3{extra}"
    )


@pytest.mark.parametrize("name", STREAM_PASSES)
def test_stream_selector_matching_nothing_is_an_error(name):
    with pytest.raises(PassError) as info:
        PassManager([PASSES[name](streams="5|7")])(two_streams())
    assert str(info.value) == (
        f"pass {name}: streams=5|7 matches no stream; the model has 8 sites in streams 0-1, depths 0-3"
    )


def test_selector_matching_some_sites_applies_to_those():
    graph = two_streams()
    result = PassManager(build_passes(["rezero:sites=stream:1;depth:2-"]))(graph)
    assert result.stats["0:rezero"] == {"sites": 2}


def test_empty_depth_range_is_refused_before_any_model_is_read():
    with pytest.raises(
        PassError,
        match=r"^rezero: depth range '9-3' is empty \(it selects nothing on any "
        r"model\); use depth:A-B with A <= B$",
    ):
        build_passes(["rezero:sites=depth:9-3"])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_residuals_under_the_default_selector_is_a_no_op_with_a_warning(onnx_model):
    graph = load_onnx(onnx_model("plain_mlp", "legacy"))
    records = _Records()
    logging.getLogger("rescompile").addHandler(records)
    try:
        result = PassManager(build_passes(["rezero", "hyper"]))(graph)
    finally:
        logging.getLogger("rescompile").removeHandler(records)
    assert not result.modified
    assert records.messages == [
        "rezero: the model has no residual sites; nothing to rewrite",
        "hyper: the model has no residual sites; nothing to rewrite",
    ]
    with pytest.raises(
        PassError, match="^pass rezero: sites=depth:0-1 matches no site; the model has no residual sites$"
    ):
        PassManager(build_passes(["rezero:sites=depth:0-1"]))(graph)


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "rezero:sites=stream:7",
            "rezero: sites=stream:7 matches no site; the model has 4 sites in stream 0",
        ),
        ("layerscale:sites=stream:0;depth:4-", "layerscale: sites=stream:0;depth:4- matches no site"),
        (
            "hyper:streams=5",
            "hyper: streams=5 matches no stream; the model has 4 sites in stream 0, depths 0-3",
        ),
        ("rezero:sites=depth:9-3", "rezero: depth range '9-3' is empty"),
    ],
)
def test_cli_exits_2_with_one_line_and_writes_nothing(onnx_model, tmp_path, capsys, spec, message):
    out = tmp_path / "o.onnx"
    assert main(["apply", str(onnx_model("gpt2")), "-p", spec, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rescompile: error: "), err
    assert message in err
    assert not out.exists()


def test_cli_refuses_a_pass_on_a_model_without_residuals(onnx_model, tmp_path, capsys):
    # Issue 15: on the command line a pass that rewrites residual sites finding none is an
    # error (one line, exit 2, nothing written); the API keeps the no-op with a warning.
    out = tmp_path / "o.onnx"
    assert main(["apply", str(onnx_model("plain_mlp", "legacy")), "-p", "rezero", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "rescompile: error: rezero: the model has no residual sites; nothing to rewrite\n"
    assert not out.exists()
    assert main(["apply", str(onnx_model("plain_mlp", "legacy")), "-p", "identity", "-o", str(out)]) == 0
