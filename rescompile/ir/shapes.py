"""Shape and dtype inference from the op table, so that passes need not set shapes by hand.

`infer_shapes(graph)` walks the nodes in order and sets each output's `shape` and `dtype` from its
inputs. Where an op's axis map (`rescompile.ir.ops.axis_map`) fixes every output size (elementwise,
matmul, norms, transposes, reductions, gathers, flattens), sizes are read through it; ops whose sizes
depend on values or window arithmetic (reshape to a computed shape, expand, slice, split, concat,
conv, pooling, padding, constants) have rules here. Small integer tensors that hold shapes (ONNX
Shape -> Gather -> Concat chains, torch `sym_size`) are evaluated on the way, symbolic dims included.

Dims are int, str (a symbol, or a product such as "4*s1") or None. A node with no entry in the table
or no rule here keeps its outputs' shapes and is listed in the report: nothing is guessed. A known
shape is never replaced by a less precise one; where both are concrete and differ, the report lists
a conflict (a bug in a rule, a frontend or a pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from rescompile.ir.ops import (
    Call,
    Keep,
    Merge,
    New,
    Offset,
    Role,
    Split,
    _constant_array,
    _elementwise,
    _monomial,
    _op_name,
    call_of,
)

__all__ = ["Conflict", "ShapeReport", "infer_shapes", "static_ints"]

Dim = int | str | None
Shape = tuple | None
_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Conflict:
    """An inferred shape or dtype that contradicts the one the value had."""

    value: str
    node: str
    what: str  # "shape" or "dtype"
    existing: Any
    inferred: Any


@dataclasses.dataclass
class ShapeReport:
    """What one inference run did.

    Attributes:
        inferred: outputs a rule gave a shape (at least a rank) to.
        total: outputs of the nodes walked.
        unknown: "node (op): why" for nodes left alone (opaque, or no rule, or inputs unknown).
        conflicts: values whose inferred shape or dtype contradicts the existing one.
    """

    inferred: int = 0
    total: int = 0
    unknown: list[str] = dataclasses.field(default_factory=list)
    conflicts: list[Conflict] = dataclasses.field(default_factory=list)


def infer_shapes(graph, *, only: Iterable | None = None) -> ShapeReport:
    """Infer shapes and dtypes of node outputs in graph order (only the nodes in `only`, e.g. the
    nodes a pass created, when given; the others' outputs are read as they are)."""
    selected = None if only is None else set(only)
    context = _Context()
    report = ShapeReport()
    for node in graph:
        if selected is None or node in selected:
            _infer_into(node, context, report)
    return report


def infer_node(node) -> ShapeReport:
    """Infer one node's output shapes and dtypes from its inputs as they are now: what a pass
    calls on each node it builds, in O(1) (infer_shapes walks the graph)."""
    report = ShapeReport()
    _infer_into(node, _Context(), report)
    return report


def _infer_into(node, context: _Context, report: ShapeReport) -> None:
    report.total += len(node.outputs)
    result = _infer(node, context)
    if isinstance(result, str):
        report.unknown.append(f"{node.name} ({node.op_type}): {result}")
        return
    for value, (shape, dtype) in zip(node.outputs, result):
        if shape is not None:
            report.inferred += 1
        merged, clash = _merge(value.shape, shape)
        if clash:
            report.conflicts.append(Conflict(value.name, node.name, "shape", value.shape, shape))
        value.shape = merged
        if dtype is not None and value.dtype is not None and dtype != value.dtype:
            report.conflicts.append(Conflict(value.name, node.name, "dtype", value.dtype, dtype))
        elif dtype is not None:
            value.dtype = dtype


def _merge(existing: Shape, inferred: Shape) -> tuple[Shape, bool]:
    """The more precise of two shapes per dim (int over symbol over None); True when they clash."""
    if inferred is None:
        return existing, False
    if existing is None:
        return tuple(inferred), False
    if len(existing) != len(inferred):
        return existing, True
    merged, clash = [], False
    for e, i in zip(existing, inferred):
        if isinstance(e, int) and isinstance(i, int) and e != i:
            clash = True
        merged.append(
            e if isinstance(e, int) or i is None or (isinstance(e, str) and isinstance(i, str)) else i
        )
    return (existing if clash else tuple(merged)), clash


# ----- dims ----------------------------------------------------------------------------------------
def _format(coefficient: int, symbols: tuple[str, ...]) -> Dim:
    if not symbols:
        return coefficient
    return "*".join(([str(coefficient)] if coefficient != 1 else []) + sorted(symbols))


def _product(dims: Iterable[Dim]) -> Dim:
    """Product of dims, kept symbolic as a monomial ("4*s1") when it is one; None when unknown."""
    coefficient, symbols = 1, []
    for d in dims:
        if d == 0:
            return 0
        term = _monomial(d)
        if term is None:
            return None
        coefficient *= term[0]
        symbols += term[1]
    return _format(coefficient, tuple(symbols))


def _quotient(a: Dim, b: Dim) -> Dim:
    """a / b for monomials when exact (a reshape's -1); None otherwise."""
    ta, tb = _monomial(a), _monomial(b)
    if ta is None or tb is None or ta[0] % tb[0]:
        return None
    rest = list(ta[1])
    for symbol in tb[1]:
        if symbol not in rest:
            return None
        rest.remove(symbol)
    return _format(ta[0] // tb[0], tuple(rest))


def _same(dims: Iterable[Dim]) -> Dim:
    """One size from several sources of one axis: an int wins over a symbol; disagreeing ints (or
    nothing known) give None."""
    known = [d for d in dims if d is not None]
    ints = {d for d in known if isinstance(d, int)}
    if len(ints) > 1:
        return None
    return next(iter(ints)) if ints else (known[0] if known else None)


def _broadcast(*shapes: tuple) -> Shape:
    """Numpy broadcasting of known-rank shapes."""
    rank = max(len(s) for s in shapes)
    out = []
    for a in range(rank):
        dims = [s[a - rank + len(s)] for s in shapes if a - rank + len(s) >= 0]
        other = [d for d in dims if d != 1]
        out.append(_same(other) if other else 1)
    return tuple(out)


def _window(size: Dim, kernel: int, stride: int, before: int, after: int, dilation: int, ceil: bool) -> Dim:
    """Output length of a convolution or pooling window along one axis."""
    span = dilation * (kernel - 1) + 1
    if isinstance(size, int):
        extent = size + before + after - span
        return (-(-extent // stride) if ceil else extent // stride) + 1
    return size if stride == 1 and before + after == span - 1 else None


# ----- values of small integer tensors (shapes computed in the graph) ------------------------------
class _Context:
    """Elements of shape-holding values, computed on demand and kept for the run."""

    def __init__(self) -> None:
        self.memo: dict[Any, tuple | None] = {}

    def elements(self, value: Any) -> tuple | None:
        """The flattened elements of `value` (ints or symbols; None where unknown), or None."""
        if value is None:
            return None
        if isinstance(value, bool):
            return (int(value),)
        if isinstance(value, int):
            return (value,)
        if isinstance(value, (list, tuple)):
            parts = [self.elements(v) for v in value]
            return None if any(p is None for p in parts) else tuple(d for p in parts for d in p)
        if not hasattr(value, "producer"):
            return None
        if value not in self.memo:
            self.memo[value] = None  # a cycle cannot occur in a valid graph; this only guards
            self.memo[value] = _elements(value, self)
        return self.memo[value]

    def ints(self, value: Any) -> list[int] | None:
        found = self.elements(value)
        return None if found is None or not all(isinstance(d, int) for d in found) else list(found)


def static_ints(value: Any) -> list[int] | None:
    """The elements of a small integer value computed in the graph (ONNX Shape -> Gather -> Add ->
    Div chains, torch `sym_size` arithmetic), when every one is a known int; None where any is a
    symbol or unknown. The op table reads integer arguments through this (`Call.ints`), so that a
    slice bound the legacy exporter computes from a static shape is as good as a constant."""
    return _Context().ints(value)


def _elements(value: Any, context: _Context) -> tuple | None:
    if value.dtype is not None and not value.dtype.startswith(("int", "uint", "bool")):
        return None
    if value.shape is not None and _product(value.shape) not in range(65):
        return None
    array = _constant_array(value)
    if array is not None:
        if array.size > 64 or array.dtype.kind not in "iub":
            return None
        return tuple(int(v) for v in array.reshape(-1))
    node = value.producer
    if node is None:
        return None
    name = node.op_type if node.domain != "torch" else _torch_name(node)
    inputs = node.inputs
    if name == "sym_size":
        shape, dim = inputs[0].shape, call_of(node).arg("dim")
        return None if shape is None or not isinstance(dim, int) else (shape[dim],)
    if name == "Shape":
        shape = inputs[0].shape
        if shape is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return tuple(shape[start:end])
    if name == "Size":
        shape = inputs[0].shape
        return None if shape is None else (_product(shape),)
    if name in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return context.elements(inputs[0])
    if name == "Concat":
        return context.elements(list(inputs))
    if name == "Gather":
        data, indices = context.elements(inputs[0]), context.ints(inputs[1])
        if data is None or indices is None or (inputs[0].shape is not None and len(inputs[0].shape) > 1):
            return None
        return tuple(data[i] for i in indices)
    if name == "Slice":
        data = context.elements(inputs[0])
        starts, ends = context.ints(inputs[1]), context.ints(inputs[2])
        steps = context.ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
        if data is None or starts is None or ends is None or steps is None or len(starts) != 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])]  # Python clamps as ONNX does
    if name == "ConstantOfShape":
        count = context.ints(inputs[0])
        tensor = _attr(node, "value", None)
        fill = None if tensor is None else _constant_array(_Payload(tensor))
        if count is None or (fill is not None and fill.dtype.kind not in "iub"):
            return None
        return (int(fill.reshape(-1)[0]) if fill is not None else 0,) * math.prod(count)
    if name in ("Add", "Sub", "Mul", "Div", "Equal", "Where"):
        operands = [context.elements(v) for v in inputs]
        if any(o is None for o in operands):
            return None
        length = max(len(o) for o in operands)
        if any(len(o) not in (1, length) for o in operands):
            return None
        columns = zip(*[o * length if len(o) == 1 else o for o in operands])
        return tuple(_arithmetic(name, list(c)) for c in columns)
    return None


def _arithmetic(name: str, operands: list[Dim]) -> Dim:
    if name == "Where":
        condition, a, b = operands
        return None if not isinstance(condition, int) else (a if condition else b)
    a, b = operands
    if name == "Mul":
        return a * b if isinstance(a, int) and isinstance(b, int) else _product((a, b))
    if not isinstance(a, int) or not isinstance(b, int):
        return (
            _quotient(a, b)
            if name == "Div"
            else (1 if name == "Equal" and a == b and a is not None else None)
        )
    return {"Add": a + b, "Sub": a - b, "Div": int(a / b) if b else None, "Equal": int(a == b)}[name]


def _arg_values(call: Call) -> list:
    """A torch call's arguments, positional then keyword, tensors as IR values."""
    return list(call._resolve(tuple(call.attrs.get("args") or ()))) + list(
        call._resolve(tuple((call.attrs.get("kwargs") or {}).values()))
    )


def _attr(node: Any, name: str, default: Any) -> Any:
    value = node.attrs.get(name, default)
    return getattr(value, "value", value)


def _torch_name(node: Any) -> str:
    call = call_of(node)
    return _op_name(call) if call is not None else str(node.op_type)


# ----- dtypes --------------------------------------------------------------------------------------
# TensorProto element types, for Cast's `to` and ConstantOfShape's value.
_ONNX_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}
_CATEGORY = {"bool": 0}
_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
_TORCH_DEFAULT = {0: "bool", 1: "int64", 2: "float32"}


