"""prune: structured width pruning through channel groups (`rescompile.analysis.groups`).

before -> after: every member of a group loses the same units: `W[out, in]` -> `W[kept_out,
kept_in]` for the weights on both sides of an MLP hidden layer, the query/key/value rows and output
columns of whole attention heads (a key/value head with its query heads under GQA), a conv's
output channels with their BatchNorm slice and the next conv's input channels, the embedding
columns, norms and heads of a residual stream. Shape constants follow (reshape targets, split
sizes, slice bounds, conv groups, normalized_shape) and shapes are inferred again.

Units are scored by a function from `IMPORTANCE`, normalised by the group's mean so that groups
compare, and the lowest go first until `ratio` of the prunable parameters is removed (or,
`uniform`, the same fraction of every group). The model's inputs and outputs never change.
- l2 / l1: sum |w|^p over a unit's slices (Torch-Pruning's GroupMagnitudeImportance; Fang et al.
  2023, arXiv 2301.12900).
- activation: S_j = mean|X_j| * ||W[:, j]|| at every reader of the group (the weighted op that
  contracts its channels: down/output projection, next conv), summed over a unit's channels
  (Wanda-SP; Sun et al. 2023, arXiv 2306.11695), from running sums over the calibration batches.
- taylor: |w * dL/dw| summed over a unit's slices, gradients summed over the calibration batches
  (LLM-Pruner; Ma et al. 2023, arXiv 2305.11627); torch models only.

`refit` then re-fits each reader y = x W (+ b) so that its output on the calibration activations
matches the unpruned one: `bias` moves the removed channels' mean contribution mean(x_R) W_R into b
(FLAP; An et al. 2024, arXiv 2312.11983); `least_squares` re-solves the kept rows,
W'_K = (X_K^T X_K + lambda I)^-1 (X_K^T X W + lambda W_K), shrunk toward the kept rows, from
Gram matrices summed batch by batch (Channel Pruning, He et al. 2017, arXiv 1707.06168; ThiNet,
Luo et al. 2017, arXiv 1707.06342).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np

from rescompile.analysis.groups import ChannelGroup, GroupAnalysis, Reader, find_groups, readers
from rescompile.errors import RescompileError
from rescompile.infra import PassBase, PassError, PassResult
from rescompile.ir import CONST, Graph, Node, Role, Value
from rescompile.ir.ops import call_of
from rescompile.ir.shapes import infer_shapes

from ._branch import numpy_of

__all__ = ["IMPORTANCE", "Evidence", "PrunePass", "PrunePlan"]

logger = logging.getLogger("rescompile")

_KINDS = ("mlp", "heads", "channels", "stream")
_REFITS = ("none", "bias", "least_squares")


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a criterion reads besides the weights. Calibration statistics are measured once per
    pass, and only for the criterion that needs them."""

    rng: np.random.Generator
    mean_abs: Mapping[tuple[Value, int], np.ndarray] = dataclasses.field(default_factory=dict)
    """(reader input, channel axis) -> mean |x| per channel over the calibration batches."""
    gradients: Mapping[Value, np.ndarray] = dataclasses.field(default_factory=dict)
    """parameter -> dL/dw summed over the calibration batches."""


def magnitude(group: ChannelGroup, evidence: Evidence, *, p: int) -> np.ndarray:
    """sum |w|^p over each unit's parameter slices (no p-th root, as Torch-Pruning)."""
    return _per_unit(group, lambda member: np.abs(_array(member.value)) ** p)


def random_scores(group: ChannelGroup, evidence: Evidence) -> np.ndarray:
    """The floor every criterion must beat."""
    return evidence.rng.random(group.size)


def activation(group: ChannelGroup, evidence: Evidence) -> np.ndarray:
    """Wanda-SP: S_j = mean|X_j| * ||W_:,j|| at every reader, summed over the unit's channels.
    A group nobody reads through a weight falls back to l2."""
    found = readers(group)
    if not found:
        logger.info("prune: %s has no weighted reader; scored by l2", group.name)
        return magnitude(group, evidence, p=2)
    scores = np.zeros(group.size)
    for reader in found:
        weight = np.moveaxis(_array(reader.weight.value), reader.weight.axis, 0)
        norms = np.sqrt((weight.reshape(len(weight), -1) ** 2).sum(axis=1))
        mean_abs = evidence.mean_abs[(reader.data.value, reader.data.axis)]
        np.add.at(scores, list(reader.data.units), mean_abs * norms)
    return scores


