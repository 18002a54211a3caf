"""Scale a value by changing the parameters that produce it.

`scale_output(graph, value, factor)` makes `value` come out multiplied by
`factor` (a scalar, or a vector over the value's channel axis) without adding an
op: it walks back from `value` through ops that commute with scaling (casts,
identities, reshapes that keep the channel axis, bias adds, constant muls) to
the op that owns parameters (a weighted op's weight and bias, a norm's gain and
shift, a constant multiplier) and scales those. It refuses, with a reason and
without changing anything, where no such op is found, where a parameter is
shared with another op, or where an intermediate value has other users.

Used by `fold` (fold a gate into the branch) and by the `compensate` options of
decay/deepnorm/depthscale (rescale the branch's last weighted op).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rescompile.ir import Graph, Node, OpKind, Value
from rescompile.ir.ops import Keep, _is_attribute_ref, axis_map

from ._branch import channel_axis, insert_op, numpy_of

__all__ = ["ScaleRefused", "literal_factor", "scale_output"]

_RESHAPES = {
    "Reshape",
    "Flatten",
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "view.default",
    "reshape.default",
}


class ScaleRefused(Exception):
    """The value cannot be scaled through parameters; the message says why."""


def _is_reshape(node: Node) -> bool:
    name = node.op_type.split("::")[-1].split(".")[0]
    return node.op_type in _RESHAPES or name in {
        "view",
        "reshape",
        "_unsafe_view",
        "flatten",
        "Reshape",
        "Flatten",
    }


def _keeps_last_axis(node: Node) -> bool:
    """A transpose/permute that leaves the last (channel) axis in place commutes with a
    per-channel factor: the op table's axis map says whether output 0's last axis is its data
    input's last axis, in ONNX (`perm`) and torch (transpose, permute, t) alike."""
    amap = axis_map(node)
    data = node.inputs[0] if node.inputs else None
    if amap is None or not amap.outputs or not amap.outputs[0] or data is None or not data.shape:
        return False
    last = len(data.shape) - 1
    return any(isinstance(s, Keep) and s.input == 0 and s.axis == last for s in amap.outputs[0][-1])


def _only_user(value: Value, node: Node, what: str) -> None:
    users = value.consumers()
    if users != [node] or value.is_graph_output:
        raise ScaleRefused(f"{what} {value.name!r} is also used by {len(users) - 1} other op(s)")


def _set_scaled(graph: Graph, value: Value, array: np.ndarray, factor: np.ndarray) -> Callable[[], None]:
    """The edit that sets `value` to `array * factor`, computed in float64 and rounded once to
    the payload's dtype, so fp16 and bf16 weights stay fp16 and bf16 (and a torch payload a
    torch tensor) instead of coming back as float64 for the exporter to cast."""

    def edit() -> None:
        scaled = array.astype(np.float64) * factor
        payload = value.payload
        new = payload.new_tensor(scaled) if hasattr(payload, "new_tensor") else scaled.astype(array.dtype)
        graph.set_payload(value, new)

    return edit