def _category(dtype: str) -> int:
    return _CATEGORY.get(dtype, 1 if dtype.startswith(("int", "uint")) else 2)


def _torch_dtype(obj: Any) -> str | None:
    """A torch.dtype's IR name (without importing torch)."""
    text = str(obj)
    return text[len("torch.") :] if type(obj).__name__ == "dtype" and text.startswith("torch.") else None


def _promote(call: Call, indices: list[int]) -> str | None:
    """torch type promotion over tensor operands and Python scalars: the highest category wins;
    dimensioned tensors decide before 0-d tensors, which decide before scalars."""
    tensors = [call.inputs[i] for i in indices if call.inputs[i] is not None]
    if any(t.dtype is None or t.shape is None for t in tensors):
        return None
    scalars = [a for a in _arg_values(call) if isinstance(a, (bool, int, float)) and a is not None]
    categories = [_category(t.dtype) for t in tensors] + [
        0 if isinstance(s, bool) else 1 if isinstance(s, int) else 2 for s in scalars
    ]
    if not categories:
        return None
    top = max(categories)
    for group in ([t for t in tensors if t.shape], [t for t in tensors if not t.shape]):
        members = [t.dtype for t in group if _category(t.dtype) == top]
        if members:
            return max(members, key=lambda d: np.dtype(d).itemsize if d != "bfloat16" else 2)
    return _TORCH_DEFAULT[top]