def taylor(group: ChannelGroup, evidence: Evidence) -> np.ndarray:
    """First-order Taylor (LLM-Pruner): |w * dL/dw| summed over each unit's parameter slices."""
    return _per_unit(group, lambda m: np.abs(_array(m.value) * evidence.gradients[m.value]))


def _per_unit(group: ChannelGroup, elementwise: Callable) -> np.ndarray:
    """`elementwise(member)` summed over each unit's slices of the trainable parameters."""
    scores = np.zeros(group.size)
    for member in group.members:
        if member.value.role != "param":
            continue
        per_element = np.moveaxis(elementwise(member), member.axis, 0)
        np.add.at(scores, list(member.units), per_element.reshape(len(member.units), -1).sum(axis=1))
    return scores


def _array(value: Value) -> np.ndarray:
    return numpy_of(value.payload).astype(np.float64)


IMPORTANCE: dict[str, Callable[[ChannelGroup, Evidence], np.ndarray]] = {
    "l2": functools.partial(magnitude, p=2),
    "l1": functools.partial(magnitude, p=1),
    "random": random_scores,
    "activation": activation,
    "taylor": taylor,
}
"""Unit scores per group, higher = more important; a criterion is one entry."""


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Which units of which groups go; `removed_slices()` says what that cuts from each value."""

    analysis: GroupAnalysis
    removed: dict[int, frozenset[int]]  # group index -> units
    scores: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # group index -> raw scores

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
    of a pruned axis, taylor on ONNX, calibration batches the model cannot run. Groups the analysis
    cannot follow are left alone (see `find_groups`). Refit skips, with a reason in the stats, a
    reader whose weight is not a matrix (a conv) or is shared, and under `bias` one with no bias of
    its own.
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
            default="l2",
            metadata={
                "choices": tuple(IMPORTANCE),
                "help": "unit score: l2, l1, random, activation (calibration runs), taylor (torch)",
            },
        )
        refit: str = dataclasses.field(
            default="auto",
            metadata={
                "choices": ("auto",) + _REFITS,
                "help": "re-fit the readers of pruned channels on calibration data: none, bias, "
                "least_squares (auto: none; least_squares overfits small calibration sets, see "
                "BENCHMARKS.md)",
            },
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
        if o.refit not in ("auto",) + _REFITS:
            raise PassError(f"prune: refit must be one of auto, {', '.join(_REFITS)}, not {o.refit!r}")

    @property
    def refit_mode(self) -> str:
        # auto is none: on MiniLM with 64 calibration sentences least_squares lowered similarity
        # at every ratio (0.82 -> 0.25 at 30%), refit=bias and none did not (tools/bench/prune.py).
        return self.options.refit if self.options.refit != "auto" else "none"

    @property
    def preserves_function(self) -> bool:
        return False

    @property
    def keeps_model_class(self) -> bool:
        """Uniform pruning narrows every layer alike, so a config can say the widths; the HF
        rebuild (`frontends.hf`) refuses, with a reason, widths the config cannot say."""
        return self.options.uniform

    def plan(self, graph: Graph, probe=None) -> PrunePlan:
        """The units to remove, without changing the graph; `probe` (from `self.probe`) runs the
        calibration batches for measured criteria (drawn here when not given)."""
        analysis = find_groups(graph)
        kinds = set(self.options.target.split("|"))
        groups = [g for g in analysis.groups if g.prunable and g.kind in kinds]
        if not groups:
            have = sorted({g.kind for g in analysis.groups if g.prunable})
            raise PassError(
                f"prune: target={self.options.target} matches no prunable group; the model has "
                + (f"prunable {'|'.join(have)} groups" if have else "no prunable group")
            )
        evidence = self._evidence(graph, groups, probe)
        raw = {g.index: IMPORTANCE[self.options.importance](g, evidence) for g in groups}
        choose = self._uniform if self.options.uniform else self._global
        chosen = choose(groups, {i: _normalised(s) for i, s in raw.items()})
        return PrunePlan(analysis, {i: frozenset(u) for i, u in chosen.items() if u}, raw)

    def call(self, graph: Graph) -> PassResult:
        measured = self.options.importance in ("activation", "taylor") or self.refit_mode != "none"
        probe = self.probe(graph) if measured else None
        plan = self.plan(graph, probe)
        refused = _refit(plan, probe, self.refit_mode) if self.refit_mode != "none" else []
        for reason in refused:
            logger.info("prune: refit skips %s", reason)
        cut = plan.removed_slices()
        before = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        _prune(graph, cut)
        after = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        stats = {
            "groups": len(plan.removed),
            "units": sum(map(len, plan.removed.values())),
            "params": before - after,
            "refit": self.refit_mode,
        }
        if refused:
            stats["refit_refused"] = refused
        return PassResult(graph, modified=bool(cut), stats=stats)

    def _evidence(self, graph: Graph, groups: list[ChannelGroup], probe) -> Evidence:
        rng = np.random.default_rng(self.options.seed)
        if self.options.importance == "activation":
            keys = list(dict.fromkeys((r.data.value, r.data.axis) for g in groups for r in readers(g)))
            return Evidence(rng, mean_abs=_mean_abs(probe or self.probe(graph), keys))
        if self.options.importance == "taylor":
            # NOTE: gradients need the torch module; like `PassBase.probe`, this reaches the
            # frontend only through `rescompile.frontends.probe`, which refuses ONNX graphs.
            from rescompile.frontends.probe import calibration_batches, gradients

            names = sorted({m.value.name for g in groups for m in g.members if m.is_param})
            try:
                grads = gradients(graph, calibration_batches(graph, self.calibration), names)
            except RescompileError as exc:
                raise PassError(f"prune: importance=taylor: {exc}") from exc
            except Exception as exc:
                raise PassError(f"prune: {_MISMATCH} ({_first_line(exc)})") from exc
            by_name = {v.name: v for v in graph.initializers.values()}
            return Evidence(rng, gradients={by_name[n]: g for n, g in grads.items()})
        return Evidence(rng)

    # ----- choosing units -----------------------------------------------------------------
    def _floor(self, group: ChannelGroup, keep: int) -> int:
        """Units kept: at least min_keep, rounded up to a multiple of round_to, at most all."""
        keep = max(keep, self.options.min_keep, 1)
        return min(group.size, math.ceil(keep / self.options.round_to) * self.options.round_to)

    def _member_floor(self, group: ChannelGroup, units: list[int], scores) -> list[int]:
        """`units` less the best-scored ones each member needs to keep `min_keep` of its own: a
        member may hold only some of the group's units (one conv's piece of a DenseNet
        concatenation), and a conv or linear left with no channels cannot run."""
        removed = set(units)
        for member in group.members:
            own = sorted(set(member.units), key=lambda u: -scores[u])
            kept = [u for u in own if u not in removed]
            for unit in own:
                if len(kept) >= min(self.options.min_keep, len(own)):
                    break
                if unit in removed:
                    removed.discard(unit)
                    kept.append(unit)
        return [u for u in units if u in removed]

    def _uniform(self, groups: list[ChannelGroup], scores: dict) -> dict[int, list[int]]:
        chosen = {}
        for g in groups:
            keep = self._floor(g, g.size - int(self.options.ratio * g.size))
            units = list(np.argsort(scores[g.index], kind="stable")[: g.size - keep])
            chosen[g.index] = self._member_floor(g, units, scores[g.index])
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
            i: self._member_floor(
                by_index[i],
                units[: by_index[i].size - self._floor(by_index[i], by_index[i].size - len(units))],
                scores[i],
            )
            for i, units in chosen.items()
        }


_MISMATCH = "the calibration batches do not match the model's inputs"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run(probe, values: list[Value]):
    """`probe(values)`, with a failure to run the model on a batch said in one line."""
    try:
        yield from probe(values)
    except RescompileError as exc:
        raise PassError(f"prune: {exc}") from exc
    except Exception as exc:
        raise PassError(f"prune: {_MISMATCH} ({_first_line(exc)})") from exc


def _channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """An activation as rows of channels: (every other position, channels along `axis`)."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)


