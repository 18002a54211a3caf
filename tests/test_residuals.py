"""Residual analysis: exact counts on real exports, and the adds it must not report."""

import pytest

from rescompile.analysis.residuals import find_residuals
from rescompile.frontends.onnx import load_onnx
from rescompile.ir import OpKind
from tools.models import HF_CASES, SYNTHETIC_CASES, build

CASES = [
    (name, exporter)
    for name, make in {**HF_CASES, **SYNTHETIC_CASES}.items()
    for exporter in ("dynamo", "legacy")
    if name not in ("gpt2", "llama") or exporter == "dynamo"
]  # legacy fails on aten::diff


@pytest.mark.parametrize("name,exporter", CASES)
def test_exact_residual_counts(onnx_model, name, exporter):
    case = build(name)
    analysis = find_residuals(load_onnx(onnx_model(name, exporter)))
    kinds = [s.kind for s in analysis.sites]
    assert len(analysis.sites) == case.sites
    assert kinds.count("projection") == case.projection
    assert len(analysis.streams) == case.streams
    if case.norm:
        assert {s.norm for s in analysis.sites} <= {case.norm}
    if case.stream_lengths:
        assert tuple(len(s.sites) for s in analysis.streams) == case.stream_lengths
    # Depth indices run 0..n-1 along each stream, in topological order.
    for stream in analysis.streams:
        assert [s.depth for s in stream.sites] == list(range(len(stream.sites)))
        assert all(s.stream == stream.index for s in stream.sites)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit"])
def test_transformer_sites_alternate_attention_and_mlp(onnx_model, name):
    analysis = find_residuals(load_onnx(onnx_model(name)))
    (stream,) = analysis.streams
    # A linked stream: each site's skip is the previous site's output (pre-norm) or
    # its normalised output (post-norm).
    for prev, site in zip(stream.sites, stream.sites[1:]):
        if site.norm == "pre":
            assert site.skip is prev.output
        else:
            assert site.skip.producer.kind is OpKind.NORM
            assert site.skip.producer.inputs[0] is prev.output
    # Every branch contains weighted ops and parameters.
    assert all(s.weighted and s.branch_params > 0 for s in analysis.sites)


def test_gpt2_rejected_adds_are_the_expected_ones(onnx_model):
    """Token+position, GELU-tanh and bias adds exist in the graph, with equal operand
    shapes in some cases, and none of them is reported."""
    graph = load_onnx(onnx_model("gpt2"))
    reported = {s.add for s in find_residuals(graph).sites}
    adds = [n for n in graph if n.kind is OpKind.ADD]
    assert len(adds) > len(reported) + 4
    same_shape_rejected = [
        n for n in adds if n not in reported and n.inputs[0].shape == n.inputs[1].shape == n.outputs[0].shape
    ]
    assert same_shape_rejected, "the test must include adds that shape checks cannot reject"


def test_attention_mask_add_is_not_a_residual(onnx_model):
    """The mask is an ancestor of layer 1's scores through layer 0's weighted ops and has
    the same shape as the scores; only structure can reject `scores + mask`."""
    graph = load_onnx(onnx_model("masked_attention"))
    analysis = find_residuals(graph)
    reported = {s.add for s in analysis.sites}
    mask_adds = [
        n
        for n in graph
        if n.kind is OpKind.ADD
        and n not in reported
        and len(n.outputs[0].shape or ()) == 4
        and n.inputs[0].shape == n.inputs[1].shape
    ]
    assert len(mask_adds) == 2
    assert len(analysis.sites) == 2 and all(s.skip.shape == (2, 6, 16) for s in analysis.sites)


def test_projection_shortcut_is_the_cheap_side(onnx_model):
    analysis = find_residuals(load_onnx(onnx_model("residual_cnn")))
    (proj,) = [s for s in analysis.sites if s.kind == "projection"]
    # The fork feeds both sides; the skip holds the 1x1 conv (16*8 weights + BN),
    # the branch holds two 3x3 convs.
    assert proj.branch_params == 16 * 8 * 9 + 16 * 16 * 9
    assert (proj.stream, proj.depth) == (1, 0)  # the strided projection starts a stream
    assert proj.fork.producer.op_type == "Relu"
    assert proj.fork is analysis.streams[0].sites[-1].output.consumers()[0].outputs[0]


def test_resnet50_projection_sites_start_each_stage(onnx_model):
    analysis = find_residuals(load_onnx(onnx_model("resnet50")))
    projections = [(s.stream, s.depth) for s in analysis.sites if s.kind == "projection"]
    assert projections == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert [len(s.sites) for s in analysis.streams] == [3, 4, 6, 3]  # stages of 3, 4, 6, 3 bottlenecks


def test_class_attention_reads_the_stream_concatenated_with_the_class_token(onnx_model):
    """cat(x_cls, x) joins the class token with the patch tokens without combining elements: the
    class-attention branch is computed from the skip x_cls. The patch tokens do not continue into the
    class token's stream (it holds other tokens too)."""
    patches, cls = find_residuals(load_onnx(onnx_model("class_attention"))).streams
    assert {s.skip.shape for s in patches.sites} == {(2, 5, 16)}
    assert {s.skip.shape for s in cls.sites} == {(2, 1, 16)}
    assert cls.sites[0].kind == "identity" and cls.sites[0].norm == "pre"
    assert any(n.op_type == "Concat" for n in cls.sites[0].nodes)


