"""The op table: what every op the frontends produce means, in one place.

Analysis and passes ask `op_info(node)` instead of matching op names. An `OpInfo` gives the op's
kind, the role of each input by position (data, weight, bias, norm scale and shift, running
statistics, shape operands ...), its structural attributes, whether a node may be removed or
reordered (`pure`), and an axis map: where every axis of every output comes from, which a
channel-pruning pass follows as (value, axis, index set). An op without an entry is opaque:
`op_info` returns None and callers treat the node as a barrier (and as impure); they never guess.

Entries are keyed by (domain, name):
- ONNX nodes (domains "", "ai.onnx" and "com.microsoft") by op_type; inputs by position.
- torch nodes (domain "torch", see `rescompile.frontends.torch`) by the target's base name:
  `aten.linear.default`, `torch.nn.functional.linear` and the `linear` method share "linear", and
  arguments follow the aten schema. Python functions whose signature is not aten's have entries of
  their own under their qualified name (`torch.nn.functional.batch_norm` takes the running statistics
  before the affine parameters), and leaf modules are keyed by class name (their weights are not
  node inputs). A torch node's inputs are only its tensor arguments; roles given by argument
  position are mapped to input positions through the node's argument template.

This module does not import torch: ONNX work never does.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from rescompile.ir._kinds import OpKind, ParamSlots

__all__ = [
    "Arg",
    "AxisMap",
    "Call",
    "Contract",
    "Group",
    "InputSlot",
    "Keep",
    "Lookup",
    "Merge",
    "New",
    "Normalize",
    "Offset",
    "OpInfo",
    "Reduce",
    "Role",
    "Select",
    "Slice",
    "Split",
    "Window",
    "axis_map",
    "call_of",
    "input_roles",
    "is_pure",
    "kind_of_onnx_op",
    "onnx_entry",
    "onnx_param_slots",
    "op_info",
    "param_slots",
    "torch_call",
    "torch_entry",
    "torch_op_name",
]


class Role(enum.Enum):
    """What an input is to its op."""

    DATA = "data"  # the tensor(s) the op transforms
    WEIGHT = "weight"  # multiplies the data in a weighted op (or a slope: PRelu)
    BIAS = "bias"
    SCALE = "scale"  # a norm's per-channel gain
    SHIFT = "shift"  # a norm's per-channel shift
    RUNNING_MEAN = "running_mean"
    RUNNING_VAR = "running_var"
    SHAPE = "shape"  # a shape given as values
    LIKE = "like"  # read for its shape or dtype only (expand_as, type_as, CastLike)
    INDICES = "indices"  # positions looked up (Gather, embedding ids)
    AXES = "axes"
    STARTS = "starts"
    ENDS = "ends"
    STEPS = "steps"
    SIZES = "sizes"  # split sizes, tile repeats
    MASK = "mask"  # a boolean selector (Where's condition)
    SCALAR = "scalar"  # a scalar operand: clip bounds, dropout ratio, quantization scales


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of an op, in signature order.

    `role` is None for arguments that are never tensors (dim, groups, eps); `variadic` marks the last
    argument as taking every remaining position (Concat's inputs, `x.view(2, 3, 4)`).
    """

    name: str
    role: Role | None = None
    default: Any = None
    variadic: bool = False


# ----- axis maps ---------------------------------------------------------------------------------
# Each output axis lists its sources: where its indices come from. `input` is an IR input position.
@dataclasses.dataclass(frozen=True)
class Keep:
    """Output index k is index k of `axis` of `input` (elementwise, broadcast, transpose). Where the
    output axis is shorter (a split's first piece), the input's further indices are not in it."""

    input: int
    axis: int


@dataclasses.dataclass(frozen=True)
class Slice:
    """Output index k is index `start + step * k` of `axis` of `input` (Slice, a Split piece)."""

    input: int
    axis: int
    start: int
    step: int = 1


@dataclasses.dataclass(frozen=True)
class Offset:
    """Index j of `axis` of `input` is output index `offset + j` (one operand of a Concat, padding);
    indices that land past the output's end (padding that also crops) are not in it."""

    input: int
    axis: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Merge:
    """The output axis is the row-major merge of input `axes` with `sizes` (flatten C x H x W)."""

    input: int
    axes: tuple[int, ...]
    sizes: tuple


@dataclasses.dataclass(frozen=True)
class Split:
    """The output axis is factor `part` of input `axes` (merged row-major) split into `sizes`
    (hidden -> heads x head_dim: part 0 is heads, part 1 head_dim)."""

    input: int
    axes: tuple[int, ...]
    sizes: tuple
    part: int


@dataclasses.dataclass(frozen=True)
class Group:
    """Output index o reads block `o // (out_size / groups)` of `axis` of `input`, cut into `groups`
    equal blocks (a grouped convolution's input channels)."""

    input: int
    axis: int
    groups: int


@dataclasses.dataclass(frozen=True)
class Window:
    """Output index k reads a window of `axis` of `input` (spatial axes of conv and pooling)."""

    input: int
    axis: int


@dataclasses.dataclass(frozen=True)
class New:
    """No input axis maps here: a size-1 axis (unsqueeze, keepdims), a broadcast (expand), stack's
    axis, or an axis made from values (Shape, constants) or from a leaf module's own weight."""


# Input axes that do not map index-to-index onto an output axis but still shape the result.
@dataclasses.dataclass(frozen=True)
class Contract:
    """These (input, axis) pairs are multiplied index by index and summed (MatMul's K, a conv's
    input channels against weight axis 1). With `groups` > 1, the first operand's axis is cut into
    `groups` blocks, each contracted with the other operands for the outputs of its group."""

    operands: tuple[tuple[int, int], ...]
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Reduce:
    """`axis` of `input` is reduced to one value (mean, sum, global pooling)."""

    input: int
    axis: int


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Values along `axis` of `input` are normalised together (norm statistics, softmax); the axis
    itself is kept and listed as a source of its output axis."""

    input: int
    axis: int


@dataclasses.dataclass(frozen=True)
class Lookup:
    """Rows of `axis` of `input` are picked by the values of input `indices` (embedding, Gather)."""

    input: int
    axis: int
    indices: int


@dataclasses.dataclass(frozen=True)
class Select:
    """One `index` of `axis` of `input` is taken and the axis dropped (select, unbind, x[:, 0])."""

    input: int
    axis: int
    index: int


Source = Keep | Slice | Offset | Merge | Split | Group | Window | New
Mix = Contract | Reduce | Normalize | Lookup | Select


@dataclasses.dataclass(frozen=True)
class AxisMap:
    """Where the axes of a node's outputs come from.

    `outputs[o][a]` lists the sources of axis `a` of output `o` (an elementwise op lists every
    operand that is not broadcast along the axis). For a torch op that returns a tuple or list as
    one IR value, `outputs` has one entry per element. `mixes` lists input axes that are combined
    rather than mapped (contracted, reduced, normalised, looked up, selected). Axes are
    non-negative.
    """

    outputs: tuple[tuple[tuple[Source, ...], ...], ...]
    mixes: tuple[Mix, ...] = ()


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What an op means.

    Attributes:
        kind: the normalized kind analysis reasons in.
        args: the op's arguments in signature order (ONNX: its inputs; torch: the aten schema).
        attributes: the structural attributes (ONNX attributes, non-tensor torch arguments, a leaf
            module's fields) passes may read or must respect: axis, perm, groups, normalized_shape.
        axes: computes the node's `AxisMap` from its arguments and input shapes (None: unknown).
        pure: False for ops that mutate a tensor or draw random numbers: never removed or reordered.
        impure_when: for ops pure only in some calls: true when this call mutates or is random
            (dropout in training, batch norm updating running statistics, `inplace=True`).
        weight_out_axis: the axis of the WEIGHT input that indexes output channels (a callable when
            it depends on attributes; None where no single axis does), for scaling outputs through
            parameters.
    """

    kind: OpKind
    args: tuple[Arg, ...] = ()
    attributes: tuple[str, ...] = ()
    axes: Callable[[Call], AxisMap | None] | None = None
    pure: bool = True
    impure_when: Callable[[Call], bool] | None = None
    weight_out_axis: int | Callable[[Call], int | None] | None = None


# ----- reading a node through its entry ----------------------------------------------------------
_ABSENT = object()
# What the torch frontend keeps in a node's attrs besides lifted arguments.
_TEMPLATE_KEYS = frozenset({"fx_op", "target", "args", "kwargs", "module", "returns_tuple"})


def _is_slot(obj: Any) -> bool:
    """The torch frontend's argument templates hold, in place of each tensor argument, a dataclass
    whose only field is `index`, the IR input position."""
    return (
        dataclasses.is_dataclass(obj)
        and not isinstance(obj, type)
        and [f.name for f in dataclasses.fields(obj)] == ["index"]
    )


def _is_attribute_ref(obj: Any) -> bool:
    """The torch frontend may lift a constant argument into the node's attributes, leaving in the
    template a dataclass whose only field is `name`, the attribute's name."""
    return (
        dataclasses.is_dataclass(obj)
        and not isinstance(obj, type)
        and [f.name for f in dataclasses.fields(obj)] == ["name"]
    )


def _slots_in(obj: Any) -> Iterator[int]:
    if _is_slot(obj):
        yield obj.index
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _slots_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _slots_in(item)


