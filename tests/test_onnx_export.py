"""Export writes the IR's edits back into the onnx-ir model it imported (a file
or ModelProto the frontend owns) and builds a fresh model for a caller's
onnx_ir.Model, which must stay untouched. Either way the output must run like
a fresh import of the same edits."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rescompile.api import build_passes, run_passes
from rescompile.frontends import _onnx_write
from rescompile.frontends._onnx_export import _build, export_model
from rescompile.frontends._onnx_write import write_model
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


def structure(model):
    """Everything a reader of the file sees, by name."""
    g = model.graph
    nodes = [
        (
            n.domain,
            n.op_type,
            n.name,
            [v.name if v is not None else "" for v in n.inputs],
            [v.name for v in n.outputs],
            sorted((k, repr(a.value)) for k, a in n.attributes.items()),
        )
        for n in g
    ]
    inits = {name: (v.const_value.numpy().tobytes(), v.shape, v.type) for name, v in g.initializers.items()}
    values = {v.name: (v.shape, v.type) for n in g for v in n.outputs}
    return (
        nodes,
        inits,
        values,
        [v.name for v in g.inputs],
        [v.name for v in g.outputs],
        dict(model.opset_imports),
    )


@pytest.mark.parametrize(
    "name,specs",
    [
        ("gpt2", ["hyper:n=4,dynamic=true"]),
        ("resnet50", ["layerscale:init=0.5", "fold"]),
        ("llama", ["decay:compensate=true", "laurel:variant=lr"]),
        ("vit", ["dense", "rezero"]),
    ],
)
def test_writing_edits_back_equals_building_a_fresh_model(onnx_model, name, specs):
    graph = load_onnx(onnx_model(name))
    run_passes(graph, build_passes(specs))
    fresh = _build(graph, graph.source)
    synced = export_model(graph)
    assert synced is graph.source.model
    assert structure(synced) == structure(fresh)


def test_changed_shapes_types_names_and_attributes_are_written_back(onnx_model):
    graph = load_onnx(onnx_model("gpt2"))
    node = next(n for n in graph if n.attrs and n.output.shape)
    out = node.output
    out.shape = ("renamed_dim",) + tuple(out.shape[1:])
    out.dtype = "float16"
    out.name = "renamed_value"
    node.name = "renamed_node"
    node.attrs = {**node.attrs, "rescompile_test": 3}
    fresh = _build(graph, graph.source)
    synced = export_model(graph)
    assert structure(synced) == structure(fresh)
    written = next(n for n in synced.graph if n.name == "renamed_node")
    assert written.outputs[0].name == "renamed_value" and written.attributes["rescompile_test"].value == 3
    assert str(written.outputs[0].shape[0]) == "renamed_dim"
    assert written.outputs[0].type.dtype == ir.DataType.FLOAT16


@pytest.mark.parametrize(
    "name,exporter,external", [("gpt2", "dynamo", "m.onnx.data"), ("bert", "legacy", None)]
)
def test_chunked_writer_writes_what_onnx_ir_save_writes(
    onnx_model, tmp_path, monkeypatch, name, exporter, external
):
    monkeypatch.setattr(_onnx_write, "_NODES_PER_CHUNK", 7)  # many chunks, one ending short
    model = ir.load(onnx_model(name, exporter))
    before = ir.serde.serialize_model(model)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    write_model(model, ours / "m.onnx", external_data=external)
    ir.save(model, theirs / "m.onnx", external_data=external)
    assert ir.serde.serialize_model(model) == before  # the model is left unchanged
    assert onnx.load(str(ours / "m.onnx"), load_external_data=False) == onnx.load(
        str(theirs / "m.onnx"), load_external_data=False
    )
    if external:
        assert (ours / external).read_bytes() == (theirs / external).read_bytes()
    onnx.checker.check_model(str(ours / "m.onnx"), full_check=True)


def test_chunked_writer_keeps_local_functions_and_metadata(tmp_path):
    from onnx import TensorProto, helper

    double = helper.make_function(
        "custom",
        "Double",
        ["x"],
        ["y"],
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_opsetid("", 18)],
    )
    graph = helper.make_graph(
        [helper.make_node("Double", ["a"], ["b"], domain="custom"), helper.make_node("Relu", ["b"], ["c"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(
        graph,
        functions=[double],
        doc_string="doc",
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom", 1)],
    )
    helper.set_model_props(proto, {"k": "v"})
    model = ir.serde.deserialize_model(proto)
    write_model(model, tmp_path / "ours.onnx")
    ir.save(model, tmp_path / "theirs.onnx")
    ours = onnx.load(str(tmp_path / "ours.onnx"))
    assert ours == onnx.load(str(tmp_path / "theirs.onnx"))
    assert [f.name for f in ours.functions] == ["Double"] and ours.metadata_props[0].value == "v"
    onnx.checker.check_model(ours, full_check=True)
    feeds = {"a": np.array([1.0, -2.0], np.float32)}
    np.testing.assert_array_equal(run_onnx(str(tmp_path / "ours.onnx"), feeds)["c"], [2.0, 0.0])
