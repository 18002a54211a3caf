"""prune: structured width pruning through channel groups (`rescompile.analysis.groups`).

before -> after: every member of a group loses the same units: `W[out, in]` -> `W[kept_out,
kept_in]` for the weights on both sides of an MLP hidden layer, the query/key/value rows and output
columns of whole attention heads (a key/value head with its query heads under GQA), a conv's
output channels with their BatchNorm slice and the next conv's input channels, the embedding
columns, norms and heads of a residual stream. Shape constants follow (reshape targets, split
sizes, slice bounds, conv groups, normalized_shape) and shapes are inferred again.

Units are scored by a function from `IMPORTANCE` (magnitude: sum |w|^p over a unit's slices, as
Torch-Pruning's GroupMagnitudeImportance), normalised by the group's mean so that groups compare,
and the lowest go first until `ratio` of the prunable parameters is removed (or, `uniform`, the
same fraction of every group). The model's inputs and outputs never change.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np

from rescompile.analysis.groups import ChannelGroup, GroupAnalysis, find_groups
from rescompile.infra import PassBase, PassError, PassResult
from rescompile.ir import CONST, Graph, Node, Value
from rescompile.ir.ops import call_of
from rescompile.ir.shapes import infer_shapes

from ._branch import numpy_of

__all__ = ["IMPORTANCE", "PrunePass", "PrunePlan"]

_KINDS = ("mlp", "heads", "channels", "stream")


def magnitude(group: ChannelGroup, rng: np.random.Generator, *, p: int) -> np.ndarray:
    """sum |w|^p over each unit's parameter slices (no p-th root, as Torch-Pruning)."""
    scores = np.zeros(group.size)
    for member in group.members:
        if member.value.role != "param":
            continue
        weights = np.moveaxis(np.abs(numpy_of(member.value.payload).astype(np.float64)), member.axis, 0)
        per_index = (weights**p).reshape(len(member.units), -1).sum(axis=1)
        np.add.at(scores, list(member.units), per_index)
    return scores


def random_scores(group: ChannelGroup, rng: np.random.Generator) -> np.ndarray:
    """The floor every criterion must beat."""
    return rng.random(group.size)