_BOOLEAN = frozenset(
    [
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Not",
        "IsNaN",
        "IsInf",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_and",
        "logical_or",
        "logical_not",
        "isnan",
    ]
)


def _dtype(call: Call, node: Any, output: int) -> str | None:
    name = node.op_type if not call.is_torch else _op_name(call)
    if name in _BOOLEAN:
        return "bool"
    explicit = _torch_dtype(call.attrs.get("dtype")) if call.is_torch else None
    if explicit is not None:
        return explicit
    if call.is_torch:
        return _torch_dtype_rule(call, name)
    if name == "Cast":
        return _ONNX_TYPES.get(int(call.arg("to")))
    if name == "CastLike":
        return call.inputs[1].dtype
    if name in ("Shape", "Size") or (name == "MaxPool" and output == 1):
        return "int64"
    if name == "Dropout" and output == 1:
        return "bool"
    if name in ("LayerNormalization", "SkipLayerNormalization") and 0 < output < 3:
        return _ONNX_TYPES.get(int(call.arg("stash_type") or 1))
    if name == "Constant":
        array = _constant_array(node.outputs[0])
        return None if array is None else array.dtype.name
    if name == "ConstantOfShape":
        fill = call.arg("value")
        return "float32" if fill is None else _constant_array(_Payload(fill)).dtype.name
    if name == "Where":
        return call.inputs[1].dtype
    if name in ("Gather", "GatherElements", "GatherND"):
        return call.inputs[0].dtype
    data = next(
        (v for arg, v in zip(call.info.args, call.inputs) if arg.role is Role.DATA and v is not None), None
    )
    return None if data is None else data.dtype


