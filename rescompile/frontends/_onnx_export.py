"""IR -> onnx-ir model.

A graph imported from a model the frontend owns is written back into that
model (`_Sync`): building a second onnx-ir model doubled peak memory on large
graphs (every node, value, shape and attribute object twice) and cost as much
time as the import. Import keeps, for each IR node and value, the onnx-ir
object it came from (`origin`); export walks
the IR once and touches only what differs: new nodes and values are created,
rewired inputs replaced, removed nodes and initializers dropped, changed
payloads, shapes, dtypes, names and attributes set. Graphs from torch, and
graphs imported from a caller's onnx_ir.Model (never modified), get a fresh
model built from the IR (`_build`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from rescompile.frontends._onnx_common import OnnxSource, dtype_name, ir_shape, ir_type
from rescompile.ir import Graph, Node, Value

__all__ = ["export_model"]


def export_model(graph: Graph, *, default_opset: int = 18) -> ir.Model:
    """The onnx-ir model for the IR, restoring everything kept at import."""
    source = graph.source
    if isinstance(source, OnnxSource) and source.model is not None:
        return _Sync(graph, source.model).run()
    if not isinstance(source, OnnxSource):
        source = OnnxSource(ir_version=10, opset_imports={"": default_opset}, producer_name="rescompile")
    return _build(graph, source)


def _tensor(value: Value) -> Any:
    payload = value.payload
    if not isinstance(payload, (np.ndarray, np.generic, int, float)) and hasattr(payload, "raw"):
        return payload  # an onnx-ir tensor from the input model: written without a copy
    array = np.asarray(payload)
    if value.dtype is not None and array.dtype.name != value.dtype:
        array = array.astype(value.dtype)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    return ir.Tensor(array, name=value.name)


def _attributes(attrs: dict[str, Any]) -> list:
    kept = [a for a in attrs.values() if isinstance(a, ir.Attr)]
    fresh = {k: v for k, v in attrs.items() if not isinstance(v, ir.Attr)}
    return kept + list(ir.convenience.convert_attributes(fresh))


def _drops_name(value: Value) -> bool:
    """An optional output that was absent in the input model and is still unused."""
    return bool(value.meta.get("onnx.absent")) and not value.uses() and not value.is_graph_output


def _new_value(value: Value) -> ir.Value:
    return ir.Value(name=value.name, shape=ir_shape(value), type=ir_type(value))


def _new_node(node: Node, inputs: list, outputs: list) -> ir.Node:
    for out, iv in zip(node.outputs, outputs):
        if _drops_name(out):
            iv.name = ""
    return ir.Node(
        node.domain,
        node.op_type,
        inputs,
        _attributes(node.attrs),
        outputs=outputs,
        name=node.name,
        overload=node.meta.get("onnx.overload", ""),
        doc_string=node.meta.get("onnx.doc_string"),
        metadata_props=node.meta.get("onnx.metadata_props"),
    )


def _build(graph: Graph, source: OnnxSource) -> ir.Model:
    vmap: dict[Value, ir.Value] = {}

    def new_value(value: Value) -> ir.Value:
        vmap[value] = _new_value(value)
        return vmap[value]

    inputs = [new_value(v) for v in graph.inputs]
    initializers = []
    for value in graph.initializers.values():
        v = new_value(value)
        v.const_value = _tensor(value)
        initializers.append(v)
    nodes = []
    domains = dict(source.opset_imports)
    for node in graph:
        outputs = [new_value(out) for out in node.outputs]
        if node.domain not in domains and node.domain != "ai.onnx":
            domains[node.domain] = 1
        nodes.append(_new_node(node, [vmap[v] if v is not None else None for v in node.inputs], outputs))
    out_graph = ir.Graph(
        inputs,
        [vmap[v] for v in graph.outputs],
        nodes=nodes,
        initializers=initializers,
        opset_imports=domains,
        name=graph.name,
        doc_string=source.graph_doc_string,
        metadata_props=dict(source.graph_metadata_props),
    )
    return ir.Model(
        out_graph,
        ir_version=source.ir_version,
        producer_name=source.producer_name,
        producer_version=source.producer_version,
        domain=source.domain,
        model_version=source.model_version,
        doc_string=source.doc_string,
        functions=list(source.functions),
        metadata_props=dict(source.metadata_props),
    )


class _Sync:
    """Makes an owned onnx-ir model equal to the IR; unchanged objects are left alone."""

    def __init__(self, graph: Graph, model: ir.Model) -> None:
        self.graph, self.model, self.g = graph, model, model.graph
        self.vmap: dict[Value, ir.Value] = {}

    def run(self) -> ir.Model:
        g, vmap = self.g, self.vmap
        for value in self.graph.inputs:
            self._value(value)
        self._initializers()
        order = [self._node(node) for node in self.graph]
        inputs = [vmap[v] for v in self.graph.inputs]
        if list(g.inputs) != inputs:
            g.inputs[:] = inputs
        outputs = [vmap[v] for v in self.graph.outputs]
        if list(g.outputs) != outputs:
            g.outputs[:] = outputs
        self._order(order)
        opsets = self.model.opset_imports
        for domain in {node.domain for node in self.graph}:
            if domain not in opsets and domain != "ai.onnx":
                opsets[domain] = 1
        g.name = self.graph.name
        return self.model

    def _value(self, value: Value) -> ir.Value:
        """The onnx-ir value for an IR value, created or brought up to date."""
        kept = value.origin
        if kept is None:
            iv = _new_value(value)
            value.origin = (iv, value.shape)
        else:
            iv, shape_at_import = kept
            if value.shape is not shape_at_import and value.shape != shape_at_import:
                iv.shape = ir_shape(value)
                value.origin = (iv, value.shape)
            if value.dtype is not None and dtype_name(iv.type) != value.dtype:
                iv.type = ir_type(value)
            if iv.name != value.name and not (iv.name == "" and _drops_name(value)):
                iv.name = value.name
        self.vmap[value] = iv
        return iv

    def _initializers(self) -> None:
        g = self.g
        wanted = []
        for value in self.graph.initializers.values():
            iv = self._value(value)
            if iv.const_value is not value.payload:
                iv.const_value = _tensor(value)
            wanted.append(iv)
        keep = set(wanted).union(self.vmap[v] for v in self.graph.inputs)
        for name in [n for n, iv in g.initializers.items() if iv not in keep]:
            del g.initializers[name]
        for iv in wanted:
            if g.initializers.get(iv.name) is not iv:
                g.initializers.add(iv)

    def _node(self, node: Node) -> ir.Node:
        vmap = self.vmap
        outputs = [self._value(out) for out in node.outputs]
        inputs = [vmap[v] if v is not None else None for v in node.inputs]
        inode = node.origin
        if inode is None:
            inode = node.origin = _new_node(node, inputs, outputs)
            return inode
        if inode.inputs != tuple(inputs):
            if len(inode.inputs) != len(inputs):
                inode.resize_inputs(len(inputs))
            for i, (have, want) in enumerate(zip(inode.inputs, inputs)):
                if have is not want:
                    inode.replace_input_with(i, want)
        if node.attrs:
            attrs = inode.attributes
            if len(attrs) != len(node.attrs) or any(attrs.get(k) is not a for k, a in node.attrs.items()):
                attrs.clear()
                for attr in _attributes(node.attrs):
                    attrs[attr.name] = attr
        elif inode.attributes:
            inode.attributes.clear()
        if inode.name != node.name:
            inode.name = node.name
        return inode

    def _order(self, order: list[ir.Node]) -> None:
        """Drop removed nodes and put new ones in place: O(nodes), existing nodes stay linked."""
        g = self.g
        live = set(order)
        dead = [n for n in g if n not in live]
        if dead:  # safe: checks nothing live reads them and detaches their inputs
            g.remove(dead, safe=True)
        surviving = [n for n in order if n.graph is g]
        if surviving != list(g):  # an edit reordered existing nodes: relink all
            g.remove(surviving, safe=False)
            g.extend(order)
            return
        pending: list[ir.Node] = []
        prev: ir.Node | None = None
        for inode in order:
            if inode.graph is g:
                self._flush(pending, prev, inode)
                prev = inode
            else:
                pending.append(inode)
        self._flush(pending, prev, None)

    def _flush(self, pending: list[ir.Node], prev: ir.Node | None, following: ir.Node | None) -> None:
        if not pending:
            return
        if prev is not None:
            self.g.insert_after(prev, pending)
        elif following is not None:
            self.g.insert_before(following, pending)
        else:
            self.g.extend(pending)
        pending.clear()