def _vector_along(factor: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Reshape a per-channel factor so it broadcasts along `axis` of a rank-`rank` array."""
    if factor.ndim == 0:
        return factor
    shape = [1] * rank
    shape[axis] = factor.shape[0]
    return factor.reshape(shape)


def scale_output(graph: Graph, value: Value, factor: np.ndarray) -> list[Callable[[], None]]:
    """Plan the parameter changes that multiply `value` by `factor`.

    Args:
        factor: a 0-d array, or a 1-d array over `value`'s channel axis.

    Returns:
        the edits to run (call each) to commit the change; nothing is changed
        until they run, so a refusal leaves the graph as it was. One edit replaces
        an op: torch's `x * number` under a per-channel factor becomes a multiply by
        a constant vector, whose output takes the place (and the readers) of the
        old one, `value` included when that op computes it.

    Raises:
        ScaleRefused: naming why the value cannot be scaled this way.
    """
    factor = np.asarray(factor)
    edits: list[Callable[[], None]] = []
    channel_from_end = None
    if factor.ndim == 1:
        channel_from_end = channel_axis(value) - len(value.shape)  # e.g. -1 or -3
    current = value
    for _ in range(64):
        node = current.producer
        if node is None:
            raise ScaleRefused(f"{current.name!r} is not computed by an op")
        slots = node.param_slots
        if slots is not None and slots.weight is not None:
            _scale_weighted(node, slots, factor, edits)
            return edits
        if slots is not None and slots.gain is not None:
            _scale_norm(node, slots, factor, edits)
            return edits
        live = [v for v in node.inputs if v is not None and not v.is_initializer]
        if node.kind is OpKind.LAYOUT:
            live = live[:1] if node.inputs and node.inputs[0] in live else []  # the rest are shape operands
        consts = [v for v in node.inputs if v is not None and v.is_initializer]
        if node.kind is OpKind.MUL and len(live) == 1 and len(consts) == 1:
            const = consts[0]
            _only_user(const, node, "factor")
            rank = len(current.shape) if current.shape is not None else 1
            edits.append(
                _set_scaled(
                    graph, const, numpy_of(const.payload), _vector_along(factor, rank, channel_from_end or -1)
                )
            )
            return edits
        if node.kind is OpKind.MUL and len(live) == 1 and not consts and _literal_multiplier(node):
            # torch's `x * 0.5` (a Python number, where ONNX has a constant initializer)
            if factor.ndim == 0:
                edits.append(_scale_literal(node, float(factor)))
            else:  # a number cannot hold a vector: multiply by a constant tensor, as ONNX does
                rank = len(current.shape) if current.shape is not None else 1
                edits.append(_literal_to_constant(graph, node, _vector_along(factor, rank, channel_from_end)))
            return edits
        if node.kind is OpKind.ADD and len(live) == 1 and len(consts) == 1:
            bias = consts[0]
            array = numpy_of(bias.payload)
            if not np.any(array):  # a zero bias scales to itself
                _only_user(live[0], node, "value")
                current = live[0]
                continue
            _only_user(bias, node, "bias")
            if factor.ndim == 1:
                scaled_factor = (
                    _vector_along(factor, array.ndim, channel_from_end)
                    if array.ndim >= -channel_from_end
                    else None
                )
                if scaled_factor is None or (array * scaled_factor).shape != array.shape:
                    raise ScaleRefused(f"bias {bias.name!r} of shape {array.shape} is not per-channel")
            else:
                scaled_factor = factor
            edits.append(_set_scaled(graph, bias, array, scaled_factor))
            _only_user(live[0], node, "value")
            current = live[0]
            continue
        passes_through = node.kind in (OpKind.IDENTITY, OpKind.CAST) or (
            node.kind is OpKind.LAYOUT
            and (
                factor.ndim == 0
                or (
                    channel_from_end == -1
                    and (
                        _keeps_last_axis(node)
                        or (
                            _is_reshape(node)
                            and live
                            and live[0].shape
                            and current.shape
                            and live[0].shape[-1] == current.shape[-1]
                        )
                    )
                )
            )
        )
        if passes_through and len(live) == 1:
            _only_user(live[0], node, "value")
            current = live[0]
            continue
        raise ScaleRefused(
            f"the branch ends in {node.op_type} ({node.name}), which has no parameter to scale"
        )
    raise ScaleRefused(f"no parameterised op found behind {value.name!r}")


def _literal_keys(node: Node) -> list:
    """Where a torch node holds a Python number argument: ("attr", name) for one the frontend
    lifted into the node's attributes, ("arg", position) for one left in the call's arguments."""
    attrs = node.attrs
    if node.domain != "torch" or not isinstance(attrs.get("args"), tuple):
        return []
    keys = []
    for i, arg in enumerate(attrs["args"]):
        name = arg.name if _is_attribute_ref(arg) else None
        if name is not None and _is_number(attrs.get(name)):
            keys.append(("attr", name))
        elif _is_number(arg):
            keys.append(("arg", i))
    return keys


def _is_number(obj) -> bool:
    return isinstance(obj, (int, float)) and not isinstance(obj, bool)


def _literal_multiplier(node: Node) -> bool:
    return len(_literal_keys(node)) == 1


def literal_factor(node: Node) -> float | None:
    """The number a torch multiply `x * 0.5` multiplies by (None for anything else): what an
    ONNX graph holds as a constant initializer, for passes that must treat both alike."""
    if node.kind is not OpKind.MUL or not _literal_multiplier(node):
        return None
    if sum(v is not None and not v.is_initializer for v in node.inputs) != 1:
        return None
    ((where, key),) = _literal_keys(node)
    return float(node.attrs[key] if where == "attr" else node.attrs["args"][key])


def _scale_literal(node: Node, factor: float) -> Callable[[], None]:
    """The edit that multiplies the node's one number argument by `factor`."""
    ((where, key),) = _literal_keys(node)

    def edit() -> None:
        attrs = dict(node.attrs)
        if where == "attr":
            attrs[key] = float(attrs[key]) * factor
        else:
            args = list(attrs["args"])
            args[key] = float(args[key]) * factor
            attrs["args"] = tuple(args)
        node.attrs = attrs

    return edit


def _literal_to_constant(graph: Graph, node: Node, factor: np.ndarray) -> Callable[[], None]:
    """The edit that replaces torch's `x * number` by a core `Mul(x, number * factor)` with a
    new constant: the ONNX form of the same model holds the number as a constant initializer,
    which takes a per-channel factor. The constant is not trainable, like ONNX's."""
    number = literal_factor(node)
    data = next(v for v in node.inputs if v is not None)
    out = node.outputs[0]

    def edit() -> None:
        dtype = out.dtype or data.dtype or "float32"
        array = np.asarray(np.float64(number) * factor, dtype=dtype)
        const = graph.add_param(f"rescompile.scale.{node.name}.factor", array, dtype=dtype, trainable=False)
        scaled = insert_op(
            graph, "Mul", [data, const], before=node, pass_name="scale", name=node.name, like=out
        )
        out.replace_all_uses_with(scaled, replace_graph_outputs=True)
        graph.remove(node)

    return edit


def _param_input(node: Node, index: int | None, what: str) -> Value | None:
    """The parameter at input `index`, or None when there is none or it is all zeros
    (scaling changes nothing; exporters often share one zero bias between layers)."""
    if index is None or index >= len(node.inputs) or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if not value.is_initializer:
        raise ScaleRefused(f"the {what} of {node.name} is computed, not a parameter")
    if not np.any(numpy_of(value.payload)):
        return None
    _only_user(value, node, what)
    return value


def _scale_weighted(node: Node, slots, factor: np.ndarray, edits: list) -> None:
    graph = node.graph
    weight = _param_input(node, slots.weight, "weight")
    if weight is None:
        raise ScaleRefused(f"{node.name} has no (non-zero) weight parameter")
    w = numpy_of(weight.payload)
    axis = slots.weight_out_axis % w.ndim
    if factor.ndim == 1 and w.shape[axis] != factor.shape[0]:
        raise ScaleRefused(
            f"{node.name}: weight axis {axis} has {w.shape[axis]} channels, the factor {factor.shape[0]}"
        )
    edits.append(_set_scaled(graph, weight, w, _vector_along(factor, w.ndim, axis)))
    bias = _param_input(node, slots.bias, "bias")
    if bias is not None:
        b = numpy_of(bias.payload)
        edits.append(_set_scaled(graph, bias, b, factor if factor.ndim == 0 else factor.reshape(b.shape)))


def _scale_norm(node: Node, slots, factor: np.ndarray, edits: list) -> None:
    graph = node.graph
    gain = _param_input(node, slots.gain, "gain")
    if gain is None:
        raise ScaleRefused(f"{node.name} has no gain parameter (elementwise_affine=False?)")
    g = numpy_of(gain.payload)
    if factor.ndim == 1 and g.shape != factor.shape:
        raise ScaleRefused(f"{node.name}: gain shape {g.shape} does not match the factor {factor.shape}")
    edits.append(_set_scaled(graph, gain, g, factor))
    shift = _param_input(node, slots.shift, "shift")
    if shift is not None:
        s = numpy_of(shift.payload)
        edits.append(_set_scaled(graph, shift, s, factor))