def _torch_dtype_rule(call: Call, name: str) -> str | None:
    if name in ("to", "_to_copy", "type"):
        for value in _arg_values(call):
            found = _torch_dtype(value) or (
                getattr(value, "dtype", None) if hasattr(value, "producer") else None
            )
            if found is not None:
                return found
        return call.inputs[0].dtype
    if name in ("type_as", "view_as", "expand_as"):
        return call.inputs[1].dtype if name == "type_as" else call.inputs[0].dtype
    if name in ("float", "half", "bfloat16"):
        return {"float": "float32", "half": "float16", "bfloat16": "bfloat16"}[name]
    if name == "arange":
        bounds = call._resolve(tuple(call.attrs.get("args") or ()))
        return (
            "float32"
            if any(isinstance(a, float) or getattr(a, "dtype", None) in _FLOATS for a in bounds)
            else "int64"
        )
    if name in ("zeros", "ones", "full", "empty", "scalar_tensor"):
        return "float32"
    if name == "cumsum" and call.inputs[0].dtype in ("bool", "int8", "int16", "int32", "uint8"):
        return "int64"
    if name in ("embedding",):
        return call.inputs[call.input_index(call.role_name(Role.WEIGHT))].dtype
    if name == "Embedding":
        return str(call.attrs["module"].weight.dtype).replace("torch.", "")
    if name in ("div", "truediv", "__truediv__") and call.arg("rounding_mode") is None:
        promoted = _promote(call, [i for i in range(len(call.inputs))])
        return "float32" if promoted is not None and _category(promoted) < 2 else promoted
    if call.info.axes is _elementwise:
        roles = {i: arg.role for arg in call.info.args for i in call.input_indices(arg.name)}
        return _promote(call, [i for i in range(len(call.inputs)) if roles.get(i) is not Role.MASK])
    data = call.input_indices(call.info.args[0].name) if call.info.args else []
    return call.inputs[data[0]].dtype if data else None


@dataclasses.dataclass
class _Payload:
    """Lets `_constant_array` read a tensor attribute (ConstantOfShape's value)."""

    payload: Any
    producer: Any = None


# ----- shapes from the axis map --------------------------------------------------------------------
def _size(call: Call, source: Any, sources: tuple, new: Dim) -> Dim:
    if isinstance(source, Keep):
        shape = call.inputs[source.input].shape
        return shape[source.axis] if shape is not None and source.axis < len(shape) else None
    if isinstance(source, Merge):
        return _product(source.sizes)
    if isinstance(source, Split):
        return source.sizes[source.part]
    if isinstance(source, Offset):  # operands laid end to end (Concat)
        sizes = [call.inputs[s.input].shape[s.axis] for s in sources]
        return sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    if isinstance(source, New):
        return new
    return None  # Slice, Window, Group: sized by the op's own rule or by other sources


def _from_axes(call: Call, new: Dim = None) -> list[Shape] | None:
    """Output shapes read through the axis map; `new` is the size of axes with no source (1 for
    unsqueeze and keepdims; None where the map does not say)."""
    amap = call.info.axes(call) if call.info.axes is not None else None
    if amap is None:
        return None
    shapes = []
    for axes in amap.outputs:
        dims = []
        for sources in axes:
            offsets = [s for s in sources if isinstance(s, Offset)]
            if offsets:
                dims.append(_size(call, offsets[0], tuple(offsets), new))
            else:
                dims.append(_same(_size(call, s, sources, new) for s in sources))
        shapes.append(tuple(dims))
    return shapes


