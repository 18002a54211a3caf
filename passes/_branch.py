"""Helpers shared by passes that rewrite residual sites: new parameters with
stable names, inserting ops on an add's operands, channel axes and broadcast
shapes. Passes build nodes only from the IR's core op set (ONNX names)."""

from __future__ import annotations

from typing import Any

import ml_dtypes  # registers bfloat16 with numpy (np.asarray(x, dtype="bfloat16"))
import numpy as np

from rescompile.analysis.residuals import ResidualSite
from rescompile.errors import RescompileError
from rescompile.ir import Graph, Node, Value
from rescompile.ir.ops import Keep, axis_map
from rescompile.ir.shapes import infer_node

__all__ = [
    "param_name",
    "new_param",
    "insert_op",
    "multiply_operand",
    "channel_axis",
    "channel_count",
    "vector_shape",
    "numpy_of",
]


def param_name(pass_name: str, site: ResidualSite, role: str) -> str:
    """Stable, readable name for a new parameter: rescompile.<pass>.<add node>.<role>."""
    return f"rescompile.{pass_name}.{site.name}.{role}"


def new_param(
    graph: Graph, pass_name: str, site: ResidualSite, role: str, array: Any, *, trainable: bool = True
) -> Value:
    """Register a new initializer for `site` with the branch's dtype."""
    dtype = site.branch.dtype or "float32"
    array = np.asarray(array, dtype=dtype)
    return graph.add_param(param_name(pass_name, site, role), array, dtype=dtype, trainable=trainable)


_FRONT = object()


def insert_op(
    graph: Graph,
    op_type: str,
    inputs: list[Value],
    *,
    pass_name: str,
    name: str,
    before: Node | None = None,
    after: Node | None | object = _FRONT,
    like: Value | None = None,
    attrs: dict | None = None,
) -> Value:
    """Insert a core op before `before` or after `after` (None: at the front). The output's
    shape and dtype come from the op table's inference; `like` (a value of the same shape and
    dtype) is used only where inference cannot tell, e.g. an input of unknown shape."""
    node = Node(
        op_type, inputs, attrs=attrs, name=f"{pass_name}/{name}", output_names=[f"{pass_name}/{name}"]
    )
    node.meta["pass"] = pass_name
    if before is not None:
        graph.insert_before(before, node)
    else:
        graph.insert_after(None if after is _FRONT else after, node)
    infer_node(node)
    out = node.output
    if like is not None:
        if out.shape is None:
            out.shape = like.shape
        if out.dtype is None:
            out.dtype = like.dtype
    return out


def multiply_operand(graph: Graph, site: ResidualSite, which: str, factor: Value, pass_name: str) -> Node:
    """Rewire the site's add so that operand `which` ("skip" or "branch") is multiplied by `factor`."""
    index = site.skip_index if which == "skip" else 1 - site.skip_index
    operand = site.add.inputs[index]
    out = insert_op(
        graph,
        "Mul",
        [operand, factor],
        before=site.add,
        pass_name=pass_name,
        name=f"{site.name}/{which}_mul",
        like=operand,
    )
    site.add.replace_input_with(index, out)
    return out.producer


def channel_axis(value: Value) -> int:
    """The channel axis of a stream tensor: the output axis that the nearest op with per-channel
    parameters (a conv or linear's output channels, a norm's gain) writes, found by walking back
    through the op table's axis maps; where no such op is in reach, 1 for rank 4/5 (NCHW) and
    else the last axis. Swin keeps [B, H, W, C] streams: rank alone would pick H."""
    rank = len(value.shape) if value.shape is not None else None
    if rank is None:
        raise RescompileError(f"{value.name!r} has unknown rank; cannot find its channel axis")
    found = _parameter_axis(value, rank)
    if found is not None:
        return found
    return 1 if rank in (4, 5) else rank - 1


_CHANNEL_WALK_LIMIT = 64


def _parameter_axis(value: Value, rank: int) -> int | None:
    """Breadth-first back through ops that keep every axis in place (elementwise, casts, adds of
    the stream and its branch), to the first op whose parameters own one of `value`'s axes."""
    frontier, seen = [value], {value}
    for node in value.consumers():  # an add of `value` and another tensor aligns their axes too
        for operand in _aligned_operands(node, 0, rank):
            if operand not in seen:
                seen.add(operand)
                frontier.append(operand)
    for _ in range(_CHANNEL_WALK_LIMIT):
        if not frontier:
            return None
        current = frontier.pop(0)
        node = current.producer
        if node is None:
            continue
        amap = axis_map(node)
        if amap is None or current.index >= len(amap.outputs):
            continue
        sources = amap.outputs[current.index]
        slots = node.param_slots if current.index == 0 else None
        owner = None if slots is None else (slots.weight if slots.weight is not None else slots.gain)
        if owner is not None:
            for out_axis, axis_sources in enumerate(sources):
                if any(isinstance(s, Keep) and s.input == owner for s in axis_sources):
                    return out_axis
            continue
        for operand in _aligned_operands(node, current.index, rank):
            if operand not in seen:
                seen.add(operand)
                frontier.append(operand)
    return None


def _aligned_operands(node: Node, output: int, rank: int) -> list[Value]:
    """Inputs of `node` whose every axis is the same axis of output `output` (elementwise ops,
    casts, identities): their channel axis is the output's."""
    amap = axis_map(node)
    if amap is None or output >= len(amap.outputs):
        return []
    sources = amap.outputs[output]
    aligned = []
    for index, operand in enumerate(node.inputs):
        if operand is None or operand.shape is None or len(operand.shape) != rank or len(sources) != rank:
            continue
        mapped = [
            next((s.axis for s in src if isinstance(s, Keep) and s.input == index), None) for src in sources
        ]
        if mapped == list(range(rank)):
            aligned.append(operand)
    return aligned


def channel_count(value: Value) -> int:
    axis = channel_axis(value)
    size = value.shape[axis]
    if not isinstance(size, int):
        raise RescompileError(f"{value.name!r} has a dynamic channel dimension ({size})")
    return size


def vector_shape(value: Value) -> tuple[int, ...]:
    """Shape of a per-channel vector that broadcasts against `value`: (C,) for
    channel-last tensors, (C, 1, 1) for NCHW (numpy broadcasting aligns right)."""
    axis = channel_axis(value)
    rank = len(value.shape)
    return (channel_count(value),) + (1,) * (rank - 1 - axis)


def numpy_of(payload: Any) -> np.ndarray:
    """A numpy copy of an initializer payload (numpy, onnx-ir tensor or torch tensor) in its own
    dtype. torch will not hand bfloat16 to numpy (which has no bfloat16): it goes through
    float32, which holds every bfloat16 exactly, and comes back as ml_dtypes.bfloat16."""
    if isinstance(payload, (np.ndarray, np.generic, int, float)):
        return np.array(payload)
    if hasattr(payload, "detach"):
        if str(payload.dtype) == "torch.bfloat16":
            return payload.detach().cpu().float().numpy().astype(ml_dtypes.bfloat16)
        return payload.detach().cpu().numpy().copy()
    return np.array(payload.numpy(), copy=True)