def test_class_token_can_be_a_skip(onnx_model):
    (site,) = find_residuals(load_onnx(onnx_model("class_token"))).sites
    assert site.kind == "identity" and site.norm == "pre"


def test_json_has_the_documented_fields(onnx_model):
    data = find_residuals(load_onnx(onnx_model("gpt2"))).to_json()
    assert {"residuals", "streams"} <= set(data)
    for row in data["residuals"]:
        assert {"add", "skip", "branch", "kind", "stream", "depth"} <= set(row)
    assert data["streams"][0]["sites"] == [r["add"] for r in data["residuals"]]


@pytest.mark.parametrize("name", ["gpt2", "class_attention"])
@pytest.mark.parametrize("specs", [["laurel:variant=rw"], ["decay"], ["rezero", "layerscale", "gate"]])
def test_sites_stay_visible_after_rewrites(onnx_model, name, specs):
    """A scaled skip (beta * x, alpha_l * x) or a gated branch is still the same residual site,
    at the same depth, so later passes (fold, a second rewrite) find it; also where the stream is
    a constant (the class token, a parameter)."""
    from rescompile.api import build_passes, run_passes

    graph = load_onnx(onnx_model(name))
    before = find_residuals(graph)
    run_passes(graph, build_passes(specs))
    after = find_residuals(graph)
    assert [(s.stream, s.depth, s.kind, s.branch_params) for s in after.sites] == [
        (s.stream, s.depth, s.kind, s.branch_params) for s in before.sites
    ]
    assert len(after.streams) == len(before.streams)


def test_stacked_factors_fold_and_keep_the_function(onnx_model, tmp_path):
    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.onnx import save_onnx
    from rescompile.validation import compare_onnx

    src = onnx_model("gpt2")
    graph = load_onnx(src)
    before = len(graph)
    result = run_passes(graph, build_passes(["rezero", "laurel:variant=rw", "layerscale", "fold"]))
    assert result.stats["3:fold"] == {"folded": 12}  # alpha, laurel's alpha, gamma at 4 sites
    assert len(graph) == before + 4  # laurel's skip weights stay (not on a branch)
    save_onnx(graph, tmp_path / "o.onnx")
    assert compare_onnx(str(src), str(tmp_path / "o.onnx"), atol=1e-5).ok


def _chain_model(middle: str, first: str = "Relu"):
    """x -> [x + W1 first(x)] -> middle -> [h + W2 relu(h)], as ONNX; `middle` and `first` are an op
    type in the standard domain or "Foo", an op of a custom domain (no op-table entry)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def node(op, inputs, output):
        domain = "custom.test" if op == "Foo" else ""
        return helper.make_node(op, inputs, [output], domain=domain)

    weights = [numpy_helper.from_array(np.full((4, 4), 0.1, np.float32), f"w{i}") for i in (1, 2)]
    nodes = [
        node(first, ["x"], "a"),
        node("MatMul", ["a", "w1"], "b"),
        node("Add", ["x", "b"], "y"),
        node(middle, ["y"], "h"),
        node("Relu", ["h"], "c"),
        node("MatMul", ["c", "w2"], "d"),
        node("Add", ["h", "d"], "out"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        weights,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("custom.test", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets)


def test_ops_without_a_table_entry_are_barriers():
    """An op analysis knows nothing about may hide weights or mix in other data: a stream does not
    continue through it, a branch is not followed through it, and the analysis names it."""
    streams = find_residuals(load_onnx(_chain_model("Relu"))).streams
    assert [len(s.sites) for s in streams] == [2]
    analysis = find_residuals(load_onnx(_chain_model("Foo")))
    assert [len(s.sites) for s in analysis.streams] == [1, 1]
    assert [n.op_type for n in analysis.opaque] == ["Foo"]
    assert analysis.to_json()["opaque"] == [f"{analysis.opaque[0].name} (Foo)"]
    # Before the branch's weighted op, it hides the site.
    analysis = find_residuals(load_onnx(_chain_model("Relu", first="Foo")))
    assert [s.output.name for s in analysis.sites] == ["out"]
    assert [n.op_type for n in analysis.opaque] == ["Foo"]


@pytest.mark.parametrize("branch_shape,found", [(["n", 4], 1), (["m", 4], 1), ([1, 4], 0), ([3, 4], 0)])
def test_symbolic_dims_in_different_forms_are_one_size(branch_shape, found):
    """x [n, 4] + W relu(x) declared [m, 4]: two symbols on one axis name one size (torch writes
    `h*w//16` and `(h//4)*(w//4)` for the same axis); a fixed size against a symbol may broadcast."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Add", ["x", "b"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.full((4, 4), 0.1, np.float32), "w")],
        value_info=[helper.make_tensor_value_info("b", TensorProto.FLOAT, branch_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert len(find_residuals(load_onnx(model)).sites) == found


def test_inspect_says_which_opaque_ops_stopped_it(tmp_path, capsys):
    from rescompile.cli import main

    path = tmp_path / "foo.onnx"
    path.write_bytes(_chain_model("Foo").SerializeToString())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 ops without an entry in the op table stopped the search" in out and "(Foo)" in out