# ----- per-op rules --------------------------------------------------------------------------------
Rule = Callable[[Call, "_Context"], "list[Shape] | None"]


def _axes_rule(new: Dim = None) -> Rule:
    return lambda call, context: _from_axes(call, new)


def _resolve_target(dims: list, shape_in: tuple, allowzero: bool = False) -> Shape:
    """A reshape target: 0 copies the input dim (ONNX, unless allowzero), -1 takes what is left."""
    dims = [shape_in[k] if d == 0 and not allowzero and k < len(shape_in) else d for k, d in enumerate(dims)]
    if -1 in dims:
        rest = _product(d for d in dims if d != -1)
        dims[dims.index(-1)] = None if rest is None else _quotient(_product(shape_in), rest)
    return tuple(dims)


def _onnx_reshape(call: Call, context: _Context) -> list[Shape] | None:
    shape_in, target = call.inputs[0].shape, context.elements(call.inputs[1])
    if shape_in is None or target is None:
        return None
    return [_resolve_target(list(target), shape_in, bool(call.arg("allowzero")))]


def _torch_reshape(call: Call, context: _Context) -> list[Shape] | None:
    shape_in = call.inputs[0].shape
    if _op_name(call) == "view_as":
        return [call.inputs[1].shape]
    target = context.elements(call.arg("size"))
    if shape_in is None or target is None:
        return None
    return [_resolve_target(list(target), shape_in, allowzero=True)]


def _onnx_expand(call: Call, context: _Context) -> list[Shape] | None:
    shape_in, target = call.inputs[0].shape, context.elements(call.inputs[1])
    return None if shape_in is None or target is None else [_broadcast(shape_in, tuple(target))]


def _torch_expand(call: Call, context: _Context) -> list[Shape] | None:
    shape_in = call.inputs[0].shape
    if _op_name(call) == "expand_as":
        return [call.inputs[1].shape]
    target = context.elements(call.arg("size"))
    if shape_in is None or target is None:
        return None
    lead = len(target) - len(shape_in)
    return [tuple(shape_in[a - lead] if d == -1 else d for a, d in enumerate(target))]


def _slice_length(size: Dim, start: int, end: int, step: int) -> Dim:
    if isinstance(size, int):
        return len(range(*slice(start, end, step).indices(size)))
    # Otherwise min(end, size) - start: it depends on the symbol's value.
    return size if start == 0 and step == 1 and end >= _INT64_MAX // 2 else None


def _onnx_slice(call: Call, context: _Context) -> list[Shape] | None:
    shape = call.inputs[0].shape
    starts, ends = context.ints(call.inputs[1]), context.ints(call.inputs[2])
    axes = context.ints(call.inputs[3]) if len(call.inputs) > 3 and call.inputs[3] is not None else None
    steps = context.ints(call.inputs[4]) if len(call.inputs) > 4 and call.inputs[4] is not None else None
    if shape is None or starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    out = list(shape)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        out[axis] = _slice_length(shape[axis], start, end, step)
    return [tuple(out)]


def _torch_slice(call: Call, context: _Context) -> list[Shape] | None:
    shape = call.inputs[0].shape
    if shape is None:
        return None
    name = _op_name(call)
    dim = int(call.arg("dim"))
    start = context.elements(call.arg("start") if call.arg("start") is not None else 0)
    if name == "narrow":
        length = context.elements(call.arg("length"))
        return (
            None
            if length is None
            else [tuple(length[0] if a == dim % len(shape) else d for a, d in enumerate(shape))]
        )
    end = context.elements(call.arg("end") if call.arg("end") is not None else _INT64_MAX)
    step = int(call.arg("step") or 1)
    if start is None or end is None or not isinstance(start[0], int):
        return None
    out = list(shape)
    if isinstance(end[0], int):
        out[dim] = _slice_length(shape[dim], start[0], end[0], step)
    else:  # x[:, :n] with n a symbol: n when it is the input's own size
        out[dim] = shape[dim] if start[0] == 0 and step == 1 and end[0] == shape[dim] else None
    return [tuple(out)]


def _pieces(shape: tuple, axis: int, sizes: list[Dim]) -> list[Shape]:
    return [tuple(size if a == axis else d for a, d in enumerate(shape)) for size in sizes]


