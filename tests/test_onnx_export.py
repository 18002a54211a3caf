"""Export writes the IR's edits back into the onnx-ir model it imported (a file
or ModelProto the frontend owns) and builds a fresh model for a caller's
onnx_ir.Model, which must stay untouched. Either way the output must run like
a fresh import of the same edits."""

import numpy as np
import onnx
import onnx_ir as ir

from rescompile.api import build_passes, run_passes
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.ir import verify
from rescompile.validation import random_onnx_inputs, run_onnx


def assert_same_outputs(a, b, src):
    feeds, _ = random_onnx_inputs(str(src), seed=0)
    left, right = run_onnx(str(a), feeds), run_onnx(str(b), feeds)
    assert list(left) == list(right)
    for k in left:
        np.testing.assert_array_equal(left[k], right[k])


def rewrite(source, specs, out):
    graph = load_onnx(source)
    run_passes(graph, build_passes(specs))
    save_onnx(graph, out)
    return graph


def test_a_callers_onnx_ir_model_is_not_modified(onnx_model, tmp_path):
    src = onnx_model("gpt2")
    model = ir.load(src)
    before = ir.serde.serialize_model(model).SerializeToString()
    rewrite(model, ["layerscale:init=0.5"], tmp_path / "out.onnx")
    assert ir.serde.serialize_model(model).SerializeToString() == before
    rewrite(src, ["layerscale:init=0.5"], tmp_path / "owned.onnx")  # written back into an owned model
    assert_same_outputs(tmp_path / "out.onnx", tmp_path / "owned.onnx", src)


def test_exporting_again_after_more_edits_matches_one_pipeline(onnx_model, tmp_path):
    src = onnx_model("llama")
    graph = rewrite(src, ["rezero:init=0.5"], tmp_path / "a.onnx")
    run_passes(graph, build_passes(["layerscale:init=0.25", "fold"]))
    save_onnx(graph, tmp_path / "b.onnx")
    onnx.checker.check_model(str(tmp_path / "b.onnx"), full_check=True)
    rewrite(src, ["rezero:init=0.5", "layerscale:init=0.25", "fold"], tmp_path / "once.onnx")
    assert_same_outputs(tmp_path / "b.onnx", tmp_path / "once.onnx", src)
    assert len(ir.load(tmp_path / "b.onnx").graph) == len(ir.load(tmp_path / "once.onnx").graph)
    rewrite(src, ["rezero:init=0.5"], tmp_path / "first.onnx")
    assert_same_outputs(tmp_path / "a.onnx", tmp_path / "first.onnx", src)


def test_moved_nodes_are_written_in_their_new_order(onnx_model, tmp_path):
    src = onnx_model("gpt2")
    graph = load_onnx(src)
    order = {node: i for i, node in enumerate(graph)}
    moved = []
    for node in list(graph):  # move each node that can go earlier right after its last input
        producers = [v.producer for v in node.inputs if v is not None and v.producer is not None]
        anchor = max(producers, key=order.__getitem__, default=None)
        if (order[anchor] if anchor else -1) + 1 < order[node] and len(moved) < 5:
            graph.remove(node, safe=False)
            graph.insert_after(anchor, node)
            moved.append(node.name)
    assert len(moved) == 5
    verify(graph)
    save_onnx(graph, tmp_path / "moved.onnx")
    onnx.checker.check_model(str(tmp_path / "moved.onnx"), full_check=True)
    written = [n.name for n in ir.load(tmp_path / "moved.onnx").graph]
    assert written == [n.name for n in graph]
    assert written != [n.name for n in ir.load(src).graph]
    assert_same_outputs(tmp_path / "moved.onnx", src, src)
