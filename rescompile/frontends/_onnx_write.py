"""Write an onnx-ir model to a file without holding its whole ModelProto.

`onnx_ir.save` serializes the model into one ModelProto and then into bytes;
on large graphs those protobuf messages were the biggest single cost of a
rewrite's peak memory (about 250 MB for a 100k-node graph, several times the
bytes they serialize to). Protobuf lets a message be written as the
concatenation of its parts (repeated fields append), so the graph is
serialized a chunk of nodes at a time, each chunk's messages freed before
the next. The file parses to the same ModelProto that `onnx_ir.save` writes
(tested); only the order of the fields on the wire differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

__all__ = ["write_model"]

_NODES_PER_CHUNK = 2048
_GRAPH_FIELD = 7  # ModelProto.graph


def write_model(model: ir.Model, path: str | os.PathLike, *, external_data: str | None = None) -> None:
    """Like `onnx_ir.save(model, path, external_data=...)`, with peak memory bounded
    by a chunk of nodes rather than the whole graph. The model is left unchanged."""
    if external_data is None:
        _write(model, Path(path))
        return
    initializers = list(model.graph.initializers.values())
    tensors = [v.const_value for v in initializers]
    try:
        # Writes the weights to the data file and points the model's tensors at it.
        unloaded = ir.external_data.unload_from_model(
            model, os.path.dirname(path), external_data, size_threshold_bytes=256
        )
        _write(unloaded, Path(path))
    finally:
        for value, tensor in zip(initializers, tensors):
            value.const_value = tensor


def _write(model: ir.Model, path: Path) -> None:
    graph = model.graph
    head = ir.serde.serialize_model(
        ir.Model(
            ir.Graph([], [], nodes=[], opset_imports=dict(graph.opset_imports)),
            ir_version=model.ir_version,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            functions=list(model.functions.values()),
            metadata_props=dict(model.metadata_props),
        )
    )
    head.ClearField("graph")
    version = model.ir_version
    parts = [
        _graph_part(graph, version, graph.inputs, graph.outputs, [], graph.initializers.values(), whole=True)
    ]
    nodes = list(graph)
    for start in range(0, len(nodes), _NODES_PER_CHUNK):
        parts.append(
            _graph_part(graph, version, [], [], nodes[start : start + _NODES_PER_CHUNK], (), whole=False)
        )
    graph_size = sum(len(p) for p in parts)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(_varint(_GRAPH_FIELD << 3 | 2) + _varint(graph_size))
        for part in parts:
            f.write(part)


def _graph_part(
    graph: ir.Graph, ir_version: int, inputs, outputs, nodes, initializers, *, whole: bool
) -> bytes:
    """The serialized fields of a GraphProto for these inputs, outputs, nodes and initializers."""
    view = ir.GraphView(
        inputs,
        outputs,
        nodes=nodes,
        initializers=list(initializers),
        name=graph.name if whole else None,
        doc_string=graph.doc_string if whole else None,
        metadata_props=dict(graph.metadata_props) if whole else None,
    )
    proto = onnx.GraphProto()
    ir.serde.serialize_graph_into(proto, view, model_ir_version=ir_version)
    return proto.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