IMPORTANCE: dict[str, Callable[[ChannelGroup, np.random.Generator], np.ndarray]] = {
    "l2": functools.partial(magnitude, p=2),
    "l1": functools.partial(magnitude, p=1),
    "random": random_scores,
}
"""Unit scores per group, higher = more important; a criterion is one entry (activation and
Taylor scores need calibration runs and join here)."""


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Which units of which groups go; `removed_slices()` says what that cuts from each value."""

    analysis: GroupAnalysis
    removed: dict[int, frozenset[int]]  # group index -> units

    def removed_slices(self) -> dict[Value, dict[int, list[int]]]:
        """value -> {axis: indices removed}, parameters and activations alike."""
        cut: dict[Value, dict[int, list[int]]] = {}
        for group in self.analysis.groups:
            for member, indices in group.slices(set(self.removed.get(group.index, ()))):
                cut.setdefault(member.value, {})[member.axis] = indices
        return cut

    @property
    def params_removed(self) -> int:
        return sum(
            sum(g.params_per_unit[u] for u in self.removed.get(g.index, ())) for g in self.analysis.groups
        )


class PrunePass(PassBase):
    """Remove the least important units of the prunable groups of the target kinds.

    Refused: a ratio outside (0, 1), a target the model has no prunable group of (the error lists
    what it has), a split into unequal pieces a single split size cannot express, a strided slice
    of a pruned axis. Groups the analysis cannot follow are left alone (see `find_groups`).
    """

    name = "prune"
    summary = "structured pruning of channel groups (MLP hidden, heads, conv channels, streams)"

    @dataclasses.dataclass
    class Options:
        ratio: float = dataclasses.field(
            default=0.3, metadata={"help": "fraction of the prunable parameters to remove, in (0, 1)"}
        )
        uniform: bool = dataclasses.field(
            default=False, metadata={"help": "the same fraction of every group (an HF config can say it)"}
        )
        target: str = dataclasses.field(
            default="mlp|heads|channels",
            metadata={"help": "group kinds that shrink: mlp|heads|channels|stream"},
        )
        importance: str = dataclasses.field(
            default="l2", metadata={"choices": tuple(IMPORTANCE), "help": "unit score: l2, l1 or random"}
        )
        round_to: int = dataclasses.field(default=1, metadata={"help": "keep a multiple of this many units"})
        min_keep: int = dataclasses.field(default=1, metadata={"help": "units every group keeps at least"})
        seed: int = dataclasses.field(default=0, metadata={"help": "seed for random importance"})

    def check_options(self) -> None:
        o = self.options
        if not 0 < o.ratio < 1:
            raise PassError(f"prune: ratio must be in (0, 1), not {o.ratio}")
        unknown = set(o.target.split("|")) - set(_KINDS)
        if unknown:
            raise PassError(f"prune: unknown target {'|'.join(sorted(unknown))}; use {'|'.join(_KINDS)}")
        if o.importance not in IMPORTANCE:
            raise PassError(f"prune: importance must be one of {', '.join(IMPORTANCE)}, not {o.importance!r}")
        if o.round_to < 1 or o.min_keep < 1:
            raise PassError("prune: round_to and min_keep must be >= 1")

    @property
    def preserves_function(self) -> bool:
        return False

    def plan(self, graph: Graph) -> PrunePlan:
        """The units to remove, without changing the graph."""
        analysis = find_groups(graph)
        kinds = set(self.options.target.split("|"))
        groups = [g for g in analysis.groups if g.prunable and g.kind in kinds]
        if not groups:
            have = sorted({g.kind for g in analysis.groups if g.prunable})
            raise PassError(
                f"prune: target={self.options.target} matches no prunable group; the model has "
                + (f"prunable {'|'.join(have)} groups" if have else "no prunable group")
            )
        rng = np.random.default_rng(self.options.seed)
        scores = {g.index: _normalised(IMPORTANCE[self.options.importance](g, rng)) for g in groups}
        choose = self._uniform if self.options.uniform else self._global
        return PrunePlan(analysis, {i: frozenset(u) for i, u in choose(groups, scores).items() if u})

    def call(self, graph: Graph) -> PassResult:
        plan = self.plan(graph)
        cut = plan.removed_slices()
        before = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        _prune(graph, cut)
        after = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        return PassResult(
            graph,
            modified=bool(cut),
            stats={
                "groups": len(plan.removed),
                "units": sum(map(len, plan.removed.values())),
                "params": before - after,
            },
        )

    # ----- choosing units -----------------------------------------------------------------
    def _floor(self, group: ChannelGroup, keep: int) -> int:
        """Units kept: at least min_keep, rounded up to a multiple of round_to, at most all."""
        keep = max(keep, self.options.min_keep, 1)
        return min(group.size, math.ceil(keep / self.options.round_to) * self.options.round_to)

    def _uniform(self, groups: list[ChannelGroup], scores: dict) -> dict[int, list[int]]:
        chosen = {}
        for g in groups:
            keep = self._floor(g, g.size - int(self.options.ratio * g.size))
            chosen[g.index] = list(np.argsort(scores[g.index], kind="stable")[: g.size - keep])
        return chosen

    def _global(self, groups: list[ChannelGroup], scores: dict) -> dict[int, list[int]]:
        """Lowest normalised scores first, across groups, until `ratio` of their parameters go."""
        budget = self.options.ratio * sum(g.params for g in groups)
        by_index = {g.index: g for g in groups}
        ranked = sorted((float(s), g.index, u) for g in groups for u, s in enumerate(scores[g.index]))
        chosen: dict[int, list[int]] = {g.index: [] for g in groups}
        removed = 0
        for _, index, unit in ranked:
            g = by_index[index]
            if (
                removed >= budget
                or g.size - len(chosen[index]) <= self._floor(g, 1)
                or not g.params_per_unit[unit]
            ):
                continue
            chosen[index].append(unit)
            removed += g.params_per_unit[unit]
        # round_to: give back the best of the removed units until the kept count is a multiple.
        return {
            i: units[: by_index[i].size - self._floor(by_index[i], by_index[i].size - len(units))]
            for i, units in chosen.items()
        }


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(np.mean(scores))
    return scores / mean if mean > 0 else scores


# ----- rewriting the graph ------------------------------------------------------------------
def _prune(graph: Graph, cut: dict[Value, dict[int, list[int]]]) -> None:
    """Slice parameters, fix shape constants, set activation shapes; then inference must agree."""
    kept = {
        value: {
            axis: [k for k in range(value.shape[axis]) if k not in set(gone)] for axis, gone in axes.items()
        }
        for value, axes in cut.items()
    }
    touched = {u.node for value in kept for u in value.uses()} | {v.producer for v in kept if v.producer}
    for node in [n for n in graph if n in touched]:
        _fix_constants(graph, node, kept)
    for value, axes in kept.items():
        if value.is_initializer:
            graph.set_payload(value, _take(value.payload, axes))
        else:
            shape = list(value.shape)
            for axis, indices in axes.items():
                shape[axis] = len(indices)
            value.shape = tuple(shape)
    report = infer_shapes(graph)
    if report.conflicts:
        c = report.conflicts[0]
        raise PassError(f"prune: {c.node} makes {c.value} with {c.what} {c.inferred}, expected {c.existing}")


def _take(payload, axes: dict[int, list[int]]):
    """The payload with only `indices` along each axis, in its own kind (torch stays torch)."""
    if hasattr(payload, "detach"):
        out = payload.detach()
        for axis, indices in axes.items():
            out = out[(slice(None),) * axis + (indices,)]
        return out.clone()
    out = numpy_of(payload)
    for axis, indices in axes.items():
        out = np.take(out, indices, axis=axis)
    return out


def _new_size(kept, value: Value | None, axis: int) -> int | None:
    """The size `axis` of `value` will have, None where it does not change."""
    axes = kept.get(value, {}) if value is not None else {}
    return len(axes[axis]) if axis in axes else None


def _shifted(indices: list[int], size: int, bound: int) -> int:
    """Where slice bound `bound` on an axis of `size` lands once only `indices` remain."""
    if bound >= size or bound < -size:
        return bound  # "to the end" (or before the start) stays so
    position = bisect.bisect_left(indices, bound % size)
    return position if bound >= 0 else position - len(indices)


def _fix_constants(graph: Graph, node: Node, kept: dict) -> None:
    """Rewrite the integer arguments of `node` that spell a size or an index of a pruned axis."""
    call = call_of(node)
    if call is None:
        return
    names = {arg.name for arg in call.info.args} | set(call.info.attributes)
    out = node.outputs[0]
    rank = len(out.shape or ())

    def by_output(position: int, old: int, length: int) -> int:
        axis = rank - length + position
        new = _new_size(kept, out, axis)
        return new if new is not None and old == out.shape[axis] else old

    for name in ("shape", "size"):  # reshape / view / expand targets, output axis by position
        if name in names and any(_new_size(kept, out, a) is not None for a in range(rank)):
            _edit(graph, node, name, lambda k, old, n: by_output(k, old, n))
    for name in ("split", "split_size_or_sections", "split_sizes"):
        if name in names:
            _fix_split(graph, node, call, name, kept)
    if "length" in names:  # narrow(dim, start, length)
        _fix_narrow(graph, node, call, kept)
    elif "starts" in names or "start" in names:
        _fix_slice(graph, node, call, kept)
    x = node.inputs[0]
    new_in = _new_size(kept, x, 1) if x is not None else None
    for name in ("groups", "group"):
        if name in names and new_in is not None and int(call.arg(name) or 1) > 1:
            _edit(graph, node, name, lambda k, old, n: old * new_in // x.shape[1])
    if "normalized_shape" in names and call.is_torch:
        _edit(
            graph,
            node,
            "normalized_shape",
            lambda k, old, n: _new_size(kept, x, len(x.shape) - n + k) or old,
        )
    if "num_heads" in node.attrs:
        heads = _new_size(kept, node.inputs[0], 1)
        if heads is not None:
            node.attrs = {**node.attrs, "num_heads": heads}


def _fix_split(graph: Graph, node: Node, call, name: str, kept: dict) -> None:
    axis = call.arg("dim") if call.is_torch else call.arg("axis")
    x = node.inputs[0]
    axis = int(axis or 0) % len(x.shape)
    if _new_size(kept, x, axis) is None:
        return
    sizes = [_new_size(kept, out, axis) or out.shape[axis] for out in node.outputs]
    given = call.ints(name)
    if given is not None and len(given) == 1 and len(sizes) > 1:  # one size for equal pieces
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise PassError(
                f"prune: {node.name} would split into unequal pieces {sizes}; one split size cannot say so"
            )
        sizes = sizes[:1]
    if given is None and not call.has(name):
        if len(set(sizes)) > 1:
            raise PassError(f"prune: {node.name} splits evenly but the pieces would be {sizes}")
        return
    _edit(graph, node, name, lambda k, old, n: sizes[k])


def _fix_slice(graph: Graph, node: Node, call, kept: dict) -> None:
    x = node.inputs[0]
    if call.is_torch:
        axes = [int(call.arg("dim") or 0) % len(x.shape)]
        steps = [int(call.arg("step") or 1)]
        names = ("start", "end")
    else:
        starts = call.ints("starts") or []
        axes = [a % len(x.shape) for a in (call.ints("axes") or range(len(starts)))]
        steps = call.ints("steps") or [1] * len(axes)
        names = ("starts", "ends")
    changed = {k: a for k, a in enumerate(axes) if _new_size(kept, x, a) is not None}
    if not changed:
        return
    if any(steps[k] != 1 for k in changed):
        raise PassError(f"prune: {node.name} slices a pruned axis with a stride")
    for name in names:
        _edit(
            graph,
            node,
            name,
            lambda k, old, n: (
                _shifted(kept[x][changed[k]], x.shape[changed[k]], old) if k in changed else old
            ),
        )


def _fix_narrow(graph: Graph, node: Node, call, kept: dict) -> None:
    x = node.inputs[0]
    axis = int(call.arg("dim")) % len(x.shape)
    if _new_size(kept, x, axis) is not None:
        _edit(graph, node, "start", lambda k, old, n: _shifted(kept[x][axis], x.shape[axis], old))
        _edit(graph, node, "length", lambda k, old, n: _new_size(kept, node.outputs[0], axis) or old)


def _edit(graph: Graph, node: Node, name: str, edit: Callable[[int, int, int], int]) -> None:
    """Rewrite integer argument `name` entry by entry: `edit(position, old, length)`; an ONNX
    constant input is replaced by a new constant (the old one goes when unused)."""
    call = call_of(node)
    current = call.arg(name)
    if isinstance(current, (list, tuple)) and len(current) == 1 and isinstance(current[0], (list, tuple)):
        current = current[0]  # x.view((2, 3)) as well as x.view(2, 3)
    length = len(current) if isinstance(current, (list, tuple)) else 1
    attrs = call.replace_ints(name, lambda k, old: edit(k, old, length))
    if attrs is not None:
        node.attrs = attrs
        return
    index = call.input_index(name)
    old = call.ints(name)
    if index is None or old is None:
        raise PassError(f"prune: cannot rewrite {name} of {node.name}: it is not a constant")
    source = node.inputs[index]
    array = np.array([edit(k, v, len(old)) for k, v in enumerate(old)], dtype=source.dtype or "int64")
    const = graph.add_initializer(
        Value(f"{source.name}.pruned", dtype=str(array.dtype), shape=array.shape, payload=array, role=CONST)
    )
    node.replace_input_with(index, const)
    if not source.uses() and not source.is_graph_output:
        if source.producer is not None:
            graph.remove(source.producer)
        elif source.is_initializer:
            graph.remove_initializer(source)