class Call:
    """A node read through its entry: arguments by name, the same way for ONNX attributes and
    inputs, torch call arguments and leaf-module fields. Tensor arguments come back as IR values."""

    def __init__(self, info: OpInfo, domain: str, attrs: dict, inputs: tuple, outputs: tuple) -> None:
        self.info = info
        self.domain = domain
        self.attrs = attrs
        self.inputs = inputs
        self.outputs = outputs
        self._positions = {arg.name: i for i, arg in enumerate(info.args)}

    @property
    def is_torch(self) -> bool:
        return self.domain == "torch"

    def _raw(self, name: str) -> Any:
        if self.is_torch:
            kwargs = self.attrs.get("kwargs") or {}
            if name in kwargs:
                return kwargs[name]
            position = self._positions.get(name)
            args = self.attrs.get("args") or ()
            if position is not None and position < len(args):
                return tuple(args[position:]) if self.info.args[position].variadic else args[position]
            module = self.attrs.get("module")
            if module is not None and position is None:
                return getattr(module, name, _ABSENT)
            return self.attrs.get(name, _ABSENT) if name not in _TEMPLATE_KEYS else _ABSENT
        if name in self.attrs:
            return getattr(self.attrs[name], "value", self.attrs[name])
        position = self._positions.get(name)
        if position is None or position >= len(self.inputs):
            return _ABSENT
        if self.info.args[position].variadic:
            return tuple(self.inputs[position:])
        return _ABSENT if self.inputs[position] is None else self.inputs[position]

    def _resolve(self, obj: Any) -> Any:
        if _is_slot(obj):
            return self.inputs[obj.index]
        if _is_attribute_ref(obj):
            return self._resolve(self.attrs.get(obj.name))
        if isinstance(obj, list):
            return [self._resolve(item) for item in obj]
        if isinstance(obj, tuple):
            return tuple(self._resolve(item) for item in obj)
        return obj

    def has(self, name: str) -> bool:
        return self._raw(name) is not _ABSENT

    def arg(self, name: str) -> Any:
        """The argument's value (an IR value for a tensor), or its default."""
        raw = self._raw(name)
        if raw is _ABSENT:
            position = self._positions.get(name)
            return None if position is None else self.info.args[position].default
        return self._resolve(raw)

    def input_indices(self, name: str) -> list[int]:
        """IR input positions the argument occupies (several for a list or variadic argument)."""
        if self.is_torch:
            raw = self._raw(name)
            return [] if raw is _ABSENT else list(_slots_in(raw))
        position = self._positions.get(name)
        if position is None or position >= len(self.inputs):
            return []
        stop = len(self.inputs) if self.info.args[position].variadic else position + 1
        return [i for i in range(position, stop) if self.inputs[i] is not None]

    def role_name(self, role: Role) -> str:
        """The name of the first argument with `role` ('' when none has it)."""
        return next((arg.name for arg in self.info.args if arg.role is role), "")

    def input_index(self, name: str) -> int | None:
        indices = self.input_indices(name)
        return indices[0] if len(indices) == 1 else None

    def shape(self, name: str) -> tuple | None:
        index = self.input_index(name)
        return None if index is None else self.inputs[index].shape

    def replace_ints(self, name: str, edit: Callable[[int, int], int]) -> dict | None:
        """The node's attrs with integer argument `name` rewritten entry by entry, `edit(position,
        old) -> new` (a scalar is position 0); entries that are not ints (symbolic sizes held as
        inputs) stay. Covers torch arguments, lifted or in the template, and ONNX attributes; None
        where the argument is absent or is an input (an ONNX tensor the caller replaces)."""
        attrs = dict(self.attrs)
        if not self.is_torch:
            if name not in attrs:
                return None
            attrs[name] = _edit_ints(getattr(attrs[name], "value", attrs[name]), edit)
            return attrs
        args, kwargs = list(attrs.get("args") or ()), dict(attrs.get("kwargs") or {})
        position = self._positions.get(name)
        if name in kwargs:
            holder, key = kwargs, name
        elif (
            position is not None
            and position < len(args)
            and (
                not self.info.args[position].variadic
                or isinstance(args[position], (list, tuple))
                or _is_attribute_ref(args[position])
            )
        ):
            holder, key = args, position  # one argument, or a variadic one given as one list
        elif position is not None and position < len(args):
            args[position:] = _edit_ints(tuple(args[position:]), edit)
            attrs.update(args=tuple(args), kwargs=kwargs)
            return attrs
        else:
            return None
        raw = holder[key]
        if _is_attribute_ref(raw):
            attrs[raw.name] = _edit_ints(attrs.get(raw.name), edit)
        else:
            holder[key] = _edit_ints(raw, edit)
        attrs.update(args=tuple(args), kwargs=kwargs)
        return attrs

    def with_kwarg(self, name: str, value: Any) -> dict:
        """The node's attrs with torch keyword argument `name` set to the constant `value` (an
        argument the call left at its default, which a pass must now pin)."""
        attrs = dict(self.attrs)
        attrs["kwargs"] = {**dict(attrs.get("kwargs") or {}), name: value}
        return attrs

    def ints(self, name: str) -> list[int] | None:
        """An integer (list) argument whose every entry is known: Python values, a constant input,
        or an ONNX input the graph computes from static sizes (the legacy exporter's chunk slices
        at Mul(Div(Add(Gather(Shape(x), axis), 1), 2), k)); None where an entry is a symbol or
        unknown."""
        value = self.arg(name)
        if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
            value = value[0]  # x.view((2, 3)) as well as x.view(2, 3)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return [value]
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value] if all(isinstance(v, int) for v in value) else None
        array = _constant_array(value)
        if array is not None:
            return [int(v) for v in array.reshape(-1)]
        if self.is_torch:
            # NOTE: torch frontends give static sizes as Python ints already, and a pass can
            # rewrite only those (`replace_ints` leaves a computed entry as it is), so a computed
            # torch argument stays unknown.
            return None
        from rescompile.ir.shapes import static_ints  # shapes imports this module

        return static_ints(value)


def _is_int(obj: Any) -> bool:
    return isinstance(obj, (int, np.integer)) and not isinstance(obj, bool)