def _mean_abs(probe, keys: list[tuple[Value, int]]) -> dict[tuple[Value, int], np.ndarray]:
    """Mean |x| per channel, from running sums over the calibration batches."""
    sums: dict = {key: 0.0 for key in keys}
    rows = dict.fromkeys(keys, 0)
    for arrays in _run(probe, [value for value, _ in keys]):
        for key, x in zip(keys, arrays):
            x = _channels_last(x, key[1])
            sums[key] = sums[key] + np.abs(x).sum(axis=0)
            rows[key] += len(x)
    return {key: sums[key] / max(rows[key], 1) for key in keys}


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(np.mean(scores))
    return scores / mean if mean > 0 else scores


# ----- re-fitting what reads the pruned channels --------------------------------------------
_RIDGE = 1e-6  # times the Gram matrix's mean diagonal: a stable solve, a negligible bias


@dataclasses.dataclass
class _Fit:
    """Running sums over the calibration batches for one reader y = x W of pruned channels."""

    reader: Reader
    kept: list[int]
    removed: list[int]
    weight: np.ndarray  # (channels, outputs): the weight with the channel axis first
    bias: Value | None
    rows: int = 0
    removed_sum: np.ndarray | float = 0.0  # sum of x over rows, removed channels
    gram: np.ndarray | float = 0.0  # X_kept^T X_kept
    cross: np.ndarray | float = 0.0  # X_kept^T X W
    target: float = 0.0  # ||X W||^2

    def add(self, x: np.ndarray, mode: str) -> None:
        x = _channels_last(x, self.reader.data.axis)
        self.rows += len(x)
        if mode == "bias":
            self.removed_sum = self.removed_sum + x[:, self.removed].sum(axis=0)
            return
        y, kept = x @ self.weight, x[:, self.kept]
        self.gram = self.gram + kept.T @ kept
        self.cross = self.cross + kept.T @ y
        self.target += float((y**2).sum())

    def error(self, w_kept: np.ndarray) -> float:
        """||X W - X_kept w_kept||^2 over the calibration rows, from the running sums."""
        return (
            self.target
            - 2 * float((w_kept * self.cross).sum())
            + float((w_kept * (self.gram @ w_kept)).sum())
        )

    def apply(self, mode: str) -> None:
        graph, weight = self.reader.node.graph, self.weight.copy()
        if mode == "bias":
            # FLAP: the removed channels' mean contribution moves into the bias.
            shift = (self.removed_sum / max(self.rows, 1)) @ weight[self.removed]
            graph.set_payload(self.bias, _like(self.bias.payload, _array(self.bias) + shift))
            return
        # Ridge toward the kept rows as they are, not toward zero: directions the calibration
        # rows never span (fewer rows than kept inputs) keep their trained weights instead of
        # being zeroed, which overfit the calibration set (MiniLM: 0.82 -> 0.25 similarity).
        ridge = _RIDGE * max(float(np.trace(self.gram)) / len(self.kept), 1e-30)
        kept = weight[self.kept]
        solved = np.linalg.solve(self.gram + ridge * np.eye(len(self.kept)), self.cross + ridge * kept)
        if self.error(solved) > self.error(weight[self.kept]):
            return  # the ridge term cost more than the refit gained: never worse than pruning alone
        weight[self.kept] = solved
        value = self.reader.weight.value
        graph.set_payload(value, _like(value.payload, np.moveaxis(weight, 0, self.reader.weight.axis)))


