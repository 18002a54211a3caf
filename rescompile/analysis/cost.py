"""What a graph costs: parameters and multiply-accumulates, read from the op table.

MACs count the ops that contract an axis (the op table's `Contract` mixes): for an op with a
weight (linear, matmul with a parameter, conv), output elements x weight elements per output
channel (so a grouped conv's `C_in / groups x kH x kW`); for a product of two activations,
output elements x the contracted length; fused attention counts q @ k^T and p @ v.
Elementwise ops, norms and softmax are not counted: they are memory-bound and small next to
the matmuls. Symbolic dims count as `dims[name]`, or 1
(so a dynamic batch and sequence give MACs per example and per token).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rescompile.ir import Graph, Node, Value
from rescompile.ir._core import PARAM
from rescompile.ir.ops import Contract, axis_map, call_of, param_slots

__all__ = ["count_params", "count_macs"]


def _numel(payload: Any) -> int:
    numel = getattr(payload, "numel", None)
    if callable(numel):  # torch.Tensor (its .size is a method)
        return int(numel())
    return int(getattr(payload, "size", 0) or 0)  # numpy array, onnx-ir tensor


def count_params(graph: Graph) -> int:
    """Elements of the trainable parameters (role param)."""
    return sum(_numel(v.payload) for v in graph.initializers.values() if v.role == PARAM)


def _size(value: Value | None, dims: Mapping[str, int]) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else int(dims.get(str(d), 1)) for d in value.shape]


def _is_param(value: Value | None) -> bool:
    """A weight held in the graph (a MatMul's second operand may be an activation)."""
    graph = value.graph if value is not None else None
    return graph is not None and graph.initializers.get(value.name) is value


def _node_macs(node: Node, dims: Mapping[str, int]) -> int:
    amap = axis_map(node)
    contractions = [m for m in (amap.mixes if amap is not None else ()) if isinstance(m, Contract)]
    out = _size(node.outputs[0], dims) if node.outputs else None
    if not contractions or out is None:
        return 0  # elementwise, norms, lookups (an embedding multiplies nothing)
    call = call_of(node)
    slots = param_slots(call) if call is not None else None
    if slots is not None and slots.weight is not None and _is_param(node.inputs[slots.weight]):
        weight = _size(node.inputs[slots.weight], dims)
        if weight and weight[slots.weight_out_axis]:
            return math.prod(out) * math.prod(weight) // weight[slots.weight_out_axis]
    lengths = []
    for mix in contractions:
        index, axis = mix.operands[0]
        shape = _size(node.inputs[index], dims)
        if shape is None or axis >= len(shape):
            return 0
        lengths.append(shape[axis])
    if len(lengths) == 2:  # attention: softmax(q k^T) v = S x (|q| + |out|) with S the keys
        query = _size(node.inputs[contractions[0].operands[0][0]], dims)
        return lengths[1] * (math.prod(query) + math.prod(out))
    return math.prod(out) * math.prod(lengths)


def count_macs(graph: Graph, dims: Mapping[str, int] | None = None) -> int:
    """Multiply-accumulates of one run of `graph` (see the module docstring)."""
    dims = dict(dims or {})
    return sum(_node_macs(node, dims) for node in graph)