def _even_sizes(size: Dim, count: int) -> list[Dim] | None:
    if not isinstance(size, int):
        return None
    step = -(-size // count)
    return [min(step, size - k) for k in range(0, size, step)]


def _onnx_split(call: Call, context: _Context) -> list[Shape] | None:
    shape = call.inputs[0].shape
    if shape is None:
        return None
    axis = int(call.arg("axis") or 0) % len(shape)
    sizes = context.ints(call.inputs[1]) if len(call.inputs) > 1 and call.inputs[1] is not None else None
    sizes = sizes or _even_sizes(shape[axis], len(call.outputs))
    return None if sizes is None else _pieces(shape, axis, sizes)


def _torch_split(call: Call, context: _Context) -> list[Shape] | None:
    shape = call.inputs[0].shape
    if shape is None:
        return None
    name = _op_name(call)
    axis = int(call.arg("dim")) % len(shape)
    if name == "chunk":
        sizes = _even_sizes(shape[axis], int(call.arg("chunks")))
    else:
        given = call.ints("split_size_or_sections" if name == "split" else "split_sizes")
        if given is None:
            return None
        single = (
            len(given) == 1 and name == "split" and not isinstance(call.arg("split_size_or_sections"), list)
        )
        sizes = (
            given
            if not single
            else (
                [min(given[0], shape[axis] - k) for k in range(0, shape[axis], given[0])]
                if isinstance(shape[axis], int)
                else None
            )
        )
    return None if sizes is None else _pieces(shape, axis, sizes)


def _concat(call: Call, context: _Context) -> list[Shape] | None:
    indices = call.input_indices(call.info.args[0].name)
    shapes = [call.inputs[i].shape for i in indices]
    if not shapes or any(s is None for s in shapes):
        return None
    axis = int(call.arg("dim") if call.is_torch else call.arg("axis")) % len(shapes[0])
    sizes = [s[axis] for s in shapes]
    out = [_same(s[a] for s in shapes) for a in range(len(shapes[0]))]
    out[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    return [tuple(out)]


def _ints(value: Any, count: int, default: int) -> list[int]:
    """An int or int list attribute spread over `count` spatial axes."""
    if value is None or value == []:
        return [default] * count
    if isinstance(value, int):
        return [value] * count
    values = [int(v) for v in value]
    return values * count if len(values) == 1 else values


def _conv_like(
    call: Call, x: tuple, channels: Dim, kernel: list[int], transposed: bool = False
) -> list[Shape] | None:
    """(N, C, *spatial) -> (N, channels, *spatial') with the op's strides, pads and dilations."""
    spatial = len(x) - 2
    if call.is_torch:
        pool = _op_name(call) in _POOLS
        strides = list(kernel) if pool and not call.arg("stride") else _ints(call.arg("stride"), spatial, 1)
        padding = call.arg("padding")
        if isinstance(padding, str):
            if padding != "same" and padding != "valid":
                return None
            pads = None if padding == "same" else [0] * (2 * spatial)
        else:
            pad = _ints(padding, spatial, 0)
            pads = pad + pad
        dilations = _ints(call.arg("dilation"), spatial, 1)
        ceil = bool(call.arg("ceil_mode"))
        output_padding = _ints(call.arg("output_padding"), spatial, 0)
    else:
        strides = _ints(call.arg("strides"), spatial, 1)
        dilations = _ints(call.arg("dilations"), spatial, 1)
        auto = call.arg("auto_pad")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pads = None if auto in ("SAME_UPPER", "SAME_LOWER") else _ints(call.arg("pads"), 2 * spatial, 0)
        ceil = bool(call.arg("ceil_mode"))
        output_padding = _ints(call.arg("output_padding"), spatial, 0)
    dims = []
    for k in range(spatial):
        size = x[2 + k]
        if pads is None:  # "same": ceil(size / stride)
            dims.append(
                -(-size // strides[k]) if isinstance(size, int) else size if strides[k] == 1 else None
            )
        elif transposed:
            span = dilations[k] * (kernel[k] - 1) + 1
            dims.append(
                strides[k] * (size - 1) + output_padding[k] + span - pads[k] - pads[spatial + k]
                if isinstance(size, int)
                else None
            )
        else:
            dims.append(_window(size, kernel[k], strides[k], pads[k], pads[spatial + k], dilations[k], ceil))
    return [(x[0], channels, *dims)]


_POOLS = frozenset({"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "max_pool1d", "avg_pool1d"})


def _conv(call: Call, context: _Context) -> list[Shape] | None:
    x = call.inputs[0].shape
    w = call.shape("weight")
    if x is None or w is None:
        return None
    name = _op_name(call) if call.is_torch else ""
    transposed = "transpose" in name or (name.endswith("convolution") and bool(call.arg("transposed")))
    groups = int((call.arg("groups") if call.is_torch else call.arg("group")) or 1)
    channels = w[1] * groups if transposed and isinstance(w[1], int) else (None if transposed else w[0])
    kernel = [int(k) for k in w[2:]]
    return _conv_like(call, x, channels, kernel, transposed)


def _onnx_conv_transpose(call: Call, context: _Context) -> list[Shape] | None:
    x, w = call.inputs[0].shape, call.inputs[1].shape
    if x is None or w is None or call.arg("output_shape") is not None:
        return None
    groups = int(call.arg("group") or 1)
    return _conv_like(call, x, w[1] * groups, [int(k) for k in w[2:]], transposed=True)


def _pool(call: Call, context: _Context) -> list[Shape] | None:
    x = call.inputs[0].shape
    if x is None:
        return None
    name = _op_name(call) if call.is_torch else ""
    if name.startswith(("adaptive", "_adaptive")):
        size = call.ints("output_size")
        if size is None:
            return None
        spatial = x[len(x) - len(size) :]
        return [tuple(x[: len(x) - len(size)]) + tuple(d if s is None else s for s, d in zip(size, spatial))]
    kernel = call.ints("kernel_size") if call.is_torch else call.ints("kernel_shape")
    if kernel is None:
        return None
    kernel = _ints(kernel, len(x) - 2, 1)
    shapes = _conv_like(call, x, x[1], kernel)
    return None if shapes is None else shapes * max(1, len(call.outputs))


def _pad(call: Call, context: _Context) -> list[Shape] | None:
    x = call.inputs[0].shape
    if x is None:
        return None
    rank = len(x)
    if call.is_torch:
        pads = call.ints("pad")
        if pads is None:
            return None
        extra = {rank - 1 - k: pads[2 * k] + pads[2 * k + 1] for k in range(len(pads) // 2)}
    else:
        pads = context.ints(call.inputs[1])
        axes = (
            context.ints(call.inputs[3])
            if len(call.inputs) > 3 and call.inputs[3] is not None
            else list(range(rank))
        )
        if pads is None or axes is None:
            return None
        extra = {a % rank: pads[k] + pads[k + len(axes)] for k, a in enumerate(axes)}
    return [
        tuple(
            d + extra.get(a, 0) if isinstance(d, int) else (d if not extra.get(a) else None)
            for a, d in enumerate(x)
        )
    ]


def _gather_nd(call: Call, context: _Context) -> list[Shape] | None:
    data, indices = call.inputs[0].shape, call.inputs[1].shape
    if data is None or indices is None or not isinstance(indices[-1], int):
        return None
    batch = int(call.arg("batch_dims") or 0)
    return [tuple(indices[:-1]) + tuple(data[batch + indices[-1] :])]


def _constant(call: Call, context: _Context) -> list[Shape] | None:
    value = call.attrs.get("value")
    value = getattr(value, "value", value)
    if value is not None:
        return [tuple(int(d) for d in value.shape)]
    for name, shape in (("value_int", ()), ("value_float", ()), ("value_ints", None), ("value_floats", None)):
        if name in call.attrs:
            found = call.arg(name)
            return [shape if shape is not None else (len(found),)]
    return None


def _constant_of_shape(call: Call, context: _Context) -> list[Shape] | None:
    dims = context.elements(call.inputs[0])
    return None if dims is None else [tuple(dims)]


def _shape_op(call: Call, context: _Context) -> list[Shape] | None:
    shape = call.inputs[0].shape
    if shape is None:
        return None
    start, end = call.arg("start"), call.arg("end")
    return [(len(shape[slice(start or 0, end)]),)]


def _size_op(call: Call, context: _Context) -> list[Shape] | None:
    return [()]


def _same_shape(call: Call, context: _Context) -> list[Shape] | None:
    """Ops whose output has their first input's shape (cumsum, roll) but no axis map."""
    return [call.inputs[0].shape] if call.inputs[0].shape is not None else None


def _torch_new(call: Call, context: _Context) -> list[Shape] | None:
    """zeros, ones, full, new_ones ...: the size argument; *_like: the input's shape."""
    name = _op_name(call)
    if name.endswith("_like"):
        return [call.inputs[0].shape]
    size = call.arg("size") if call.has("size") else _arg_values(call)[1 if name.startswith("new_") else 0]
    dims = context.elements(size)
    return None if dims is None else [tuple(dims)]


def _arange(call: Call, context: _Context) -> list[Shape] | None:
    values = call._resolve(tuple(call.attrs.get("args") or ()))
    kwargs = call.attrs.get("kwargs") or {}
    values += tuple(call._resolve(kwargs[k]) for k in ("start", "end", "step") if k in kwargs)
    bounds = [context.elements(v) for v in values]
    if any(b is None for b in bounds) or not 1 <= len(bounds) <= 3:
        return None
    bounds = [b[0] for b in bounds]
    if len(bounds) == 1:
        return [(bounds[0],)]
    start, end = bounds[:2]
    step = bounds[2] if len(bounds) == 3 else 1
    if not all(isinstance(b, (int, float)) for b in (start, end, step)):
        return [(end,)] if start == 0 and step == 1 else None
    return [(max(0, math.ceil((end - start) / step)),)]


def _index(call: Call, context: _Context) -> list[Shape] | None:
    """x[i0, i1, ...] with index tensors (None: a full axis): the indices broadcast together,
    in place when they are adjacent, else first."""
    x = call.inputs[0].shape
    indices = call.arg("indices")
    if x is None or indices is None:
        return None
    indices = list(indices)
    positions = [k for k, v in enumerate(indices) if v is not None]
    shapes = [indices[k].shape for k in positions]
    if any(s is None for s in shapes) or any(getattr(indices[k], "dtype", None) == "bool" for k in positions):
        return None
    middle = _broadcast(*shapes)
    rest = list(x[len(indices) :])
    if positions == list(range(positions[0], positions[-1] + 1)):
        return [tuple(x[: positions[0]]) + middle + tuple(x[positions[-1] + 1 : len(indices)]) + tuple(rest)]
    return [middle + tuple(d for k, d in enumerate(x[: len(indices)]) if indices[k] is None) + tuple(rest)]


def _stack(call: Call, context: _Context) -> list[Shape] | None:
    """The new axis counts the stacked tensors."""
    return _from_axes(call, len(call.input_indices("tensors")))


def _scalar(call: Call, context: _Context) -> list[Shape] | None:
    """sym_size and friends return Python numbers, not tensors: no shape to give."""
    return [None] * max(1, len(call.outputs))


_ONNX_RULES: dict[str, Rule] = {
    "Reshape": _onnx_reshape,
    "Expand": _onnx_expand,
    "Slice": _onnx_slice,
    "Split": _onnx_split,
    "Concat": _concat,
    "Conv": _conv,
    "ConvTranspose": _onnx_conv_transpose,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "Pad": _pad,
    "GatherND": _gather_nd,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape_op,
    "Size": _size_op,
    "Unsqueeze Flatten": _axes_rule(1),
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceSumSquare": _axes_rule(1),
    "GlobalAveragePool GlobalMaxPool": _axes_rule(1),
    "LayerNormalization SimplifiedLayerNormalization RMSNormalization SkipLayerNormalization": _axes_rule(1),
}
_TORCH_RULES: dict[str, Rule] = {
    "view reshape _unsafe_view view_as": _torch_reshape,
    "expand expand_as": _torch_expand,
    "slice narrow": _torch_slice,
    "split split_with_sizes chunk": _torch_split,
    "cat concat concatenate": _concat,
    "stack": _stack,
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution": _conv,
    "max_pool2d max_pool2d_with_indices avg_pool2d adaptive_avg_pool2d adaptive_avg_pool1d "
    "_adaptive_avg_pool2d": _pool,
    "pad constant_pad_nd": _pad,
    "sym_size size dim sym_numel numel": _scalar,
    "zeros ones full empty zeros_like ones_like full_like new_ones new_zeros": _torch_new,
    "arange": _arange,
    "index": _index,
    "roll cumsum": _same_shape,
    "unsqueeze flatten Flatten mean sum amax amin var std var_mean": _axes_rule(1),
    "layer_norm native_layer_norm rms_norm _fused_rms_norm": _axes_rule(1),
}


def _table(rules: dict[str, Rule]) -> dict[str, Rule]:
    return {name: rule for names, rule in rules.items() for name in names.split()}


_ONNX_BY_NAME = _table(_ONNX_RULES)
_TORCH_BY_NAME = _table(_TORCH_RULES)


def _infer(node: Any, context: _Context) -> list[tuple[Shape, str | None]] | str:
    """(shape, dtype) per output, or why the node is left alone."""
    call = call_of(node)
    if call is None:
        return "opaque: no entry in the op table"
    name = _op_name(call) if call.is_torch else node.op_type
    rule = (_TORCH_BY_NAME if call.is_torch else _ONNX_BY_NAME).get(name)
    if rule is None and call.info.axes is None:
        return "no shape rule"
    try:
        shapes = rule(call, context) if rule is not None else _from_axes(call)
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return f"rule failed: {exc}"
    if shapes is None or len(shapes) != len(node.outputs):
        return "inputs' shapes or constant arguments unknown"
    if rule is _scalar:
        return [(None, None)] * len(node.outputs)
    return [(shape, _dtype(call, node, k)) for k, shape in enumerate(shapes)]