def _refit(plan: PrunePlan, probe, mode: str) -> list[str]:
    """Re-fit every reader of pruned channels (before they are sliced away) so that its output on
    the calibration batches matches the unpruned one. Returns the readers refused, with why."""
    fits, refused = [], []
    for group in plan.analysis.groups:
        gone = plan.removed.get(group.index)
        for reader in readers(group) if gone else ():
            reason, bias = _refit_refusal(reader, mode)
            if reason:
                refused.append(reason)
                continue
            weight = np.moveaxis(_array(reader.weight.value), reader.weight.axis, 0)
            kept = [k for k, unit in enumerate(reader.data.units) if unit not in gone]
            fits.append(_Fit(reader, kept, reader.data.indices(set(gone)), weight, bias))
    for arrays in _run(probe, [f.reader.data.value for f in fits]) if fits else ():
        for fit, x in zip(fits, arrays):
            fit.add(x, mode)
    for fit in fits:
        fit.apply(mode)
    return refused


def _refit_refusal(reader: Reader, mode: str) -> tuple[str, Value | None]:
    """Why `reader` cannot be re-fitted ('' if it can), and the bias it would adjust."""
    node, weight = reader.node, reader.weight.value
    if len(weight.shape) != 2:
        return f"{node.name}: its weight {weight.name} is not a matrix (a conv reads a window)", None
    if len(weight.uses()) != 1:
        return f"{node.name}: its weight {weight.name} is shared", None
    if mode != "bias":
        return "", None
    call = call_of(node)
    name = call.role_name(Role.BIAS) if call is not None else ""
    index = call.input_index(name) if name else None
    bias = node.inputs[index] if index is not None else None
    if bias is None:
        return f"{node.name} has no bias to adjust", None
    if (
        not bias.is_initializer
        or len(bias.uses()) != 1
        or np.size(numpy_of(bias.payload)) != weight.shape[1 - reader.weight.axis]
    ):
        return f"{node.name}: its bias {bias.name} is not its own vector", None
    return "", bias


def _like(payload, array: np.ndarray):
    """`array` in the payload's own kind and dtype (torch stays torch)."""
    if hasattr(payload, "detach"):
        return payload.detach().new_tensor(array)
    return np.asarray(array, dtype=numpy_of(payload).dtype)


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