def _edit_ints(obj: Any, edit: Callable[[int, int], int]) -> Any:
    """`obj` (an int or a list/tuple of ints and other entries) with each int entry edited."""
    if _is_int(obj):
        return edit(0, int(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(edit(k, int(x)) if _is_int(x) else x for k, x in enumerate(obj))
    return obj


def _constant_array(value: Any) -> np.ndarray | None:
    """The payload of a constant IR value (an initializer or a Constant node's output)."""
    payload = getattr(value, "payload", None)
    producer = getattr(value, "producer", None)
    if (
        payload is None
        and producer is not None
        and producer.op_type == "Constant"
        and "value" in producer.attrs
    ):
        payload = getattr(producer.attrs["value"], "value", producer.attrs["value"])
    if payload is None:
        return None
    if hasattr(payload, "numpy") and not isinstance(payload, np.ndarray):
        payload = payload.numpy()
    return np.asarray(payload)


# ----- lookup ------------------------------------------------------------------------------------
_ONNX_DOMAINS = ("", "ai.onnx", "com.microsoft")


def torch_op_name(fx_op: str, target: Any, module: Any = None) -> str:
    """The key of a torch call in the table: a qualified name for Python functions that have their
    own entry, else the base name ('linear' for aten.linear.default, F.linear and Tensor.linear),
    and the class name for leaf modules."""
    if fx_op == "call_module":
        return type(module).__name__
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return target.__name__
    qualified = f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', None)}"
    if qualified in _TORCH:
        return qualified
    return getattr(target, "__name__", type(target).__name__)


def onnx_entry(op_type: str) -> OpInfo | None:
    return _ONNX.get(op_type)


def torch_entry(fx_op: str, target: Any, module: Any = None) -> OpInfo | None:
    return _TORCH.get(torch_op_name(fx_op, target, module))


def op_info(node) -> OpInfo | None:
    """The entry for `node`; None means the op is opaque."""
    if node.domain in _ONNX_DOMAINS:
        return _ONNX.get(node.op_type)
    if node.domain == "torch":
        attrs = node.attrs
        return torch_entry(attrs.get("fx_op", "call_function"), attrs.get("target"), attrs.get("module"))
    return None


def call_of(node) -> Call | None:
    info = op_info(node)
    return None if info is None else Call(info, node.domain, node.attrs, node.inputs, node.outputs)


def axis_map(node) -> AxisMap | None:
    """Where each axis of each output of `node` comes from; None when the op is opaque or its
    shapes or constant arguments are not known."""
    call = call_of(node)
    if call is None or call.info.axes is None:
        return None
    return call.info.axes(call)


def input_roles(node) -> tuple[Role | None, ...] | None:
    """The role of each IR input of `node` (None for one the entry gives no role); None if opaque."""
    call = call_of(node)
    if call is None:
        return None
    roles: list[Role | None] = [None] * len(node.inputs)
    for arg in call.info.args:
        if arg.role is not None:
            for index in call.input_indices(arg.name):
                roles[index] = arg.role
    return tuple(roles)


def is_pure(node) -> bool:
    """Whether `node` may be removed when unused or reordered: opaque ops are not."""
    call = call_of(node)
    if call is None or not call.info.pure:
        return False
    return call.info.impure_when is None or not call.info.impure_when(call)


def param_slots(call: Call) -> ParamSlots | None:
    """Where the parameters that scale a call's first output are, in IR input positions."""
    info = call.info

    def first(role: Role) -> int | None:
        for arg in info.args:
            if arg.role is role:
                indices = call.input_indices(arg.name)
                return indices[0] if indices else None
        return None

    roles = {arg.role for arg in info.args}
    if Role.WEIGHT in roles and info.weight_out_axis is not None:
        axis = info.weight_out_axis(call) if callable(info.weight_out_axis) else info.weight_out_axis
        if axis is None:
            return None
        return ParamSlots(weight=first(Role.WEIGHT), weight_out_axis=axis, bias=first(Role.BIAS))
    if Role.SCALE in roles:
        return ParamSlots(gain=first(Role.SCALE), shift=first(Role.SHIFT))
    return None


# ----- axis-map helpers --------------------------------------------------------------------------
def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _make_map(*outputs: list, mixes: tuple = ()) -> AxisMap:
    """An AxisMap from one list of per-axis sources per output."""
    return AxisMap(tuple(tuple(tuple(axis) for axis in out) for out in outputs), tuple(mixes))


def _keep_all(index: int, rank: int) -> list[tuple[Source, ...]]:
    return [(Keep(index, a),) for a in range(rank)]


def _broadcast(shapes: dict[int, tuple]) -> list[tuple[Source, ...]]:
    """Numpy broadcasting: every operand not of size 1 along an output axis is a source of it."""
    rank = max((len(s) for s in shapes.values()), default=0)
    axes = []
    for out_axis in range(rank):
        sources, ones = [], []
        for index, shape in shapes.items():
            axis = out_axis - (rank - len(shape))
            if axis >= 0:
                (ones if shape[axis] == 1 else sources).append(Keep(index, axis))
        axes.append(tuple(sources or ones))
    return axes


def _output_count(call: Call) -> int:
    """Outputs to describe: the IR node's, or the elements of a torch op's tuple held in one value."""
    if call.is_torch and not call.attrs.get("returns_tuple"):
        return torch_tuple_outputs(call)
    return max(1, len(call.outputs))


def _elementwise(call: Call) -> AxisMap | None:
    """Every tensor input broadcast against the others; every output has the broadcast shape."""
    shapes = {i: v.shape for i, v in enumerate(call.inputs) if v is not None}
    if any(s is None for s in shapes.values()):
        return None
    return _make_map(*[_broadcast(shapes)] * _output_count(call))


def _unary(call: Call) -> AxisMap | None:
    """Only the data input maps to the output (the rest are scalars or read for metadata)."""
    index = call.input_indices(call.info.args[0].name)
    shape = call.inputs[index[0]].shape if len(index) == 1 else None
    if shape is None:
        return None
    return _make_map(*[_keep_all(index[0], len(shape))] * _output_count(call))


def _new_values(call: Call) -> AxisMap:
    """Outputs made from values or shapes alone (Shape, constants, zeros_like)."""
    return _make_map(*[[(New(),)] * len(out.shape or ()) for out in call.outputs])


def _matmul_axes(
    a: int, a_shape: tuple, b: int, b_shape: tuple, extra: dict[int, tuple] | None = None
) -> AxisMap:
    """numpy.matmul: batch axes broadcast, a's last axis contracted with b's second to last
    (b's only axis when 1-D); `extra` are operands added to the result (addmm's bias)."""
    ra, rb = len(a_shape), len(b_shape)
    batch = _broadcast({a: a_shape[:-2], b: b_shape[:-2]}) if ra > 1 and rb > 1 else []
    if ra > 1 and rb == 1:
        batch = _keep_all(a, ra - 2) if ra > 2 else []
    if rb > 1 and ra == 1:
        batch = _keep_all(b, rb - 2) if rb > 2 else []
    axes = list(batch)
    if ra > 1:
        axes.append((Keep(a, ra - 2),))
    if rb > 1:
        axes.append((Keep(b, rb - 1),))
    contract = Contract(((a, ra - 1), (b, rb - 2 if rb > 1 else 0)))
    if extra:
        added = _broadcast({**extra, -1: tuple([None] * len(axes))})
        axes = [axis + tuple(s for s in extra_axis if s.input != -1) for axis, extra_axis in zip(axes, added)]
    return _make_map(axes, mixes=(contract,))


def _matmul(call: Call) -> AxisMap | None:
    a, b = (call.info.args[0].name, call.info.args[1].name)
    ia, ib = call.input_index(a), call.input_index(b)
    if ia is None or ib is None or call.shape(a) is None or call.shape(b) is None:
        return None
    return _matmul_axes(ia, call.shape(a), ib, call.shape(b))


def _qlinear_matmul(call: Call) -> AxisMap | None:
    if len(call.inputs) < 4 or call.inputs[0] is None or call.inputs[3] is None:
        return None
    a, b = call.inputs[0].shape, call.inputs[3].shape
    return None if a is None or b is None else _matmul_axes(0, a, 3, b)


def _gemm(call: Call) -> AxisMap | None:
    """Y = alpha * A' @ B' + beta * C, A' and B' optionally transposed, C broadcast to (M, N)."""
    a, b, c = call.shape("A"), call.shape("B"), call.shape("C")
    if a is None or b is None or (call.has("C") and c is None):
        return None
    ta, tb = bool(call.arg("transA")), bool(call.arg("transB"))
    axes = [[Keep(0, 1 if ta else 0)], [Keep(1, 0 if tb else 1)]]
    if c is not None:
        for out_axis, sources in enumerate(_broadcast({2: c, -1: (None, None)})):
            axes[out_axis] += [s for s in sources if s.input != -1]
    return _make_map(axes, mixes=(Contract(((0, 0 if ta else 1), (1, 1 if tb else 0))),))


def _linear(call: Call) -> AxisMap | None:
    """y = x @ W.T + b: x's last axis contracted with W's axis 1; the output's last axis is W's rows."""
    x, w = call.shape("input"), call.shape("weight")
    ix, iw, ib = call.input_index("input"), call.input_index("weight"), call.input_index("bias")
    if x is None or w is None or ix is None or iw is None:
        return None
    last = [Keep(iw, 0)] + ([Keep(ib, 0)] if ib is not None else [])
    return _make_map(_keep_all(ix, len(x) - 1) + [last], mixes=(Contract(((ix, len(x) - 1), (iw, 1))),))


def _addmm(call: Call) -> AxisMap | None:
    """self + mat1 @ mat2 (addmm, baddbmm)."""
    names = [arg.name for arg in call.info.args[:3]]
    indices = [call.input_index(n) for n in names]
    shapes = [call.shape(n) for n in names]
    if None in indices[1:] or None in shapes[1:]:
        return None
    extra = {indices[0]: shapes[0]} if indices[0] is not None and shapes[0] is not None else None
    return _matmul_axes(indices[1], shapes[1], indices[2], shapes[2], extra)


def _leaf_linear(call: Call) -> AxisMap | None:
    shape = call.shape("input")
    if shape is None:
        return None
    return _make_map(_keep_all(0, len(shape) - 1) + [(New(),)], mixes=(Contract(((0, len(shape) - 1),)),))


def _conv_axes(
    call: Call, x: int, x_shape: tuple, w: int | None, b: int | None, groups: int, transposed: bool
) -> AxisMap | None:
    """(N, C, *spatial) -> (N, O, *spatial'): output channels from the weight's out axis (0, or 1
    when transposed) and the bias; input channels contracted with the weight's in axis (1, or 0
    when transposed), by group. A depthwise conv with as many outputs as inputs maps channel c to c."""
    rank = len(x_shape)
    in_channels = x_shape[1]
    out_channels = call.outputs[0].shape[1] if call.outputs and call.outputs[0].shape else None
    channel: list[Source] = []
    if w is not None and (groups == 1 or not transposed):
        channel.append(Keep(w, 1 if transposed else 0))
    elif w is not None:
        return None  # a grouped transposed conv's output channel is (group, weight axis 1): not one axis
    if b is not None:
        channel.append(Keep(b, 0))
    if groups > 1:
        depthwise = groups == in_channels and out_channels == in_channels
        channel.append(Keep(x, 1) if depthwise else Group(x, 1, groups))
    operands = ((x, 1),) + (((w, 0 if transposed else 1),) if w is not None else ())
    axes = [(Keep(x, 0),), tuple(channel) or (New(),)] + [(Window(x, a),) for a in range(2, rank)]
    return _make_map(axes, mixes=(Contract(operands, groups),))


def _conv(call: Call, transposed: bool | None = None) -> AxisMap | None:
    """transposed: fixed by the op, or None to read aten.convolution's `transposed` argument."""
    x = call.shape(call.info.args[0].name)
    ix = call.input_index(call.info.args[0].name)
    if x is None or ix is None:
        return None
    groups = call.arg("groups") if call.is_torch else call.arg("group")
    transposed = bool(call.arg("transposed")) if transposed is None else transposed
    return _conv_axes(
        call, ix, x, call.input_index("weight"), call.input_index("bias"), int(groups or 1), transposed
    )


def _leaf_conv(call: Call) -> AxisMap | None:
    x = call.shape("input")
    if x is None:
        return None
    return _conv_axes(call, 0, x, None, None, int(call.arg("groups") or 1), bool(call.arg("transposed")))


def _norm(
    call: Call, normalized: list[int], channel_axes: list[int], stats: list[tuple[Source, ...]] | None = None
) -> AxisMap | None:
    """The output has the input's axes; each per-channel parameter (scale, shift, running
    statistics, bias) is a source of the axes it spans, aligned to the end of `channel_axes`;
    statistics are taken over `normalized` axes. Outputs after the first (ONNX Mean and InvStdDev,
    a torch op's saved statistics) have the axes `stats`."""
    data = call.info.args[0].name
    x, ix = call.shape(data), call.input_index(data)
    if x is None or ix is None:
        return None
    axes = [list(sources) for sources in _keep_all(ix, len(x))]
    for arg in call.info.args[1:]:
        index = call.input_index(arg.name)
        if index is None or arg.role not in (
            Role.DATA,
            Role.SCALE,
            Role.SHIFT,
            Role.BIAS,
            Role.RUNNING_MEAN,
            Role.RUNNING_VAR,
        ):
            continue
        shape = call.shape(arg.name)
        if shape is None:
            return None
        if arg.role is Role.DATA:  # SkipLayerNormalization's skip: a second operand
            for out_axis, sources in enumerate(_broadcast({index: shape, -1: x})):
                axes[out_axis] += [s for s in sources if s.input == index]
            continue
        for k, a in enumerate(channel_axes[len(channel_axes) - len(shape) :]):
            if shape[k] != 1:
                axes[a].append(Keep(index, k))
    if stats is None:
        stats = [(Keep(ix, a),) if a not in normalized else (New(),) for a in range(len(x))]
    outputs = [axes] + [stats] * (_output_count(call) - 1)
    return _make_map(*outputs, mixes=tuple(Normalize(ix, a) for a in normalized))


def _last_axes_norm(call: Call) -> AxisMap | None:
    """Layer / RMS norm: statistics over the last axes (ONNX `axis` on, or torch normalized_shape)."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    if call.is_torch:
        shape = call.ints("normalized_shape")
        if shape is None:
            return None
        first = len(x) - len(shape)
    else:
        first = _axis(int(call.arg("axis") if call.arg("axis") is not None else -1), len(x))
    axes = list(range(first, len(x)))
    return _norm(call, axes, axes)


def _skip_layer_norm(call: Call) -> AxisMap | None:
    """com.microsoft SkipLayerNormalization: layer norm of input + skip (+ bias); output 3, when
    present, is that sum before the norm."""
    result = _last_axes_norm(call)
    if result is None or len(result.outputs) < 4:
        return result
    summed = tuple(
        tuple(s for s in sources if isinstance(s, Keep) and s.input in (0, 1, 4))
        for sources in result.outputs[0]
    )
    return AxisMap(result.outputs[:3] + (summed,) + result.outputs[4:], result.mixes)


def torch_tuple_outputs(call: Call) -> int:
    """How many tensors a torch op returns in one IR value (1 for a plain tensor)."""
    return _TUPLE_OUTPUTS.get(_op_name(call), 1)


def _channel_norm(call: Call, family: str) -> AxisMap | None:
    """Batch / instance / group norm: per-channel parameters on axis 1. Batch norm normalises over
    every other axis in training only (running statistics otherwise); instance norm over the spatial
    axes; group norm over channels (within groups) and spatial axes."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    rank = len(x)
    if family == "batch":
        training = bool(call.arg("training") if call.is_torch else call.arg("training_mode"))
        normalized = [a for a in range(rank) if a != 1] if training else []
        stats = [(Keep(call.input_index(call.info.args[0].name), 1),)]  # per-channel statistics
    elif family == "instance":
        normalized, stats = list(range(2, rank)), None
    else:
        normalized, stats = (
            list(range(1, rank)),
            [(Keep(call.input_index(call.info.args[0].name), 0),), (New(),)],
        )
    return _norm(call, normalized, [1], stats)


def _lp_norm(call: Call) -> AxisMap | None:
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    dim = call.arg("dim") if call.is_torch else call.arg("axis")
    return _norm(call, [_axis(int(dim), len(x))], [])


def _softmax(call: Call) -> AxisMap | None:
    """Normalises along one axis (ONNX's `axis` is -1 unless given, as since opset 13)."""
    x = call.shape(call.info.args[0].name)
    dim = call.arg("dim") if call.is_torch else call.arg("axis")
    dim = -1 if dim is None and not call.is_torch else dim
    if x is None or dim is None:
        return None
    ix = call.input_index(call.info.args[0].name)
    return _make_map(_keep_all(ix, len(x)), mixes=(Normalize(ix, _axis(int(dim), len(x))),))


def _monomial(dim: Any) -> tuple[int, tuple[str, ...]] | None:
    """A size as coefficient and symbols: 12 -> (12, ()), '4*s1' -> (4, ('s1',)); None otherwise."""
    if isinstance(dim, int) and dim > 0:
        return dim, ()
    if not isinstance(dim, str):
        return None
    coefficient, symbols = 1, []
    for factor in dim.replace(" ", "").split("*"):
        if factor.isdigit():
            coefficient *= int(factor)
        elif factor.isidentifier():
            symbols.append(factor)
        else:
            return None
    return coefficient, tuple(sorted(symbols))


def _times(a: tuple[int, tuple[str, ...]], b: tuple[int, tuple[str, ...]]) -> tuple[int, tuple[str, ...]]:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _smaller(a: tuple[int, tuple[str, ...]], b: tuple[int, tuple[str, ...]]) -> bool:
    """Whether a group of product `a` must take in more axes to reach product `b`."""
    if not a[1] and not b[1]:
        return a[0] < b[0]
    rest = list(b[1])
    for symbol in a[1]:
        if symbol not in rest:
            return False
        rest.remove(symbol)
    return b[0] % a[0] == 0


def _reshape_sources(shape_in: tuple, shape_out: tuple) -> list[tuple[Source, ...]] | None:
    """Row-major reshape of input 0: equal leading and trailing axes are kept, the middle is matched
    by products into merges and splits; size-1 axes come and go."""
    out: list[tuple[Source, ...] | None] = [None] * len(shape_out)
    i, j = 0, 0
    while (
        i < len(shape_in) and j < len(shape_out) and shape_in[i] == shape_out[j] and shape_in[i] is not None
    ):
        out[j] = (Keep(0, i),)
        i, j = i + 1, j + 1
    ei, ej = len(shape_in), len(shape_out)
    while ei > i and ej > j and shape_in[ei - 1] == shape_out[ej - 1] and shape_in[ei - 1] is not None:
        out[ej - 1] = (Keep(0, ei - 1),)
        ei, ej = ei - 1, ej - 1
    middle_in = [a for a in range(i, ei) if shape_in[a] != 1]
    middle_out = list(range(j, ej))
    for b in middle_out:
        if shape_out[b] == 1:
            out[b] = (New(),)
    middle_out = [b for b in middle_out if shape_out[b] != 1]
    if len(middle_in) == 1 and middle_out:
        sizes = tuple(shape_out[b] for b in middle_out)
        for part, b in enumerate(middle_out):
            out[b] = (
                (Keep(0, middle_in[0]),)
                if len(middle_out) == 1
                else (Split(0, (middle_in[0],), sizes, part),)
            )
        return out
    if len(middle_out) == 1 and middle_in:
        out[middle_out[0]] = (Merge(0, tuple(middle_in), tuple(shape_in[a] for a in middle_in)),)
        return out
    if not middle_in and not middle_out:
        return out
    dims_in = {a: _monomial(shape_in[a]) for a in middle_in}
    dims_out = {b: _monomial(shape_out[b]) for b in middle_out}
    if None in dims_in.values() or None in dims_out.values():
        return None
    # Several axes on both sides: cut into groups of equal products, growing the side whose product
    # is smaller (with symbolic sizes such as '4*s1': divides the other's).
    while middle_in and middle_out:
        group_in, group_out = [middle_in.pop(0)], [middle_out.pop(0)]
        p_in, p_out = dims_in[group_in[0]], dims_out[group_out[0]]
        while p_in != p_out:
            if _smaller(p_in, p_out) and middle_in:
                group_in.append(middle_in.pop(0))
                p_in = _times(p_in, dims_in[group_in[-1]])
            elif _smaller(p_out, p_in) and middle_out:
                group_out.append(middle_out.pop(0))
                p_out = _times(p_out, dims_out[group_out[-1]])
            else:
                return None
        in_sizes = tuple(shape_in[a] for a in group_in)
        out_sizes = tuple(shape_out[b] for b in group_out)
        for part, b in enumerate(group_out):
            if len(group_in) == 1 and len(group_out) == 1:
                out[b] = (Keep(0, group_in[0]),)
            elif len(group_out) == 1:
                out[b] = (Merge(0, tuple(group_in), in_sizes),)
            else:
                out[b] = (Split(0, tuple(group_in), out_sizes, part),)
    return None if middle_in or middle_out or any(o is None for o in out) else out


def _onnx_target_shape(call: Call, shape_in: tuple) -> tuple | None:
    """Reshape's target from its constant shape input (0 copies a dim unless allowzero, -1 infers)."""
    target = call.ints("shape")
    if target is None:
        return None
    dims = [shape_in[k] if d == 0 and not call.arg("allowzero") else d for k, d in enumerate(target)]
    if -1 in dims:
        known = [d for d in dims if d != -1]
        if not all(isinstance(d, int) for d in list(shape_in) + known):
            return None
        dims[dims.index(-1)] = math.prod(shape_in) // max(1, math.prod(known))
    return tuple(dims)


def _reshape(call: Call) -> AxisMap | None:
    shape_in = call.shape(call.info.args[0].name)
    shape_out = call.outputs[0].shape if call.outputs else None
    if shape_in is None:
        return None
    if shape_out is None and not call.is_torch:
        shape_out = _onnx_target_shape(call, shape_in)
    if shape_out is None:
        return None
    sources = _reshape_sources(tuple(shape_in), tuple(shape_out))
    return None if sources is None else _make_map(sources)


def _merge_range(index: int, shape: tuple, start: int, stop: int) -> tuple[Source, ...]:
    if stop - start == 1:
        return (Keep(index, start),)
    if stop == start:
        return (New(),)
    return (Merge(index, tuple(range(start, stop)), tuple(shape[start:stop])),)


def _as_reshape(call: Call, x: tuple) -> AxisMap | None:
    """Flatten and unflatten are reshapes: with both shapes known, read them as Reshape reads them,
    so that size-1 axes come and go the same way in both frontends (a merge or split part of size
    1 carries no channel; blocking it as an inner factor would block the group it joins)."""
    out = call.outputs[0].shape if call.outputs else None
    if out is None or any(d is None for d in tuple(x) + tuple(out)):
        return None
    sources = _reshape_sources(tuple(x), tuple(out))
    return None if sources is None else _make_map(sources)


def _flatten(call: Call) -> AxisMap | None:
    """ONNX Flatten(axis) -> 2-D; torch flatten(start_dim, end_dim) merges that range."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    static = _as_reshape(call, x)
    if static is not None:
        return static
    rank = len(x)
    if not call.is_torch:
        axis = _axis(int(call.arg("axis") if call.arg("axis") is not None else 1), rank)
        return _make_map([_merge_range(0, x, 0, axis), _merge_range(0, x, axis, rank)])
    if rank == 0:
        return _make_map([(New(),)])
    start, end = _axis(int(call.arg("start_dim")), rank), _axis(int(call.arg("end_dim")), rank)
    return _make_map(
        _keep_all(0, start)
        + [_merge_range(0, x, start, end + 1)]
        + [(Keep(0, a),) for a in range(end + 1, rank)]
    )


def _unflatten(call: Call) -> AxisMap | None:
    x, out = call.shape(call.info.args[0].name), call.outputs[0].shape if call.outputs else None
    if x is None or out is None:
        return None
    static = _as_reshape(call, x)
    if static is not None:
        return static
    dim = _axis(int(call.arg("dim")), len(x))
    parts = len(out) - len(x) + 1
    sizes = tuple(out[dim : dim + parts])
    middle = [(Split(0, (dim,), sizes, p),) for p in range(parts)] if parts > 1 else [(Keep(0, dim),)]
    return _make_map(_keep_all(0, dim) + middle + [(Keep(0, a),) for a in range(dim + 1, len(x))])


def _permutation(call: Call, rank: int) -> list[int] | None:
    name = _op_name(call) if call.is_torch else "Transpose"
    if name == "Transpose":
        perm = call.arg("perm")
        return list(reversed(range(rank))) if perm is None else [_axis(int(p), rank) for p in perm]
    if name == "t":
        return list(reversed(range(rank)))
    if name == "transpose":
        a, b = _axis(int(call.arg("dim0")), rank), _axis(int(call.arg("dim1")), rank)
        perm = list(range(rank))
        perm[a], perm[b] = b, a
        return perm
    if name == "permute":
        dims = call.ints("dims")
        return None if dims is None else [_axis(d, rank) for d in dims]
    source, destination = call.ints("source"), call.ints("destination")  # movedim
    if source is None or destination is None:
        return None
    source = [_axis(s, rank) for s in source]
    destination = [_axis(d, rank) for d in destination]
    rest = iter(a for a in range(rank) if a not in source)
    by_destination = dict(zip(destination, source))
    return [by_destination[d] if d in by_destination else next(rest) for d in range(rank)]


def _transpose(call: Call) -> AxisMap | None:
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    perm = _permutation(call, len(x))
    return None if perm is None else _make_map([(Keep(0, p),) for p in perm])


def _squeeze(call: Call) -> AxisMap | None:
    """Drop size-1 axes (the listed ones, or all): the rest are kept in order."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    dims = call.ints("axes") if not call.is_torch else call.ints("dim")
    if dims is None and (call.has("axes") or call.has("dim")):
        return None
    dropped = {_axis(d, len(x)) for d in dims} if dims else {a for a, d in enumerate(x) if d == 1}
    dropped = {a for a in dropped if x[a] == 1}
    return _make_map([(Keep(0, a),) for a in range(len(x)) if a not in dropped])


def _unsqueeze(call: Call) -> AxisMap | None:
    x = call.shape(call.info.args[0].name)
    dims = call.ints("axes") if not call.is_torch else call.ints("dim")
    if x is None or dims is None:
        return None
    rank = len(x) + len(dims)
    new = {_axis(d, rank) if not call.is_torch else (d if d >= 0 else d + rank) for d in dims}
    kept = iter(range(len(x)))
    return _make_map([(New(),) if a in new else (Keep(0, next(kept)),) for a in range(rank)])


def _expand(call: Call) -> AxisMap | None:
    """Broadcast to a larger shape: axes of size 1 stretched (or prepended) are new."""
    x = call.shape(call.info.args[0].name)
    out = call.outputs[0].shape if call.outputs else None
    if x is None or out is None:
        return None
    lead = len(out) - len(x)
    return _make_map(
        [
            (New(),) if a < lead or (x[a - lead] == 1 and out[a] != 1) else (Keep(0, a - lead),)
            for a in range(len(out))
        ]
    )


def _repeat(call: Call) -> AxisMap | None:
    """Tile / repeat: axes repeated once are kept; repeating an axis is not index-to-index (opaque)."""
    x = call.shape(call.info.args[0].name)
    repeats = call.ints("repeats")
    if x is None or repeats is None or any(r != 1 for r in repeats[len(repeats) - len(x) :]):
        return None
    lead = len(repeats) - len(x)
    return _make_map([(New(),) if a < lead else (Keep(0, a - lead),) for a in range(len(repeats))])


def _repeat_interleave(call: Call) -> AxisMap | None:
    """repeat_interleave(x, r, dim): output index o of `dim` is input index o // r, each input
    index owning r consecutive outputs (GQA's key/value heads repeated for their query heads):
    a Group with one input index per block. Tensor repeats or no dim: opaque."""
    x = call.shape("self")
    repeats, dim = call.arg("repeats"), call.arg("dim")
    if x is None or not isinstance(repeats, int) or dim is None or call.arg("output_size") is not None:
        return None
    axis = _axis(int(dim), len(x))
    if not isinstance(x[axis], int):
        return None
    return _make_map([(Group(0, a, x[a]),) if a == axis else (Keep(0, a),) for a in range(len(x))])


def _concat(call: Call) -> AxisMap | None:
    """Each operand sits at an offset along the axis; other axes are shared."""
    name = call.info.args[0].name
    indices = call.input_indices(name)
    shapes = [call.inputs[i].shape for i in indices]
    if not shapes or any(s is None for s in shapes):
        return None
    rank = len(shapes[0])
    axis = _axis(int(call.arg("dim") if call.is_torch else call.arg("axis")), rank)
    axes: list[tuple[Source, ...]] = []
    for a in range(rank):
        if a != axis:
            axes.append(tuple(Keep(i, a) for i in indices))
            continue
        offset, pieces = 0, []
        for i, shape in zip(indices, shapes):
            if not isinstance(offset, int):
                return None
            pieces.append(Offset(i, a, offset))
            offset = offset + shape[a] if isinstance(shape[a], int) else None
        axes.append(tuple(pieces))
    return _make_map(axes)


def _stack(call: Call) -> AxisMap | None:
    indices = call.input_indices("tensors")
    shapes = [call.inputs[i].shape for i in indices]
    if not shapes or any(s is None for s in shapes):
        return None
    rank = len(shapes[0]) + 1
    dim = _axis(int(call.arg("dim")), rank)
    axes = [
        tuple(Keep(i, a if a < dim else a - 1) for i in indices) if a != dim else (New(),)
        for a in range(rank)
    ]
    return _make_map(axes)


def _pieces(call: Call, x: tuple, axis: int, sizes: list[int]) -> AxisMap:
    outs, start = [], 0
    for size in sizes:
        outs.append(
            [(Slice(0, axis, start),) if a == axis and start else (Keep(0, a),) for a in range(len(x))]
        )
        start += size
    return _make_map(*outs)


def _split(call: Call) -> AxisMap | None:
    """Consecutive slices along an axis, one per output (ONNX) or per element (torch)."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    rank = len(x)
    if call.is_torch:
        name = _op_name(call)
        axis = _axis(int(call.arg("dim")), rank)
        size = x[axis]
        if not isinstance(size, int):
            return None
        if name == "chunk":
            chunks = int(call.arg("chunks"))
            step = -(-size // chunks)
            sizes = [min(step, size - k) for k in range(0, size, step)]
        else:
            given = call.ints("split_size_or_sections" if name == "split" else "split_sizes")
            if given is None:
                return None
            sizes = (
                given
                if len(given) > 1 or name == "split_with_sizes"
                else [min(given[0], size - k) for k in range(0, size, given[0])]
            )
        return _pieces(call, x, axis, sizes)
    axis = _axis(int(call.arg("axis") or 0), rank)
    sizes = call.ints("split")
    if sizes is None:
        count, size = len(call.outputs), x[axis]
        if not isinstance(size, int):
            return None
        step = -(-size // count)
        sizes = [min(step, size - k) for k in range(0, size, step)]
    return _pieces(call, x, axis, sizes)


def _slice_start(start: int | None, step: int, size: Any) -> int | None:
    """The first index a slice reads, clamped as numpy does; None when it needs an unknown size."""
    if start is None:
        return 0 if step > 0 else (size - 1 if isinstance(size, int) else None)
    if start < 0:
        return max(start + size, 0) if isinstance(size, int) else None
    if isinstance(size, int):
        return min(start, size if step > 0 else size - 1)
    return start


def _slice(call: Call) -> AxisMap | None:
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    rank = len(x)
    if call.is_torch:
        cuts = {_axis(int(call.arg("dim")), rank): (call.arg("start"), int(call.arg("step") or 1))}
    else:
        starts, axes = call.ints("starts"), call.ints("axes")
        steps = call.ints("steps") or ([1] * len(starts or []))
        if starts is None or (call.has("axes") and axes is None):
            return None
        axes = axes if axes is not None else list(range(len(starts)))
        cuts = {_axis(a, rank): (s, st) for a, s, st in zip(axes, starts, steps)}
    axes_out = []
    for a in range(rank):
        if a not in cuts:
            axes_out.append((Keep(0, a),))
            continue
        start, step = cuts[a]
        if start is not None and not isinstance(start, int):
            return None
        first = _slice_start(start, step, x[a])
        if first is None:
            return None
        axes_out.append((Keep(0, a),) if first == 0 and step == 1 else (Slice(0, a, first, step),))
    return _make_map(axes_out)


def _narrow(call: Call) -> AxisMap | None:
    x = call.shape("self")
    start = call.arg("start")
    if x is None or not isinstance(start, int):
        return None
    axis = _axis(int(call.arg("dim")), len(x))
    first = start + x[axis] if start < 0 and isinstance(x[axis], int) else start
    if first < 0:
        return None
    return _make_map([(Slice(0, a, first),) if a == axis and first else (Keep(0, a),) for a in range(len(x))])


def _select(call: Call) -> AxisMap | None:
    x = call.shape("self")
    index = call.arg("index")
    if x is None or not isinstance(index, int):
        return None
    axis = _axis(int(call.arg("dim")), len(x))
    if index < 0:
        if not isinstance(x[axis], int):
            return None
        index += x[axis]
    return _make_map([(Keep(0, a),) for a in range(len(x)) if a != axis], mixes=(Select(0, axis, index),))


def _unbind(call: Call) -> AxisMap | None:
    x = call.shape("self")
    if x is None:
        return None
    axis = _axis(int(call.arg("dim")), len(x))
    if not isinstance(x[axis], int):
        return None
    kept = [(Keep(0, a),) for a in range(len(x)) if a != axis]
    return _make_map(*[kept] * x[axis], mixes=tuple(Select(0, axis, k) for k in range(x[axis])))


def _gather(call: Call) -> AxisMap | None:
    """data[..., indices, ...]: the indexed axis is replaced by the indices' axes."""
    data_name, index_name = call.info.args[0].name, call.info.args[1].name
    x, idx = call.shape(data_name), call.shape(index_name)
    ix, ii = call.input_index(data_name), call.input_index(index_name)
    if x is None or idx is None or ix is None or ii is None:
        return None
    axis = _axis(int(call.arg("axis") or 0), len(x))
    axes = _keep_all(ix, axis) + _keep_all(ii, len(idx)) + [(Keep(ix, a),) for a in range(axis + 1, len(x))]
    return _make_map(axes, mixes=(Lookup(ix, axis, ii),))


def _gather_elements(call: Call) -> AxisMap | None:
    """out[i][j] = data[index[i][j]][j] along `axis`: the output has the index's shape."""
    data_name, index_name = call.info.args[0].name, call.role_name(Role.INDICES)
    x, idx = call.shape(data_name), call.shape(index_name)
    ix, ii = call.input_index(data_name), call.input_index(index_name)
    if x is None or idx is None or ix is None or ii is None:
        return None
    axis = _axis(int(call.arg("dim") if call.is_torch else (call.arg("axis") or 0)), len(x))
    axes = [(Keep(ii, a),) if a == axis else (Keep(ix, a), Keep(ii, a)) for a in range(len(idx))]
    return _make_map(axes, mixes=(Lookup(ix, axis, ii),))


def _index_select(call: Call) -> AxisMap | None:
    x, ix, ii = call.shape("self"), call.input_index("self"), call.input_index("index")
    if x is None or ix is None or ii is None:
        return None
    axis = _axis(int(call.arg("dim")), len(x))
    return _make_map(
        [(Keep(ix, a),) if a != axis else (New(),) for a in range(len(x))], mixes=(Lookup(ix, axis, ii),)
    )


def _embedding(call: Call) -> AxisMap | None:
    """table[ids]: the ids' axes, then the table's columns; the table's rows are looked up."""
    ids_name = call.role_name(Role.INDICES)
    ids, iw, ii = (
        call.shape(ids_name),
        call.input_index(call.role_name(Role.WEIGHT)),
        call.input_index(ids_name),
    )
    if ids is None or ii is None:
        return None
    last = (Keep(iw, 1),) if iw is not None else (New(),)
    mixes = (Lookup(iw, 0, ii),) if iw is not None else ()
    return _make_map(_keep_all(ii, len(ids)) + [last], mixes=mixes)


def _getitem(call: Call) -> AxisMap | None:
    """operator.getitem: picking element k of a tuple-valued op maps its output's axes to the same
    axes of that element (`Keep(0, a)`); indexing a tensor with ints, slices, None and ... is mapped;
    indexing with tensors is not."""
    source = call.inputs[0] if call.inputs else None
    key = call.arg("b")
    out = call.outputs[0].shape if call.outputs else None
    if source is None:
        return None
    if source.shape is None:
        return None if out is None else _make_map(_keep_all(0, len(out)))
    x = source.shape
    key = key if isinstance(key, tuple) else (key,)
    if any(
        not (k is None or k is Ellipsis or isinstance(k, (int, slice))) or isinstance(k, bool) for k in key
    ):
        return None
    explicit = sum(1 for k in key if k is not None and k is not Ellipsis)
    expanded: list = []
    for k in key:
        expanded.extend([slice(None)] * (len(x) - explicit) if k is Ellipsis else [k])
    expanded += [slice(None)] * (len(x) - sum(1 for k in expanded if k is not None))
    axes, mixes, a = [], [], 0
    for k in expanded:
        if k is None:
            axes.append((New(),))
            continue
        if isinstance(k, int):
            index = k + x[a] if k < 0 and isinstance(x[a], int) else k
            if index < 0:
                return None
            mixes.append(Select(0, a, index))
        else:
            if not all(v is None or isinstance(v, int) for v in (k.start, k.stop, k.step)):
                return None
            step = k.step or 1
            first = _slice_start(k.start, step, x[a])
            if first is None:
                return None
            axes.append((Keep(0, a),) if first == 0 and step == 1 else (Slice(0, a, first, step),))
        a += 1
    return _make_map(axes, mixes=tuple(mixes))


def _reduce(call: Call) -> AxisMap | None:
    """Reduced axes disappear, or stay as size 1 with keepdims."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    rank = len(x)
    if call.is_torch:
        dims, keep = call.ints("dim"), bool(call.arg("keepdim"))
        if dims is None and call.arg("dim") is not None:
            return None
    else:
        dims = call.ints("axes")
        keep = bool(call.arg("keepdims") if call.arg("keepdims") is not None else 1)
        if dims is None and call.has("axes"):
            return None
        if not dims and call.arg("noop_with_empty_axes"):
            return _make_map(_keep_all(0, rank))
    reduced = {_axis(d, rank) for d in dims} if dims else set(range(rank))
    axes = [(New(),) if a in reduced else (Keep(0, a),) for a in range(rank) if keep or a not in reduced]
    outputs = [axes] * _output_count(call)
    return _make_map(*outputs, mixes=tuple(Reduce(0, a) for a in sorted(reduced)))


def _global_pool(call: Call) -> AxisMap | None:
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    return _make_map(
        [(Keep(0, 0),), (Keep(0, 1),)] + [(New(),)] * (len(x) - 2),
        mixes=tuple(Reduce(0, a) for a in range(2, len(x))),
    )


def _pool(call: Call) -> AxisMap | None:
    """Windows over the trailing spatial axes (all but the batch and channel ones); adaptive pooling to
    size 1 is a global pooling."""
    x = call.shape(call.info.args[0].name)
    if x is None:
        return None
    spatial = _SPATIAL_RANK.get(_op_name(call))
    first = len(x) - spatial if spatial is not None else 2
    adaptive = call.ints("output_size") if call.has("output_size") else None
    if adaptive is not None and all(s == 1 for s in adaptive):
        axes = _keep_all(0, first) + [(New(),)] * (len(x) - first)
        return _make_map(axes, mixes=tuple(Reduce(0, a) for a in range(first, len(x))))
    axes = _keep_all(0, first) + [(Window(0, a),) for a in range(first, len(x))]
    return _make_map(*[axes] * _output_count(call))


def _pad(call: Call) -> AxisMap | None:
    """Constant padding: input index j of a padded axis is output index `before + j` (a negative
    `before` crops). torch lists (before, after) pairs from the last axis; ONNX all befores, then all
    afters, over `axes` (default: every axis). Reflect and replicate padding are not mapped."""
    x = call.shape(call.info.args[0].name)
    pads = call.ints("pad") if call.is_torch else call.ints("pads")
    mode = call.arg("mode")
    if x is None or pads is None or (mode is not None and mode not in ("constant", b"constant")):
        return None
    rank = len(x)
    if call.is_torch:
        before = {rank - 1 - k: pads[2 * k] for k in range(len(pads) // 2)}
    else:
        axes = call.ints("axes") if call.has("axes") else list(range(rank))
        if axes is None:
            return None
        before = {_axis(a, rank): pads[k] for k, a in enumerate(axes)}
    axes_out = []
    for a in range(rank):
        b = before.get(a, 0)
        axes_out.append((Keep(0, a),) if b == 0 else (Offset(0, a, b),) if b > 0 else (Slice(0, a, -b),))
    return _make_map(axes_out)


def _einsum(call: Call) -> AxisMap | None:
    """Parse an explicit equation without ellipsis: output letters map to operand axes, letters
    shared by operands and absent from the output are contracted, single ones reduced."""
    equation = call.arg("equation")
    indices = call.input_indices(call.info.args[-1].name)
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != len(indices):
        return None
    axes = [tuple(Keep(i, term.index(c)) for i, term in zip(indices, terms) if c in term) for c in output]
    mixes: list[Mix] = []
    for c in dict.fromkeys("".join(terms)):
        if c in output:
            continue
        operands = tuple((i, term.index(c)) for i, term in zip(indices, terms) if c in term)
        mixes.append(Contract(operands) if len(operands) > 1 else Reduce(*operands[0]))
    return _make_map(axes, mixes=tuple(mixes))


def _sdpa(call: Call) -> AxisMap | None:
    """softmax(q @ k^T + mask) @ v: (..., L, E) x (..., S, E) x (..., S, Ev) -> (..., L, Ev)."""
    q, k, v = call.shape("query"), call.shape("key"), call.shape("value")
    iq, ik, iv = call.input_index("query"), call.input_index("key"), call.input_index("value")
    if None in (q, k, v, iq, ik, iv):
        return None
    r = len(q)
    batch_shapes = {iq: q[:-2], ik: k[:-2], iv: v[:-2]}
    rows = [Keep(iq, r - 2)]
    keys = [(ik, r - 2), (iv, r - 2)]
    # An additive mask or bias [..., L, S] (T5's relative position bias carries the heads axis):
    # its leading axes broadcast with the batch axes, L is the query's, S the keys'.
    im, mask = call.input_index("attn_mask"), call.shape("attn_mask")
    if im is not None and mask is not None and len(mask) >= 2:
        batch_shapes[im] = mask[:-2]
        if mask[-2] != 1:
            rows.append(Keep(im, len(mask) - 2))
        if mask[-1] != 1:
            keys.append((im, len(mask) - 1))
    axes = _broadcast(batch_shapes) + [tuple(rows), (Keep(iv, r - 1),)]
    mixes = (Contract(((iq, r - 1), (ik, r - 1))), Contract(tuple(keys)), Normalize(ik, r - 2))
    return _make_map(axes, mixes=mixes)


def _op_name(call: Call) -> str:
    """A torch call's key in the table ('' for ONNX nodes)."""
    if call.is_torch:
        return torch_op_name(call.attrs.get("fx_op", ""), call.attrs.get("target"), call.attrs.get("module"))
    return ""


# ----- the ONNX table ----------------------------------------------------------------------------
def _flag(name: str) -> Callable[[Call], bool]:
    """Impure when boolean argument (or module field) `name` is true."""
    return lambda call: bool(call.arg(name))


def _instance_stats(call: Call) -> bool:
    """Instance norm updates running statistics when it has them and normalises by the input's own."""
    return bool(call.arg("use_input_stats")) and call.arg("running_mean") is not None


def _onnx_training(call: Call) -> bool:
    """ONNX Dropout is random unless its training_mode input is absent or a constant false."""
    if not call.has("training_mode"):
        return False
    array = _constant_array(call.arg("training_mode"))
    return array is None or bool(array.any())


def _gemm_weight_axis(call: Call) -> int | None:
    if call.arg("transA"):
        return None
    return 0 if call.arg("transB") else 1


def _transposed_weight_axis(call: Call) -> int | None:
    """A transposed conv's weight is (in, out / groups, ...): axis 1 holds the outputs only ungrouped."""
    groups = call.arg("groups") if call.is_torch else call.arg("group")
    return 1 if int(groups or 1) == 1 else None


def _convolution_weight_axis(call: Call) -> int | None:
    return _transposed_weight_axis(call) if call.arg("transposed") else 0


def _onnx_ops() -> dict[str, OpInfo]:
    data = Arg("X", Role.DATA)
    table: dict[str, OpInfo] = {}

    def add(names: str, info: OpInfo) -> None:
        for name in names.split():
            table[name] = info

    binary = (Arg("A", Role.DATA), Arg("B", Role.DATA))
    add("Add", OpInfo(OpKind.ADD, binary, axes=_elementwise))
    add("Sub", OpInfo(OpKind.SUB, binary, axes=_elementwise))
    add("Mul", OpInfo(OpKind.MUL, binary, axes=_elementwise))
    add("Div", OpInfo(OpKind.DIV, binary, axes=_elementwise))
    add("Sum", OpInfo(OpKind.ADD, (Arg("data_0", Role.DATA, variadic=True),), axes=_elementwise))
    add("Max Min Mean", OpInfo(OpKind.OTHER, (Arg("data_0", Role.DATA, variadic=True),), axes=_elementwise))
    add(
        "Where",
        OpInfo(
            OpKind.OTHER,
            (Arg("condition", Role.MASK), Arg("X", Role.DATA), Arg("Y", Role.DATA)),
            axes=_elementwise,
        ),
    )
    add(
        "MatMul",
        OpInfo(
            OpKind.WEIGHTED, (Arg("A", Role.DATA), Arg("B", Role.WEIGHT)), axes=_matmul, weight_out_axis=-1
        ),
    )
    add(
        "Gemm",
        OpInfo(
            OpKind.WEIGHTED,
            (Arg("A", Role.DATA), Arg("B", Role.WEIGHT), Arg("C", Role.BIAS)),
            ("transA", "transB"),
            _gemm,
            weight_out_axis=_gemm_weight_axis,
        ),
    )
    conv_attrs = ("group", "kernel_shape", "strides", "pads", "dilations", "auto_pad")
    conv_args = (data, Arg("weight", Role.WEIGHT), Arg("bias", Role.BIAS))
    add("Conv", OpInfo(OpKind.WEIGHTED, conv_args, conv_attrs, _conv, weight_out_axis=0))
    add(
        "ConvTranspose",
        OpInfo(
            OpKind.WEIGHTED,
            conv_args,
            conv_attrs + ("output_padding", "output_shape"),
            functools.partial(_conv, transposed=True),
            weight_out_axis=_transposed_weight_axis,
        ),
    )
    add("Einsum", OpInfo(OpKind.WEIGHTED, (Arg("Inputs", Role.DATA, variadic=True),), ("equation",), _einsum))
    add(
        "MatMulInteger",
        OpInfo(
            OpKind.WEIGHTED,
            (
                Arg("A", Role.DATA),
                Arg("B", Role.WEIGHT),
                Arg("a_zero_point", Role.SCALAR),
                Arg("b_zero_point", Role.SCALAR),
            ),
            axes=_matmul,
        ),
    )
    quantized = [Arg(n, Role.SCALAR) for n in ("a_scale", "a_zero_point")]
    add(
        "QLinearMatMul",
        OpInfo(
            OpKind.WEIGHTED,
            (
                Arg("a", Role.DATA),
                *quantized,
                Arg("b", Role.WEIGHT),
                *[Arg(n, Role.SCALAR) for n in ("b_scale", "b_zero_point", "y_scale", "y_zero_point")],
            ),
            axes=_qlinear_matmul,
        ),
    )
    add(
        "QLinearConv",
        OpInfo(
            OpKind.WEIGHTED,
            (
                Arg("x", Role.DATA),
                Arg("x_scale", Role.SCALAR),
                Arg("x_zero_point", Role.SCALAR),
                Arg("weight", Role.WEIGHT),
                *[Arg(n, Role.SCALAR) for n in ("w_scale", "w_zero_point", "y_scale", "y_zero_point")],
                Arg("bias", Role.BIAS),
            ),
            conv_attrs,
            _conv,
        ),
    )
    affine = (data, Arg("scale", Role.SCALE), Arg("B", Role.SHIFT))
    add("LayerNormalization", OpInfo(OpKind.NORM, affine, ("axis", "epsilon"), _last_axes_norm))
    add(
        "RMSNormalization SimplifiedLayerNormalization",
        OpInfo(OpKind.NORM, (data, Arg("scale", Role.SCALE)), ("axis", "epsilon"), _last_axes_norm),
    )
    add(
        "SkipLayerNormalization",
        OpInfo(
            OpKind.NORM,
            (
                data,
                Arg("skip", Role.DATA),
                Arg("gamma", Role.SCALE),
                Arg("beta", Role.SHIFT),
                Arg("bias", Role.BIAS),
            ),
            ("epsilon",),
            _skip_layer_norm,
        ),
    )
    add(
        "BatchNormalization",
        OpInfo(
            OpKind.NORM,
            affine + (Arg("input_mean", Role.RUNNING_MEAN), Arg("input_var", Role.RUNNING_VAR)),
            ("epsilon", "momentum", "training_mode"),
            functools.partial(_channel_norm, family="batch"),
        ),
    )
    add(
        "InstanceNormalization",
        OpInfo(OpKind.NORM, affine, ("epsilon",), functools.partial(_channel_norm, family="instance")),
    )
    add(
        "GroupNormalization",
        OpInfo(
            OpKind.NORM, affine, ("num_groups", "epsilon"), functools.partial(_channel_norm, family="group")
        ),
    )
    add("LpNormalization", OpInfo(OpKind.NORM, (data,), ("axis", "p"), _lp_norm))
    add(
        "Relu Gelu FastGelu Tanh Sigmoid Erf Elu Selu LeakyRelu HardSigmoid HardSwish Softplus Softsign Mish "
        "Swish Exp Log Sqrt Reciprocal Neg Abs Sin Cos Celu ThresholdedRelu",
        OpInfo(OpKind.ACTIVATION, (data,), axes=_unary),
    )
    add(
        "Clip",
        OpInfo(OpKind.ACTIVATION, (data, Arg("min", Role.SCALAR), Arg("max", Role.SCALAR)), axes=_unary),
    )
    add("PRelu", OpInfo(OpKind.ACTIVATION, (data, Arg("slope", Role.WEIGHT)), axes=_elementwise))
    add("Pow", OpInfo(OpKind.ACTIVATION, (data, Arg("Y", Role.DATA)), axes=_elementwise))
    add(
        "Reshape",
        OpInfo(OpKind.LAYOUT, (Arg("data", Role.DATA), Arg("shape", Role.SHAPE)), ("allowzero",), _reshape),
    )
    add("Transpose", OpInfo(OpKind.LAYOUT, (Arg("data", Role.DATA),), ("perm",), _transpose))
    add("Squeeze", OpInfo(OpKind.LAYOUT, (Arg("data", Role.DATA), Arg("axes", Role.AXES)), axes=_squeeze))
    add("Unsqueeze", OpInfo(OpKind.LAYOUT, (Arg("data", Role.DATA), Arg("axes", Role.AXES)), axes=_unsqueeze))
    add("Flatten", OpInfo(OpKind.LAYOUT, (Arg("input", Role.DATA),), ("axis",), _flatten))
    add("Expand", OpInfo(OpKind.LAYOUT, (Arg("input", Role.DATA), Arg("shape", Role.SHAPE)), axes=_expand))
    add("Tile", OpInfo(OpKind.LAYOUT, (Arg("input", Role.DATA), Arg("repeats", Role.SIZES)), axes=_repeat))
    add("DepthToSpace SpaceToDepth", OpInfo(OpKind.LAYOUT, (Arg("input", Role.DATA),), ("blocksize", "mode")))
    add("Concat", OpInfo(OpKind.CONCAT, (Arg("inputs", Role.DATA, variadic=True),), ("axis",), _concat))
    add(
        "Split",
        OpInfo(
            OpKind.SPLIT, (Arg("input", Role.DATA), Arg("split", Role.SIZES)), ("axis", "num_outputs"), _split
        ),
    )
    add(
        "Slice",
        OpInfo(
            OpKind.SPLIT,
            (
                Arg("data", Role.DATA),
                Arg("starts", Role.STARTS),
                Arg("ends", Role.ENDS),
                Arg("axes", Role.AXES),
                Arg("steps", Role.STEPS),
            ),
            axes=_slice,
        ),
    )
    gather_args = (Arg("data", Role.DATA), Arg("indices", Role.INDICES))
    add("Gather", OpInfo(OpKind.SPLIT, gather_args, ("axis",), _gather))
    add("GatherElements", OpInfo(OpKind.SPLIT, gather_args, ("axis",), _gather_elements))
    add("GatherND", OpInfo(OpKind.SPLIT, gather_args, ("batch_dims",)))
    add("Shape Size", OpInfo(OpKind.SHAPE, (Arg("data", Role.LIKE),), axes=_new_values))
    add("Constant", OpInfo(OpKind.CONSTANT, (), axes=_new_values))
    add("ConstantOfShape", OpInfo(OpKind.CONSTANT, (Arg("input", Role.SHAPE),), axes=_new_values))
    add(
        "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceSumSquare",
        OpInfo(OpKind.REDUCE, (Arg("data", Role.DATA), Arg("axes", Role.AXES)), ("keepdims",), _reduce),
    )
    add("GlobalAveragePool GlobalMaxPool", OpInfo(OpKind.REDUCE, (data,), axes=_global_pool))
    add("AveragePool MaxPool", OpInfo(OpKind.REDUCE, (data,), ("kernel_shape", "strides", "pads"), _pool))
    add(
        "Softmax LogSoftmax",
        OpInfo(
            OpKind.SOFTMAX,
            (Arg("input", Role.DATA),),
            ("axis",),
            _softmax,
        ),
    )
    add("Cast", OpInfo(OpKind.CAST, (Arg("input", Role.DATA),), ("to",), _unary))
    add(
        "CastLike", OpInfo(OpKind.CAST, (Arg("input", Role.DATA), Arg("target_type", Role.LIKE)), axes=_unary)
    )
    add("Identity", OpInfo(OpKind.IDENTITY, (Arg("input", Role.DATA),), axes=_unary))
    add(
        "Dropout",
        OpInfo(
            OpKind.IDENTITY,
            (Arg("data", Role.DATA), Arg("ratio", Role.SCALAR), Arg("training_mode", Role.SCALAR)),
            axes=_unary,
            impure_when=_onnx_training,
        ),
    )
    add(
        "Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Not",
        OpInfo(OpKind.OTHER, (Arg("A", Role.DATA), Arg("B", Role.DATA)), axes=_elementwise),
    )
    add("IsNaN IsInf", OpInfo(OpKind.OTHER, (data,), ("detect_negative", "detect_positive"), axes=_unary))
    add("Mod", OpInfo(OpKind.OTHER, (Arg("A", Role.DATA), Arg("B", Role.DATA)), ("fmod",), axes=_elementwise))
    add(
        "Pad",
        OpInfo(
            OpKind.OTHER,
            (
                Arg("data", Role.DATA),
                Arg("pads", Role.SIZES),
                Arg("constant_value", Role.SCALAR),
                Arg("axes", Role.AXES),
            ),
            ("mode",),
            _pad,
        ),
    )
    add("RandomNormal RandomUniform", OpInfo(OpKind.OTHER, pure=False))
    add(
        "RandomNormalLike RandomUniformLike Bernoulli Multinomial",
        OpInfo(OpKind.OTHER, (Arg("input", Role.LIKE),), pure=False),
    )
    return table


_ONNX = _onnx_ops()


# ----- the torch table ---------------------------------------------------------------------------
_TUPLE_OUTPUTS = {
    "native_layer_norm": 3,
    "_fused_rms_norm": 2,
    "native_batch_norm": 3,
    "_native_batch_norm_legit": 3,
    "_native_batch_norm_legit_no_training": 3,
    "_native_batch_norm_legit_functional": 5,
    "native_group_norm": 3,
    "native_dropout": 2,
    "max_pool2d_with_indices": 2,
    "var_mean": 2,
}
_SPATIAL_RANK = {
    "max_pool2d": 2,
    "max_pool2d_with_indices": 2,
    "avg_pool2d": 2,
    "adaptive_avg_pool2d": 2,
    "_adaptive_avg_pool2d": 2,
    "adaptive_avg_pool1d": 1,
    "MaxPool2d": 2,
    "AvgPool2d": 2,
    "AdaptiveAvgPool2d": 2,
}


def _torch_ops() -> dict[str, OpInfo]:
    """aten schemas by base name; Python functions with other signatures by qualified name; leaf
    modules by class name (their own weights are not inputs, their fields are attributes)."""
    table: dict[str, OpInfo] = {}

    def add(names: str, info: OpInfo) -> None:
        for name in names.split():
            table[name] = info

    this = Arg("self", Role.DATA)
    data = Arg("input", Role.DATA)
    binary = (this, Arg("other", Role.DATA), Arg("alpha"))
    for kind, pure_names, inplace_names in (
        (OpKind.ADD, "add __add__ __radd__", "add_ iadd __iadd__"),
        (OpKind.SUB, "sub rsub __sub__ __rsub__", "sub_"),
        (OpKind.MUL, "mul __mul__ __rmul__", "mul_"),
        (OpKind.DIV, "div truediv __truediv__", "div_"),
    ):
        add(pure_names, OpInfo(kind, binary, axes=_elementwise))
        add(inplace_names, OpInfo(kind, binary, axes=_elementwise, pure=False))

    # Weighted ops.
    add(
        "linear",
        OpInfo(
            OpKind.WEIGHTED,
            (data, Arg("weight", Role.WEIGHT), Arg("bias", Role.BIAS)),
            axes=_linear,
            weight_out_axis=0,
        ),
    )
    add(
        "addmm",
        OpInfo(
            OpKind.WEIGHTED,
            (
                Arg("self", Role.BIAS),
                Arg("mat1", Role.DATA),
                Arg("mat2", Role.WEIGHT),
                Arg("beta"),
                Arg("alpha"),
            ),
            axes=_addmm,
            weight_out_axis=1,
        ),
    )
    add(
        "baddbmm",
        OpInfo(
            OpKind.WEIGHTED,
            (
                Arg("self", Role.BIAS),
                Arg("batch1", Role.DATA),
                Arg("batch2", Role.WEIGHT),
                Arg("beta"),
                Arg("alpha"),
            ),
            axes=_addmm,
            weight_out_axis=-1,
        ),
    )
    add("mm", OpInfo(OpKind.WEIGHTED, (this, Arg("mat2", Role.WEIGHT)), axes=_matmul, weight_out_axis=1))
    add("bmm", OpInfo(OpKind.WEIGHTED, (this, Arg("mat2", Role.WEIGHT)), axes=_matmul, weight_out_axis=-1))
    add(
        "matmul __matmul__",
        OpInfo(OpKind.WEIGHTED, (this, Arg("other", Role.WEIGHT)), axes=_matmul, weight_out_axis=-1),
    )
    add("matmul_", OpInfo(OpKind.WEIGHTED, (this, Arg("other", Role.WEIGHT)), axes=_matmul, pure=False))
    conv = (data, Arg("weight", Role.WEIGHT), Arg("bias", Role.BIAS), Arg("stride"), Arg("padding"))
    add(
        "conv1d conv2d conv3d",
        OpInfo(
            OpKind.WEIGHTED,
            conv + (Arg("dilation"), Arg("groups", default=1)),
            ("stride", "padding", "dilation", "groups"),
            _conv,
            weight_out_axis=0,
        ),
    )
    add(
        "conv_transpose1d conv_transpose2d conv_transpose3d",
        OpInfo(
            OpKind.WEIGHTED,
            conv + (Arg("output_padding"), Arg("groups", default=1), Arg("dilation")),
            ("stride", "padding", "output_padding", "groups", "dilation"),
            functools.partial(_conv, transposed=True),
            weight_out_axis=_transposed_weight_axis,
        ),
    )
    add(
        "convolution _convolution",
        OpInfo(
            OpKind.WEIGHTED,
            conv
            + (
                Arg("dilation"),
                Arg("transposed", default=False),
                Arg("output_padding"),
                Arg("groups", default=1),
            ),
            ("stride", "padding", "dilation", "transposed", "output_padding", "groups"),
            _conv,
            weight_out_axis=_convolution_weight_axis,
        ),
    )
    add(
        "einsum",
        OpInfo(
            OpKind.WEIGHTED,
            (Arg("equation"), Arg("tensors", Role.DATA, variadic=True)),
            ("equation",),
            _einsum,
        ),
    )
    add("Linear", OpInfo(OpKind.WEIGHTED, (data,), ("in_features", "out_features"), _leaf_linear))
    add(
        "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d",
        OpInfo(
            OpKind.WEIGHTED, (data,), ("stride", "padding", "dilation", "groups", "transposed"), _leaf_conv
        ),
    )
    add("Bilinear", OpInfo(OpKind.WEIGHTED, (Arg("input1", Role.DATA), Arg("input2", Role.DATA))))

    # Norms, in aten argument order.
    layer = (data, Arg("normalized_shape"), Arg("weight", Role.SCALE), Arg("bias", Role.SHIFT), Arg("eps"))
    add("layer_norm native_layer_norm", OpInfo(OpKind.NORM, layer, ("normalized_shape",), _last_axes_norm))
    add(
        "rms_norm _fused_rms_norm",
        OpInfo(
            OpKind.NORM,
            (data, Arg("normalized_shape"), Arg("weight", Role.SCALE), Arg("eps")),
            ("normalized_shape",),
            _last_axes_norm,
        ),
    )
    batch_args = (
        data,
        Arg("weight", Role.SCALE),
        Arg("bias", Role.SHIFT),
        Arg("running_mean", Role.RUNNING_MEAN),
        Arg("running_var", Role.RUNNING_VAR),
    )
    batch_axes = functools.partial(_channel_norm, family="batch")
    training = (Arg("training", default=False), Arg("momentum"), Arg("eps"))
    # batch_norm and the _legit op update the running statistics in place when training.
    add(
        "batch_norm native_batch_norm _native_batch_norm_legit",
        OpInfo(OpKind.NORM, batch_args + training, ("training",), batch_axes, impure_when=_flag("training")),
    )
    add(
        "_native_batch_norm_legit_functional",
        OpInfo(OpKind.NORM, batch_args + training, ("training",), batch_axes),
    )
    add(
        "_native_batch_norm_legit_no_training",
        OpInfo(OpKind.NORM, batch_args + (Arg("momentum"), Arg("eps")), (), batch_axes),
    )
    add(
        "instance_norm",
        OpInfo(
            OpKind.NORM,
            batch_args + (Arg("use_input_stats", default=True), Arg("momentum"), Arg("eps")),
            ("use_input_stats",),
            functools.partial(_channel_norm, family="instance"),
            impure_when=_instance_stats,
        ),
    )
    add(
        "group_norm",
        OpInfo(
            OpKind.NORM,
            (data, Arg("num_groups"), Arg("weight", Role.SCALE), Arg("bias", Role.SHIFT), Arg("eps")),
            ("num_groups",),
            functools.partial(_channel_norm, family="group"),
        ),
    )
    add(
        "native_group_norm",
        OpInfo(
            OpKind.NORM,
            (
                data,
                Arg("weight", Role.SCALE),
                Arg("bias", Role.SHIFT),
                Arg("N"),
                Arg("C"),
                Arg("HxW"),
                Arg("group"),
                Arg("eps"),
            ),
            ("group",),
            functools.partial(_channel_norm, family="group"),
        ),
    )
    add(
        "normalize",
        OpInfo(
            OpKind.NORM, (data, Arg("p", default=2.0), Arg("dim", default=1), Arg("eps")), ("dim",), _lp_norm
        ),
    )
    add("LayerNorm RMSNorm", OpInfo(OpKind.NORM, (data,), ("normalized_shape",), _last_axes_norm))
    # A module in training mode with running statistics updates them.
    add(
        "BatchNorm1d BatchNorm2d BatchNorm3d",
        OpInfo(
            OpKind.NORM,
            (data,),
            ("num_features", "training"),
            batch_axes,
            impure_when=lambda call: bool(call.arg("training")) and bool(call.arg("track_running_stats")),
        ),
    )
    add(
        "InstanceNorm1d InstanceNorm2d",
        OpInfo(
            OpKind.NORM,
            (data,),
            ("num_features",),
            functools.partial(_channel_norm, family="instance"),
            impure_when=lambda call: bool(call.arg("training")) and bool(call.arg("track_running_stats")),
        ),
    )
    add(
        "GroupNorm",
        OpInfo(OpKind.NORM, (data,), ("num_groups",), functools.partial(_channel_norm, family="group")),
    )

    # Activations.
    add(
        "relu gelu silu tanh sigmoid softplus elu leaky_relu hardtanh hardswish hardsigmoid mish rsqrt sqrt "
        "exp log neg abs sin cos erf reciprocal square",
        OpInfo(OpKind.ACTIVATION, (this,), axes=_unary),
    )
    add("relu_ silu_", OpInfo(OpKind.ACTIVATION, (this,), axes=_unary, pure=False))
    add("pow __pow__", OpInfo(OpKind.ACTIVATION, (this, Arg("exponent", Role.DATA)), axes=_elementwise))
    add(
        "clamp",
        OpInfo(
            OpKind.ACTIVATION, (this, Arg("min", Role.SCALAR), Arg("max", Role.SCALAR)), axes=_elementwise
        ),
    )
    add("clamp_min", OpInfo(OpKind.ACTIVATION, (this, Arg("min", Role.SCALAR)), axes=_elementwise))
    add(
        "GELU Tanh Sigmoid Softplus NewGELUActivation GELUActivation SiLUActivation",
        OpInfo(OpKind.ACTIVATION, (data,), axes=_unary),
    )
    add(
        "ReLU SiLU ELU LeakyReLU Hardswish Mish",
        OpInfo(OpKind.ACTIVATION, (data,), ("inplace",), _unary, impure_when=_flag("inplace")),
    )

    # Layout.
    add(
        "view reshape _unsafe_view",
        OpInfo(OpKind.LAYOUT, (this, Arg("size", variadic=True)), ("size",), _reshape),
    )
    add("view_as", OpInfo(OpKind.LAYOUT, (this, Arg("other", Role.LIKE)), axes=_reshape))
    add("transpose", OpInfo(OpKind.LAYOUT, (this, Arg("dim0"), Arg("dim1")), ("dim0", "dim1"), _transpose))
    add("t", OpInfo(OpKind.LAYOUT, (this,), axes=_transpose))
    add("permute", OpInfo(OpKind.LAYOUT, (this, Arg("dims", variadic=True)), ("dims",), _transpose))
    add(
        "movedim",
        OpInfo(
            OpKind.LAYOUT, (this, Arg("source"), Arg("destination")), ("source", "destination"), _transpose
        ),
    )
    add("unsqueeze", OpInfo(OpKind.LAYOUT, (this, Arg("dim")), ("dim",), _unsqueeze))
    add("squeeze", OpInfo(OpKind.LAYOUT, (this, Arg("dim")), ("dim",), _squeeze))
    add("expand", OpInfo(OpKind.LAYOUT, (this, Arg("size", variadic=True)), ("size",), _expand))
    add("expand_as", OpInfo(OpKind.LAYOUT, (this, Arg("other", Role.LIKE)), axes=_expand))
    add("repeat", OpInfo(OpKind.LAYOUT, (this, Arg("repeats", variadic=True)), ("repeats",), _repeat))
    add(
        "repeat_interleave",
        OpInfo(
            OpKind.LAYOUT,
            (this, Arg("repeats"), Arg("dim"), Arg("output_size")),
            ("repeats", "dim", "output_size"),
            _repeat_interleave,
        ),
    )
    add(
        "flatten",
        OpInfo(
            OpKind.LAYOUT,
            (this, Arg("start_dim", default=0), Arg("end_dim", default=-1)),
            ("start_dim", "end_dim"),
            _flatten,
        ),
    )
    add("Flatten", OpInfo(OpKind.LAYOUT, (data,), ("start_dim", "end_dim"), _flatten))
    add("unflatten", OpInfo(OpKind.LAYOUT, (this, Arg("dim"), Arg("sizes")), ("dim", "sizes"), _unflatten))
    add("Unflatten", OpInfo(OpKind.LAYOUT, (data,), ("dim", "unflattened_size"), _unflatten))
    add("contiguous", OpInfo(OpKind.LAYOUT, (this, Arg("memory_format")), axes=_unary))

    # Identities and casts.
    add("clone alias detach lift_fresh_copy", OpInfo(OpKind.IDENTITY, (this,), axes=_unary))
    add(
        "dropout native_dropout feature_dropout alpha_dropout",
        OpInfo(
            OpKind.IDENTITY,
            (data, Arg("p"), Arg("train", default=False)),
            ("p", "train"),
            _unary,
            impure_when=_flag("train"),
        ),
    )
    add(
        "Dropout",
        OpInfo(
            OpKind.IDENTITY,
            (data,),
            ("p", "training", "inplace"),
            _unary,
            impure_when=lambda call: bool(call.arg("training")) or bool(call.arg("inplace")),
        ),
    )
    add("Identity", OpInfo(OpKind.IDENTITY, (data,), axes=_unary))
    add("to _to_copy", OpInfo(OpKind.CAST, (this, Arg("dtype_or_other", Role.LIKE)), axes=_unary))
    add("type_as", OpInfo(OpKind.CAST, (this, Arg("other", Role.LIKE)), axes=_unary))
    add("float half bfloat16 type", OpInfo(OpKind.CAST, (this,), axes=_unary))

    # Concatenation, splits and lookups.
    add(
        "cat concat concatenate",
        OpInfo(OpKind.CONCAT, (Arg("tensors", Role.DATA), Arg("dim", default=0)), ("dim",), _concat),
    )
    add("stack", OpInfo(OpKind.CONCAT, (Arg("tensors", Role.DATA), Arg("dim", default=0)), ("dim",), _stack))
    add(
        "split",
        OpInfo(OpKind.SPLIT, (this, Arg("split_size_or_sections"), Arg("dim", default=0)), ("dim",), _split),
    )
    add(
        "split_with_sizes",
        OpInfo(OpKind.SPLIT, (this, Arg("split_sizes"), Arg("dim", default=0)), ("dim",), _split),
    )
    add("chunk", OpInfo(OpKind.SPLIT, (this, Arg("chunks"), Arg("dim", default=0)), ("dim",), _split))
    add(
        "tensor_split",
        OpInfo(OpKind.SPLIT, (this, Arg("indices_or_sections"), Arg("dim", default=0)), ("dim",)),
    )
    add(
        "slice",
        OpInfo(
            OpKind.SPLIT,
            (this, Arg("dim", default=0), Arg("start"), Arg("end"), Arg("step", default=1)),
            ("dim", "start", "end", "step"),
            _slice,
        ),
    )
    add(
        "narrow",
        OpInfo(
            OpKind.SPLIT, (this, Arg("dim"), Arg("start"), Arg("length")), ("dim", "start", "length"), _narrow
        ),
    )
    add("select", OpInfo(OpKind.SPLIT, (this, Arg("dim"), Arg("index")), ("dim", "index"), _select))
    add("unbind", OpInfo(OpKind.SPLIT, (this, Arg("dim", default=0)), ("dim",), _unbind))
    add("getitem", OpInfo(OpKind.SPLIT, (Arg("a", Role.DATA), Arg("b", Role.INDICES)), axes=_getitem))
    add("index", OpInfo(OpKind.SPLIT, (this, Arg("indices", Role.INDICES))))
    add(
        "gather",
        OpInfo(OpKind.SPLIT, (this, Arg("dim"), Arg("index", Role.INDICES)), ("dim",), _gather_elements),
    )
    add(
        "index_select",
        OpInfo(OpKind.SPLIT, (this, Arg("dim"), Arg("index", Role.INDICES)), ("dim",), _index_select),
    )
    add(
        "embedding",
        OpInfo(
            OpKind.SPLIT,
            (Arg("weight", Role.WEIGHT), Arg("indices", Role.INDICES), Arg("padding_idx")),
            ("padding_idx",),
            _embedding,
            weight_out_axis=1,
        ),
    )
    add(
        "Embedding",
        OpInfo(OpKind.SPLIT, (Arg("input", Role.INDICES),), ("num_embeddings", "embedding_dim"), _embedding),
    )

    # Shapes and constants: values that do not depend on the data's values.
    add(
        "sym_size size dim sym_numel numel",
        OpInfo(OpKind.SHAPE, (Arg("self", Role.LIKE), Arg("dim")), axes=_new_values),
    )
    add("zeros ones full arange scalar_tensor empty", OpInfo(OpKind.CONSTANT, (), axes=_new_values))
    add(
        "zeros_like ones_like full_like new_ones new_zeros",
        OpInfo(OpKind.CONSTANT, (Arg("self", Role.LIKE),), axes=_new_values),
    )

    # Softmax and reductions.
    softmax = OpInfo(OpKind.SOFTMAX, (this, Arg("dim")), ("dim",), _softmax)
    add("softmax _softmax log_softmax _log_softmax", softmax)
    add("Softmax", OpInfo(OpKind.SOFTMAX, (data,), ("dim",), _softmax))
    add(
        "mean sum amax amin",
        OpInfo(OpKind.REDUCE, (this, Arg("dim"), Arg("keepdim", default=False)), ("dim", "keepdim"), _reduce),
    )
    add(
        "var std var_mean",
        OpInfo(
            OpKind.REDUCE,
            (this, Arg("dim"), Arg("unbiased"), Arg("keepdim", default=False)),
            ("dim", "keepdim"),
            _reduce,
        ),
    )
    pool = (this, Arg("kernel_size"), Arg("stride"), Arg("padding"))
    add(
        "max_pool2d max_pool2d_with_indices avg_pool2d",
        OpInfo(OpKind.REDUCE, pool, ("kernel_size", "stride"), _pool),
    )
    add(
        "adaptive_avg_pool2d adaptive_avg_pool1d _adaptive_avg_pool2d",
        OpInfo(OpKind.REDUCE, (this, Arg("output_size")), ("output_size",), _pool),
    )
    add(
        "MaxPool2d AvgPool2d AdaptiveAvgPool2d",
        OpInfo(OpKind.REDUCE, (data,), ("kernel_size", "output_size"), _pool),
    )

    # Comparisons, selection and padding (kind OTHER: analysis does not look through them).
    add(
        "eq ne lt le gt ge __and__ and_ __or__ or_ logical_and logical_or logical_not bitwise_not __invert__ "
        "maximum minimum",
        OpInfo(OpKind.OTHER, (this, Arg("other", Role.DATA)), axes=_elementwise),
    )
    add(
        "where",
        OpInfo(OpKind.OTHER, (Arg("condition", Role.MASK), this, Arg("other", Role.DATA)), axes=_elementwise),
    )
    add(
        "masked_fill",
        OpInfo(OpKind.OTHER, (this, Arg("mask", Role.MASK), Arg("value", Role.SCALAR)), axes=_elementwise),
    )
    add(
        "pad constant_pad_nd",
        OpInfo(OpKind.OTHER, (this, Arg("pad"), Arg("mode"), Arg("value")), ("pad", "mode"), _pad),
    )
    add("roll cumsum", OpInfo(OpKind.OTHER, (this, Arg("shifts"), Arg("dims")), ("shifts", "dims")))

    # Attention.
    add(
        "scaled_dot_product_attention",
        OpInfo(
            OpKind.OTHER,
            (
                Arg("query", Role.DATA),
                Arg("key", Role.DATA),
                Arg("value", Role.DATA),
                Arg("attn_mask", Role.MASK),
                Arg("dropout_p", default=0.0),
                Arg("is_causal"),
            ),
            ("is_causal", "scale"),
            _sdpa,
            impure_when=lambda call: bool(call.arg("dropout_p")),
        ),
    )

    # Mutation and randomness: never removed or reordered.
    mutating = OpInfo(OpKind.OTHER, (Arg("self", Role.DATA), Arg("src", Role.DATA)), pure=False)
    add(
        "copy_ index_put_ fill_ zero_ masked_fill_ index_add_ index_copy_ scatter_ scatter_add_ setitem "
        "__setitem__ bernoulli_ normal_ uniform_ exponential_ random_",
        mutating,
    )
    add(
        "rand randn randint randperm normal bernoulli multinomial rand_like randn_like randint_like",
        OpInfo(OpKind.OTHER, (Arg("self", Role.LIKE),), pure=False),
    )
    # Runtime checks torch.export inserts: they read a tensor's metadata only, make nothing, and
    # are kept (removing a check would change what the program verifies).
    add(
        "_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range_for_size",
        OpInfo(OpKind.OTHER, (Arg("a", Role.LIKE),), pure=False),
    )

    # torch.nn.functional's own signatures, where they are not aten's.
    functional = "torch.nn.functional."
    fx_batch = (
        data,
        Arg("running_mean", Role.RUNNING_MEAN),
        Arg("running_var", Role.RUNNING_VAR),
        Arg("weight", Role.SCALE),
        Arg("bias", Role.SHIFT),
    )
    table[functional + "batch_norm"] = OpInfo(
        OpKind.NORM, fx_batch + training, ("training",), batch_axes, impure_when=_flag("training")
    )
    table[functional + "instance_norm"] = OpInfo(
        OpKind.NORM,
        fx_batch + (Arg("use_input_stats", default=True), Arg("momentum"), Arg("eps")),
        ("use_input_stats",),
        functools.partial(_channel_norm, family="instance"),
        impure_when=_instance_stats,
    )
    # max_norm renormalizes the table's rows in place.
    table[functional + "embedding"] = OpInfo(
        OpKind.SPLIT,
        (Arg("input", Role.INDICES), Arg("weight", Role.WEIGHT), Arg("padding_idx"), Arg("max_norm")),
        ("padding_idx",),
        _embedding,
        impure_when=lambda call: call.arg("max_norm") is not None,
        weight_out_axis=1,
    )
    for name, train_default in (("dropout", True), ("alpha_dropout", False)):
        table[functional + name] = OpInfo(
            OpKind.IDENTITY,
            (data, Arg("p"), Arg("training", default=train_default), Arg("inplace", default=False)),
            ("p", "training"),
            _unary,
            impure_when=lambda call: bool(call.arg("training")) or bool(call.arg("inplace")),
        )
    for name, extra in (
        ("relu", ()),
        ("silu", ()),
        ("mish", ()),
        ("hardswish", ()),
        ("hardsigmoid", ()),
        ("elu", ("alpha",)),
        ("leaky_relu", ("negative_slope",)),
        ("hardtanh", ("min_val", "max_val")),
    ):
        table[functional + name] = OpInfo(
            OpKind.ACTIVATION,
            (data, *[Arg(e) for e in extra], Arg("inplace", default=False)),
            ("inplace",),
            _unary,
            impure_when=_flag("inplace"),
        )
    return table


_TORCH = _torch_ops()


# ----- the functions the frontends and the IR used before the table ------------------------------
def kind_of_onnx_op(op_type: str) -> OpKind:
    """Kind of an ONNX op (standard or com.microsoft domain; OTHER when unknown)."""
    info = _ONNX.get(op_type)
    return OpKind.OTHER if info is None else info.kind


def onnx_param_slots(op_type: str, attrs: dict) -> ParamSlots | None:
    """ParamSlots for ONNX ops (the core op set); ONNX input positions are argument positions, so
    every input is taken as present."""
    info = _ONNX.get(op_type)
    if info is None:
        return None
    return param_slots(Call(info, "", attrs, (_ABSENT,) * len(info.args), ()))


@dataclasses.dataclass(frozen=True)
class InputSlot:
    """Stands for IR input `index` in a torch argument template (the frontend's templates hold the same)."""

    index: int


def torch_call(
    fx_op: str, target: Any, args: tuple, kwargs: dict, is_input: Callable[[Any], bool]
) -> Call | None:
    """A torch call read through its entry before it is a node: `is_input` tells which arguments
    become IR inputs (numbered in argument order, as the torch frontend numbers them)."""
    info = torch_entry(fx_op, target)
    if info is None:
        return None
    count = 0

    def template(arg: Any) -> Any:
        nonlocal count
        if is_input(arg):
            count += 1
            return InputSlot(count - 1)
        if isinstance(arg, (list, tuple)):
            return [template(a) for a in arg] if isinstance(arg, list) else tuple(template(a) for a in arg)
        if isinstance(arg, dict):
            return {k: template(v) for k, v in arg.items()}
        return arg

    args_t = tuple(template(a) for a in args)
    kwargs_t = {k: template(v) for k, v in kwargs.items()}
    attrs = {"fx_op": fx_op, "target": target, "args": args_t, "kwargs": kwargs_t}
    return Call(info, "torch", attrs, (None,) * count, ())
