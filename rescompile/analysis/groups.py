"""Channel groups: the parameter slices that must shrink together.

`find_groups(graph)` reads the graph and changes nothing. Every index of every axis of every value
is an element; the op table's axis maps say which elements are the same channel, and a union-find
joins them: a residual add joins its operands index by index, a matmul joins the contracted axes, a
concat places each operand at its offset, a split of hidden -> (heads, head_dim) joins each channel
with its head. A *unit* is one class of joined elements (an MLP hidden channel, an attention head
with its keys, queries and values, a conv channel with its norm statistics); a *group* is the units
that share an axis (the hidden width of one MLP, the heads of one attention, one residual stream).

Anything the walk cannot follow stops a group: an op with no axis map, an axis that is a window
(spatial), made from values, looked up by indices, an inner factor of a reshape or contracted
within conv groups, and the model's own inputs and outputs. Such a group is reported with the
reason and never pruned.

Where the pruned axis is not normalised or softmaxed over, removing a unit equals zeroing its
slices (MLP hidden, heads, conv channels with their BatchNorm slice). A stream group goes through
the norms on the stream: removing a channel changes their statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from rescompile.analysis.residuals import find_residuals
from rescompile.ir import Graph, Node, OpKind, Role, Value, axis_map, input_roles, op_info
from rescompile.ir._core import PARAM
from rescompile.ir.ops import (
    Contract,
    Group,
    Keep,
    Lookup,
    Merge,
    New,
    Offset,
    Select,
    Slice,
    Split,
    Window,
)

__all__ = ["ChannelGroup", "GroupAnalysis", "Member", "Reader", "find_groups", "readers"]

# Inputs read for their shape or as small constants: their axes carry no channels.
_VALUE_ROLES = frozenset(
    {Role.LIKE, Role.SHAPE, Role.AXES, Role.STARTS, Role.ENDS, Role.STEPS, Role.SIZES, Role.SCALAR}
)
# Structural attributes of norms that cut channels into groups (GroupNorm): not followed.
_CHANNEL_GROUP_ATTRIBUTES = ("num_groups", "group")


@dataclasses.dataclass(frozen=True)
class Member:
    """One axis of one value in a group; `units[k]` is the group's unit that index k belongs to."""

    value: Value
    axis: int
    units: tuple[int, ...]

    @property
    def is_param(self) -> bool:
        """A trainable parameter (running statistics and other buffers are initializers, not params)."""
        return self.value.role == PARAM

    def indices(self, units: set[int]) -> list[int]:
        """Indices along the axis that belong to `units`."""
        return [k for k, u in enumerate(self.units) if u in units]

    def to_json(self) -> dict:
        return {"value": self.value.name, "axis": self.axis, "size": len(self.units)}


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Units that share an axis: removing one removes its index from every member.

    Attributes:
        kind: "heads", "stream", "channels" (conv) or "mlp".
        size: number of units.
        unit: "head" or "channel".
        width: channels one unit owns in its widest parameter slice (head_dim times the query
            heads of a key/value head; H*W for a conv channel flattened into a linear).
        members: parameters first (by name), then activations in graph order.
        prunable: False when the walk met something it cannot follow; `reason` says what.
        params_per_unit: trainable parameters each unit owns.
    """

    index: int
    kind: str
    size: int
    unit: str
    width: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str
    params_per_unit: tuple[int, ...]

    @property
    def name(self) -> str:
        """The first parameter member, e.g. `h.0.mlp.c_fc.weight:1`."""
        first = next((m for m in self.members if m.is_param), self.members[0])
        return f"{first.value.name}:{first.axis}"

    @property
    def params(self) -> int:
        return sum(self.params_per_unit)

    def slices(self, units: set[int]) -> Iterator[tuple[Member, list[int]]]:
        """(member, indices along its axis) for every member holding one of `units`."""
        for member in self.members:
            indices = member.indices(units)
            if indices:
                yield member, indices

    def row(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "unit": self.unit if self.width == 1 else f"{self.unit} x{self.width}",
            "params": self.params,
            "prunable": self.prunable,
            "reason": self.reason,
        }

    def to_json(self) -> dict:
        return {
            "index": self.index,
            **self.row(),
            "unit": self.unit,
            "width": self.width,
            "params_per_unit": list(self.params_per_unit),
            "members": [m.to_json() for m in self.members],
        }


@dataclasses.dataclass(frozen=True)
class GroupAnalysis:
    groups: tuple[ChannelGroup, ...]

    def rows(self) -> list[dict]:
        """One short row per group (name, kind, size, unit, params, prunable, reason) for a table."""
        return [g.row() for g in self.groups]

    def to_json(self) -> dict:
        return {"groups": [g.to_json() for g in self.groups]}


@dataclasses.dataclass(frozen=True)
class Reader:
    """A node that contracts a group's activation with a weight of the group along the group's axis
    (an MLP's down projection, an attention output projection, the next conv): where the units'
    channels are read, and so where measured importance and refit look."""

    node: Node
    data: Member
    weight: Member


def readers(group: ChannelGroup) -> list[Reader]:
    """The group's readers, in graph order of their data members."""
    members = {(m.value, m.axis): m for m in group.members}
    found: dict[tuple[Node, Value], Reader] = {}
    for data in group.members:
        if data.value.is_initializer:
            continue
        for node in data.value.consumers():
            amap = axis_map(node)
            for mix in amap.mixes if amap is not None else ():
                if not isinstance(mix, Contract) or mix.groups != 1:
                    continue
                operands = [(node.inputs[i], axis) for i, axis in mix.operands]
                weights = [members[o] for o in operands if o in members and members[o].is_param]
                if (data.value, data.axis) in operands and len(weights) == 1:
                    found.setdefault((node, data.value), Reader(node, data, weights[0]))
    return list(found.values())


def find_groups(graph: Graph) -> GroupAnalysis:
    """Pruning groups of `graph`: every group that holds a trainable parameter and an activation.

    Two walks: a reshape that merges or splits several axes (batch x heads -> one axis) follows one
    of them, the first that the first walk did not tie to the model's inputs or outputs."""
    first = _walk(graph, frozenset())
    walk = _walk(graph, first.pinned_axes())
    streams = {site.add.outputs[0] for site in find_residuals(graph).sites}
    return GroupAnalysis(tuple(_collect(graph, walk, streams)))


def _walk(graph: Graph, pinned: frozenset) -> _Walk:
    walk = _Walk(pinned)
    for value in graph.inputs:
        walk.block_all(value, "a model input")
    for value in graph.outputs:
        walk.block_all(value, "a model output")
    walk.fixed = set(walk.blocked)
    for node in graph:
        walk.visit(node)
    return walk


class _Walk:
    """Union-find over the elements of every (value, axis) of known integer size."""

    def __init__(self, pinned: frozenset) -> None:
        self.pinned = pinned  # axes tied to the model's inputs or outputs (by an earlier walk)
        self.fixed: set[tuple[Value, int]] = set()  # the inputs' and outputs' own axes
        self.parent: list[int] = []
        self.base: dict[tuple[Value, int], int] = {}
        self.blocked: dict[tuple[Value, int], str] = {}
        self.head_width: dict[tuple[Value, int], int] = {}  # axes split off as heads: channels per head

    # ----- elements ------------------------------------------------------------------------
    def size(self, value: Value, axis: int) -> int | None:
        shape = value.shape
        if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
            return None
        return shape[axis]

    def element(self, value: Value, axis: int, k: int) -> int:
        key = (value, axis)
        if key not in self.base:
            self.base[key] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + self.size(value, axis)))
        return self.base[key] + k

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: tuple[Value, int, int], b: tuple[Value, int, int]) -> None:
        ra, rb = self.find(self.element(*a)), self.find(self.element(*b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def pinned_axes(self) -> frozenset:
        """Axes whose elements are joined with an element of a model input or output."""
        roots = {self.find(self.base[key] + k) for key in self.fixed for k in range(self.size(*key))}
        hit: dict[tuple[int, int], bool] = {}  # by (base, size): aliased axes share their elements
        for key, base in self.base.items():
            span = (base, self.size(*key))
            if span not in hit:
                hit[span] = any(self.find(base + k) in roots for k in range(span[1]))
        return frozenset(key for key, base in self.base.items() if hit[(base, self.size(*key))])

    def block(self, value: Value, axis: int, reason: str) -> None:
        if self.size(value, axis):  # allocated, so that the axis joins its group and stops it
            self.element(value, axis, 0)
            self.blocked.setdefault((value, axis), reason)

    def block_all(self, value: Value | None, reason: str) -> None:
        if value is not None and value.shape is not None:
            for axis in range(len(value.shape)):
                self.block(value, axis, reason)

    # ----- one node ------------------------------------------------------------------------
    def visit(self, node: Node) -> None:
        where = f"{node.name} ({node.op_type})"
        amap = axis_map(node)
        roles = input_roles(node) or (None,) * len(node.inputs)
        data = [(i, v) for i, v in enumerate(node.inputs) if v is not None and roles[i] not in _VALUE_ROLES]
        if amap is None or len(amap.outputs) != len(node.outputs):
            for _, value in data:
                self.block_all(value, f"{where} has no axis map")
            for out in node.outputs:
                self.block_all(out, f"{where} has no axis map")
            return
        mapped: set[tuple[int, int]] = set()
        for out, axes in zip(node.outputs, amap.outputs):
            if out.shape is None or len(out.shape) != len(axes):
                for _, value in data:
                    self.block_all(value, f"{where}: output shape unknown")
                continue
            for a, sources in enumerate(axes):
                for source in sources:
                    self._source(node, out, a, source, axes, mapped, where)
        for mix in amap.mixes:
            self._mix(node, mix, mapped, where)
        info = op_info(node)
        if info.kind is OpKind.NORM and any(a in info.attributes for a in _CHANNEL_GROUP_ATTRIBUTES):
            for _, value in data:
                self.block_all(value, f"{where} normalises channels in groups")
        for i, value in data:
            for axis in range(len(value.shape or ())):
                if (i, axis) not in mapped:
                    self.block(value, axis, f"{where} does not map axis {axis} of {value.name}")

    def _link(self, a: tuple[Value, int], b: tuple[Value, int], pairs, where: str) -> None:
        """Join index i of axis a with index j of axis b for (i, j) in `pairs`; an axis of unknown
        size cannot follow one of known size."""
        sa, sb = self.size(*a), self.size(*b)
        if sa is None or sb is None:
            if sa is not None or sb is not None:
                self.block(*a, f"{where}: a dynamic size meets a fixed one")
                self.block(*b, f"{where}: a dynamic size meets a fixed one")
            return
        for i, j in pairs(sa, sb):
            if 0 <= i < sa and 0 <= j < sb:
                self.union((*a, i), (*b, j))

    def _alias(self, out: tuple[Value, int], value: tuple[Value, int], start: int) -> bool:
        """Make a new output axis the elements start.. of an input axis (a kept or contiguously
        sliced axis), instead of joining them one by one: the same classes, without a union per
        element per op (find_groups on GPT-2 spent most of its time there)."""
        so, si = self.size(*out), self.size(*value)
        if out in self.base or so is None or si is None or start < 0 or start + so > si:
            return False
        self.base[out] = self.element(*value, 0) + start
        return True

    def _link_same(self, a: tuple[Value, int], b: tuple[Value, int], where: str) -> None:
        """Join index k of axis a with index k of axis b; nothing to do for one axis's aliases."""
        if a in self.base and b in self.base and self.base[a] == self.base[b]:
            return
        self._link(a, b, lambda sa, sb: ((k, k) for k in range(sa)), where)

    def _source(self, node: Node, out: Value, a: int, source, out_axes, mapped: set, where: str) -> None:
        if isinstance(source, New):
            if out.shape[a] != 1:
                self.block(out, a, f"{where} makes axis {a} from values")
            return
        value = node.inputs[source.input]
        axes = source.axes if isinstance(source, (Merge, Split)) else (source.axis,)
        mapped.update((source.input, ax) for ax in axes)
        if isinstance(source, Keep):
            if not self._alias((out, a), (value, source.axis), 0):
                self._link_same((out, a), (value, source.axis), where)
        elif isinstance(source, Slice):
            start, step = source.start, source.step
            if step == 1 and self._alias((out, a), (value, source.axis), start):
                return
            self._link(
                (out, a),
                (value, source.axis),
                lambda so, si: ((k, start + step * k) for k in range(so)),
                where,
            )
        elif isinstance(source, Offset):
            off = source.offset
            self._link(
                (out, a), (value, source.axis), lambda so, si: ((off + j, j) for j in range(si)), where
            )
        elif isinstance(source, Window):
            self.block(out, a, f"{where} reads a window of axis {source.axis}")
            self.block(value, source.axis, f"{where} reads a window of axis {source.axis}")
        elif isinstance(source, Group):
            groups = source.groups
            self._link(
                (out, a),
                (value, source.axis),
                lambda so, si: (
                    (o, (o // (so // groups)) * (si // groups) + c)
                    for o in range(so)
                    for c in range(si // groups)
                ),
                where,
            )
        elif isinstance(source, Merge):
            self._merge(node, out, a, source, where)
        else:
            self._split(node, out, a, source, out_axes, where)

    def _merge(self, node: Node, out: Value, a: int, source: Merge, where: str) -> None:
        """Merged index c is a multi-index over the input axes; it joins the one axis that is free
        (heads in batch x heads); the others are not followed."""
        value, sizes = node.inputs[source.input], source.sizes
        choice = self._choose([(value, axis) for axis in source.axes], sizes)
        for p, axis in enumerate(source.axes):
            if p != choice:
                self.block(value, axis, f"{where} merges axis {axis} as an inner factor")
        inner = _inner(sizes, choice, self.size(out, a))
        if inner is None:
            self.block(out, a, f"{where} merges axes of dynamic size")
            self.block(value, source.axes[choice], f"{where} merges axes of dynamic size")
            return
        size = sizes[choice]
        self._link(
            (out, a),
            (value, source.axes[choice]),
            lambda so, si: ((c, (c // inner) % size) for c in range(so)),
            where,
        )

    def _split(self, node: Node, out: Value, a: int, source: Split, out_axes, where: str) -> None:
        """hidden -> (heads, head_dim): channel c belongs to head c // head_dim; the other parts
        (head_dim) are not followed. Of several parts the first free one is followed."""
        value, sizes = node.inputs[source.input], source.sizes
        if len(source.axes) != 1 or not all(isinstance(s, int) for s in sizes):
            self.block(out, a, f"{where} splits an axis it cannot follow")
            for axis in source.axes:
                self.block(value, axis, f"{where} reshapes axes it cannot follow")
            return
        parts = {
            s.part: b
            for b, sources in enumerate(out_axes)
            for s in sources
            if isinstance(s, Split) and s.input == source.input and s.axes == source.axes
        }
        keys = [(out, parts[p]) if p in parts else (None, None) for p in range(len(sizes))]
        if source.part != self._choose(keys, sizes):
            self.block(out, a, f"{where} splits off axis {a} as an inner factor")
            return
        inner, size = math.prod(sizes[source.part + 1 :]), sizes[source.part]
        if inner > 1:
            self.head_width[(out, a)] = inner
        self._link(
            (out, a),
            (value, source.axes[0]),
            lambda so, si: (((c // inner) % size, c) for c in range(si)),
            where,
        )

    def _choose(self, keys: list, sizes: tuple) -> int:
        """The first axis of size > 1 not pinned to the model's inputs or outputs (else the first)."""
        free = [
            p
            for p, key in enumerate(keys)
            if key[0] is not None and isinstance(sizes[p], int) and sizes[p] > 1 and key not in self.pinned
        ]
        return free[0] if free else next((p for p, key in enumerate(keys) if key[0] is not None), 0)

    def _mix(self, node: Node, mix, mapped: set, where: str) -> None:
        if isinstance(mix, Contract):
            mapped.update(mix.operands)
            first = mix.operands[0]
            a = (node.inputs[first[0]], first[1])
            for i, axis in mix.operands[1:]:
                b = (node.inputs[i], axis)
                if mix.groups > 1:
                    self.block(*b, f"{where} contracts axis {axis} within {mix.groups} groups")
                else:
                    self._link_same(a, b, where)
            return
        mapped.add((mix.input, mix.axis))
        value = node.inputs[mix.input]
        if isinstance(mix, Lookup):
            self.block(value, mix.axis, f"{where} looks up axis {mix.axis} of {value.name} by index")
        elif isinstance(mix, Select):
            self.block(value, mix.axis, f"{where} selects index {mix.index} of axis {mix.axis}")
        # Reduce and Normalize: the axis may shrink; the statistics change with it (stream only).


def _inner(sizes: tuple, choice: int, merged: int | None) -> int | None:
    """Elements of the merged axis per index of axis `choice`: the product of the later sizes, or,
    where those are symbolic (spatial dims), the merged size over the earlier ones."""
    if all(isinstance(s, int) for s in sizes[choice:]):
        return math.prod(sizes[choice + 1 :])
    if merged is not None and all(isinstance(s, int) for s in sizes[: choice + 1]):
        return merged // math.prod(sizes[: choice + 1])
    return None


def _collect(graph: Graph, walk: _Walk, streams: set[Value]) -> list[ChannelGroup]:
    """Units are the union-find's classes; groups join units that share an axis."""
    unit_parent: dict[int, int] = {}

    def find(x: int) -> int:
        unit_parent.setdefault(x, x)
        while unit_parent[x] != x:
            unit_parent[x] = unit_parent[unit_parent[x]]
            x = unit_parent[x]
        return x

    axis_units: dict[tuple[Value, int], list[int]] = {}
    spans: dict[tuple[int, int], list[int]] = {}  # aliased axes share their elements
    for (value, axis), base in walk.base.items():
        span = (base, walk.size(value, axis))
        if span in spans:
            axis_units[(value, axis)] = spans[span]
            continue
        roots = spans[span] = [walk.find(base + k) for k in range(span[1])]
        axis_units[(value, axis)] = roots
        for root in roots[1:]:
            ra, rb = find(roots[0]), find(root)
            if ra != rb:
                unit_parent[max(ra, rb)] = min(ra, rb)
    by_group: dict[int, list[tuple[Value, int]]] = {}
    for key, roots in axis_units.items():
        if roots:
            by_group.setdefault(find(roots[0]), []).append(key)
    order = {v: i for i, v in enumerate(graph.values())}
    groups = []
    for keys in by_group.values():
        params = sorted((k for k in keys if k[0].role == PARAM), key=lambda k: (k[0].name, k[1]))
        if not params or all(k[0].is_initializer for k in keys):
            continue
        rest = sorted((k for k in keys if k[0].role != PARAM), key=lambda k: (order.get(k[0], -1), k[1]))
        numbering: dict[int, int] = {}
        for key in params + rest:
            for root in axis_units[key]:
                numbering.setdefault(root, len(numbering))
        members = tuple(
            Member(v, a, tuple(numbering[r] for r in axis_units[(v, a)])) for v, a in params + rest
        )
        groups.append(_group(len(groups), members, numbering, walk, streams))
    return groups


def _group(index: int, members: tuple[Member, ...], numbering: dict, walk: _Walk, streams) -> ChannelGroup:
    size = len(numbering)
    per_unit = [0] * size
    width = 1
    for m in members:
        if m.value.role != PARAM:
            continue
        shape = m.value.shape
        rest = math.prod(shape) // shape[m.axis]
        counts = [0] * size
        for u in m.units:
            per_unit[u] += rest
            counts[u] += 1
        width = max(width, max(counts))
    reasons = [walk.blocked[(m.value, m.axis)] for m in members if (m.value, m.axis) in walk.blocked]
    heads = any((m.value, m.axis) in walk.head_width for m in members)
    conv = any(m.value.role == PARAM and len(m.value.shape) >= 3 for m in members)
    kind = (
        "heads"
        if heads and not conv
        else "stream"
        if any(m.value in streams for m in members)
        else "channels"
        if conv
        else "mlp"
    )
    if not reasons and size < 2:
        reasons = ["a single unit"]
    return ChannelGroup(
        index=index,
        kind=kind,
        size=size,
        unit="head" if kind == "heads" else "channel",
        width=width,
        members=members,
        prunable=not reasons,
        reason=reasons[0] if reasons else "",
        params_per_unit=tuple(per_unit),
    )
