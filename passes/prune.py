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
- fluctuation: S_j = var(X_j) * ||W[:, j]||^2, FLAP's metric (An et al. 2024, arXiv 2312.11983):
  what a channel carries beyond its mean, which `refit=bias` restores.
Calibration rows of padding tokens (a batch's `attention_mask` is 0) count in no score or fit.
- taylor: |w * dL/dw| summed over a unit's slices, gradients summed over the calibration batches
  (LLM-Pruner; Ma et al. 2023, arXiv 2305.11627); torch models only.

`refit` then re-fits each reader y = x W (+ b) -- a matrix, or a conv's window, whose weight is
W[out, in, *kernel] flattened over (in, kernel taps), x a row of im2col patches -- so that its
output matches the unpruned one's on the calibration batches. Its input z comes from the model
with the pruning applied upstream, its target y from the original model on the same batch (He et
al. 2017 reconstruct so); readers go in rounds, each after every reader upstream of it is re-fit,
so a late layer is fit to what the pruned and re-fit layers before it produce (one forward pass of
both models over the calibration batches per round; rounds = the longest chain of readers).
`bias` moves what the pruned reader misses on average, mean(y - z W_K), into b: FLAP's mean(x_R)
W_R (An et al. 2024, arXiv 2312.11983) where nothing upstream is pruned; a reader without one gets
a bias after it (per output channel for a conv). For a conv the mean is over every output
position, borders included, with the zero padding the conv has: one constant per channel, a
little too much at the borders, where the padding hides part of what a removed channel gave.
`least_squares` re-solves the kept rows and the bias (Channel Pruning, He et al. 2017, arXiv
1707.06168; ThiNet, Luo et al. 2017, arXiv 1707.06342) by ridge regression toward the kept rows,
min ||Y - Z W'_K - 1 c||^2 + lambda ||W'_K - W_K||^2, from Gram matrices summed batch by batch (a
conv's is (kept channels x kernel taps + 1)^2). lambda is chosen per reader on held-out rows: fit
on the even calibration batches, scored on the odd ones and back, among no refit, `bias` (the
limit of an infinite ridge) and `RIDGES`; the best is fit again on all rows. A fixed tiny ridge
overfit MiniLM's 64 calibration sentences (about 800 tokens for 1075 kept MLP channels) and
lowered its similarity from 0.82 to 0.25 at 30%. Directions in which the kept inputs vary by less
than 1e-5 of their size (a repeated row, a silent channel) are float32 rounding, not signal: W'
stays W_K along them, else a tiny ridge fits the target to the rounding of one runtime.
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
from rescompile.frontends.probe import attention_mask, prepare
from rescompile.infra import PassBase, PassError, PassResult
from rescompile.ir import CONST, Graph, Node, Role, Value
from rescompile.ir._transaction import GraphSnapshot
from rescompile.ir.ops import call_of
from rescompile.ir.regions import sweep
from rescompile.ir.shapes import infer_shapes

from ._branch import insert_op, numpy_of

__all__ = ["IMPORTANCE", "Evidence", "PrunePass", "PrunePlan"]

logger = logging.getLogger("rescompile")

_KINDS = ("mlp", "heads", "channels", "stream")
_REFITS = ("none", "bias", "least_squares")
_MEASURED = ("activation", "fluctuation", "taylor")  # criteria that run the calibration batches


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a criterion reads besides the weights. Calibration statistics are measured once per
    pass, and only for the criterion that needs them."""

    rng: np.random.Generator
    mean_abs: Mapping[tuple[Value, int], np.ndarray] = dataclasses.field(default_factory=dict)
    """(reader input, channel axis) -> mean |x| per channel over the calibration batches."""
    variance: Mapping[tuple[Value, int], np.ndarray] = dataclasses.field(default_factory=dict)
    """(reader input, channel axis) -> variance of x per channel over the calibration batches."""
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
    return _by_reader(group, evidence, lambda key, norms: evidence.mean_abs[key] * norms)


def fluctuation(group: ChannelGroup, evidence: Evidence) -> np.ndarray:
    """FLAP's fluctuation metric: S_j = var(X_j) * ||W_:,j||^2 at every reader, summed over the
    unit's channels: the output variance a channel carries, what is lost once `refit=bias` has put
    its mean back (An et al. 2024, arXiv 2312.11983). Falls back to l2 like `activation`."""
    return _by_reader(group, evidence, lambda key, norms: evidence.variance[key] * norms**2)


def _by_reader(group: ChannelGroup, evidence: Evidence, score: Callable) -> np.ndarray:
    """`score((reader input, axis), column norms)` per channel, summed over every reader and over
    each unit's channels."""
    found = readers(group)
    if not found:
        logger.info("prune: %s has no weighted reader; scored by l2", group.name)
        return magnitude(group, evidence, p=2)
    scores = np.zeros(group.size)
    for reader in found:
        weight = np.moveaxis(_array(reader.weight.value), reader.weight.axis, 0)
        norms = np.sqrt((weight.reshape(len(weight), -1) ** 2).sum(axis=1))
        np.add.at(scores, list(reader.data.units), score((reader.data.value, reader.data.axis), norms))
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
    "fluctuation": fluctuation,
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

    def pruned_readers(self) -> list[tuple[Reader, frozenset[int]]]:
        """Every reader of a group that loses units, with the units it loses (what refit fits)."""
        return [
            (reader, self.removed[g.index])
            for g in self.analysis.groups
            if self.removed.get(g.index)
            for reader in readers(g)
        ]

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
    reader whose weight is shared or is neither a matrix nor an ungrouped, untransposed conv's (a
    grouped conv; a depthwise one is no reader: it loses its channels with its input's), and under
    `bias` one whose bias is not its own vector or that has none and whose output a bias cannot
    follow (a model output). Stats: `refit_chosen` counts readers per choice (none, bias, ridge
    strength), `refit_rounds` the rounds of the sequential refit.
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
                "help": "unit score: l2, l1, random, activation, fluctuation (calibration runs), "
                "taylor (torch)",
            },
        )
        refit: str = dataclasses.field(
            default="auto",
            metadata={
                "choices": ("auto",) + _REFITS,
                "help": "re-fit the readers of pruned channels on calibration data: none, bias, "
                "least_squares (ridge chosen on held-out rows); auto: least_squares when "
                "calibration data is given, else none",
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
        """auto: least_squares when calibration data is given, else none. With the ridge chosen on
        held-out calibration rows it raised MiniLM's similarity at every ratio (tools/bench/prune.py);
        on random inputs it would fit activations the model never sees."""
        if self.options.refit != "auto":
            return self.options.refit
        return "least_squares" if self.calibration is not None else "none"

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
        measured = self.options.importance in _MEASURED or self.refit_mode != "none"
        probe = self.probe(graph) if measured else None
        plan = self.plan(graph, probe)
        cut = plan.removed_slices()
        before = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        refused, chosen, rounds = [], {}, 0
        if self.refit_mode == "none":
            _prune(graph, cut)
        else:
            snapshot = GraphSnapshot.take(graph)
            try:
                refused, chosen, rounds = _refit(graph, plan, probe, self.refit_mode)
            except BaseException:
                snapshot.restore()
                raise
        for reason in refused:
            logger.info("prune: refit skips %s", reason)
        after = sum(np.size(numpy_of(v.payload)) for v in graph.initializers.values() if v.role == "param")
        stats = {
            "groups": len(plan.removed),
            "units": sum(map(len, plan.removed.values())),
            "params": before - after,
            "refit": self.refit_mode,
        }
        if chosen:
            stats["refit_chosen"] = dict(sorted(chosen.items()))
            stats["refit_rounds"] = rounds
        if refused:
            stats["refit_refused"] = refused
        return PassResult(graph, modified=bool(cut), stats=stats)

    def _evidence(self, graph: Graph, groups: list[ChannelGroup], probe) -> Evidence:
        rng = np.random.default_rng(self.options.seed)
        if self.options.importance in ("activation", "fluctuation"):
            keys = list(dict.fromkeys((r.data.value, r.data.axis) for g in groups for r in readers(g)))
            moments = _moments(probe or self.probe(graph), keys) if keys else {}
            return Evidence(
                rng,
                mean_abs={k: m[0] for k, m in moments.items()},
                variance={k: m[1] for k, m in moments.items()},
            )
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
    return _guarded(functools.partial(probe, values))


def _guarded(arrays: Callable):
    """What `arrays()` yields, with a failure to run the model on a batch said in one line."""
    try:
        yield from arrays()
    except RescompileError as exc:
        raise PassError(f"prune: {exc}") from exc
    except Exception as exc:
        raise PassError(f"prune: {_MISMATCH} ({_first_line(exc)})") from exc


def _channels_last(x: np.ndarray, axis: int, mask: np.ndarray | None = None) -> np.ndarray:
    """An activation as rows of channels: (every other position, channels along `axis`). `mask`
    (the batch's attention mask, 1 for real tokens) keeps only the rows of real tokens where the
    activation's other axes are the mask's: padding never reaches the outputs of a model that
    masks it, so its rows would only add noise to scores and fits."""
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
    if mask is not None and tuple(np.delete(x.shape, axis)) == mask.shape:
        rows = rows[mask.reshape(-1) != 0]
    return rows


def _batches(probe, values: list[Value]):
    """(batch number, its attention mask or None, the arrays of `values`) per calibration batch."""
    masks = [attention_mask(b) for b in getattr(probe, "batches", ())]
    for number, arrays in enumerate(_run(probe, values)):
        yield number, masks[number] if number < len(masks) else None, arrays


def _moments(probe, keys: list[tuple[Value, int]]) -> dict[tuple[Value, int], tuple[np.ndarray, ...]]:
    """Per channel: (mean |x|, variance of x) over the real-token rows of every calibration batch,
    from running sums."""
    sums: dict = {key: [0.0, 0.0, 0.0] for key in keys}
    rows = dict.fromkeys(keys, 0)
    for _, mask, arrays in _batches(probe, [value for value, _ in keys]):
        for key, x in zip(keys, arrays):
            x = _channels_last(x, key[1], mask)
            for k, part in enumerate((np.abs(x), x, x * x)):
                sums[key][k] = sums[key][k] + part.sum(axis=0)
            rows[key] += len(x)
    out = {}
    for key in keys:
        n = max(rows[key], 1)
        mean_abs, mean, mean_sq = (s / n for s in sums[key])
        out[key] = (mean_abs, np.maximum(mean_sq - mean * mean, 0.0) * n / max(n - 1, 1))
    return out


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(np.mean(scores))
    return scores / mean if mean > 0 else scores


# ----- re-fitting what reads the pruned channels --------------------------------------------
RIDGES = (1e-6, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
"""Ridge strengths least_squares tries, times the kept features' mean squared activation (the
Gram matrix's mean diagonal per row). With fewer calibration rows than kept channels (MiniLM:
about 800 tokens for 1075 kept MLP channels) a tiny ridge interpolates the calibration rows and is
far worse than no refit on others (held-out error 0.12 -> 0.4..2.6 at an attention output), so
the strength is chosen on held-out rows."""

_RESOLUTION = 1e-5
"""Variation of a feature below this fraction of its root mean square is float32 rounding (eps
1.2e-7, with room for the rounding of the layers before), not signal: least squares leaves it out
(`_Fit.resolved`)."""

_CONVS = ("conv1d", "conv2d", "conv3d", "convolution", "_convolution")  # torch ops a window reader may be


@dataclasses.dataclass(frozen=True)
class _Window:
    """What a conv reads at each output position: its kernel, strides, dilations and zero padding
    (`auto`: ONNX's SAME_UPPER / SAME_LOWER, whose padding depends on the input size)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    auto: str = ""

    def pads(self, size: tuple[int, ...]) -> list[tuple[int, int]]:
        if not self.auto:
            return list(zip(self.begin, self.end))
        pads = []
        for n, k, s, d in zip(size, self.kernel, self.stride, self.dilation):
            total = max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
            first = total // 2 if self.auto == "SAME_UPPER" else total - total // 2
            pads.append((first, total - first))
        return pads

    def patches(self, x: np.ndarray) -> np.ndarray:
        """im2col: one row per batch item and output position, holding what the conv multiplies
        with its weight there (zeros where the window reaches into the padding), the columns in
        the order of W[out, in, *kernel] flattened: channel, then kernel taps."""
        spatial = x.ndim - 2
        x = np.pad(x, [(0, 0), (0, 0), *self.pads(x.shape[2:])])
        span = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation)]
        view = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, x.ndim)))
        view = view[(slice(None),) * 2 + tuple(slice(None, None, s) for s in self.stride + self.dilation)]
        order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
        return view.transpose(order).reshape(-1, x.shape[1] * math.prod(self.kernel)).astype(np.float64)


def _conv_window(node: Node, kernel: tuple[int, ...]) -> _Window | str:
    """The window of a conv reader (torch conv1d/2d/3d or aten.convolution, ONNX Conv), or why it
    is not refit: a transposed or grouped conv, a padding that is not read."""
    call, n = call_of(node), len(kernel)

    def per_axis(value, default: int) -> tuple[int, ...]:
        if value is None:
            return (default,) * n
        if isinstance(value, int):
            return (value,) * n
        values = tuple(int(v) for v in value)
        return values * n if len(values) == 1 else values

    op = node.op_type.split("::")[-1].split(".")[0]
    if call is None or op not in (_CONVS if call.is_torch else ("Conv",)) or call.arg("transposed"):
        return f"{node.name}: {op} reads a window and is not a conv the refit knows (a transposed conv)"
    groups = int(call.arg("groups" if call.is_torch else "group") or 1)
    if groups != 1:
        return f"{node.name}: a grouped conv (groups={groups}) is not refit"
    stride = per_axis(call.arg("stride" if call.is_torch else "strides"), 1)
    dilation = per_axis(call.arg("dilation" if call.is_torch else "dilations"), 1)
    unread = f"{node.name}: its padding is not one the refit reads"
    if call.is_torch:
        padding = call.arg("padding")
        if padding == "same":  # the odd pixel of padding goes after
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            begin = tuple(t // 2 for t in total)
            return _Window(kernel, stride, dilation, begin, tuple(t - b for t, b in zip(total, begin)))
        try:
            pads = per_axis(0 if padding == "valid" else padding, 0)
        except (TypeError, ValueError):
            return unread
        return _Window(kernel, stride, dilation, pads, pads) if len(pads) == n else unread
    auto = call.arg("auto_pad") or "NOTSET"
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _Window(kernel, stride, dilation, (0,) * n, (0,) * n, auto)
    pads = tuple(int(p) for p in call.arg("pads") or ()) if auto == "NOTSET" else ()
    pads = pads or (0,) * (2 * n)
    if auto not in ("NOTSET", "VALID") or len(pads) != 2 * n:
        return unread
    return _Window(kernel, stride, dilation, pads[:n], pads[n:])


@dataclasses.dataclass
class _Sums:
    """Running sums over one fold of calibration rows for one reader: z, a row of the reader's
    input features in the pruned model (its kept channels; a conv's kept channels times kernel
    taps), and y, the original reader's output x W on the same row of the original model."""

    rows: int = 0
    total: np.ndarray | float = 0.0  # sum of z
    out: np.ndarray | float = 0.0  # sum of y
    gram: np.ndarray | float = 0.0  # Z^T Z
    cross: np.ndarray | float = 0.0  # Z^T Y
    target: float = 0.0  # ||Y||^2

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


@dataclasses.dataclass
class _Fit:
    """One reader of pruned channels, y = x W (+ b) or a conv, and its calibration sums in two
    folds (even and odd batches; even and odd rows when there is one batch), for choosing the
    ridge on rows the fit did not see."""

    reader: Reader
    weight: np.ndarray  # (input features, kept outputs): the original weight, as a matrix
    kept: list[int]  # the features of the kept channels (rows of `weight`)
    layout: tuple[int, int]  # the weight's input and output axes
    window: _Window | None  # a conv's; None for a matrix
    bias: Value | None  # the reader's own bias vector: least squares fits an intercept into it
    slot: int  # the reader's input that holds the pruned channels
    level: int = 0  # readers of pruned channels upstream of it, on the longest path
    folds: tuple[_Sums, _Sums] = dataclasses.field(default_factory=lambda: (_Sums(), _Sums()))
    chosen: str = "none"

    @classmethod
    def of(cls, reader: Reader, gone: frozenset[int], cut: Mapping, window, bias) -> _Fit:
        """The fit of `reader` with its unpruned weight (the units `gone` from its input, its
        own output channels cut as `cut` says)."""
        value, axis = reader.weight.value, reader.weight.axis
        out_axis = 0 if window is not None else 1 - axis
        full = np.moveaxis(_array(value), (axis, out_axis), (0, -1))  # (in, *kernel, out)
        taps = math.prod(full.shape[1:-1])
        gone_out = set(cut.get(value, {}).get(out_axis, ()))
        outputs = [k for k in range(full.shape[-1]) if k not in gone_out]
        channels = [k for k, unit in enumerate(reader.data.units) if unit not in gone]
        kept = [c * taps + t for c in channels for t in range(taps)]
        weight = full.reshape(-1, full.shape[-1])[:, outputs]
        slot = reader.node.inputs.index(reader.data.value)
        return cls(reader, weight, kept, (axis, out_axis), window, bias, slot)

    def features(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if self.window is not None:
            return self.window.patches(x)
        return _channels_last(x, self.reader.data.axis, mask)

    def add(self, x: np.ndarray, z: np.ndarray, mode: str, fold: int) -> None:
        """Rows `x` of the original model's features and `z` of the pruned model's, alike."""
        sums = self.folds[fold]
        y = x @ self.weight
        sums.rows += len(z)
        sums.total = sums.total + z.sum(axis=0)
        sums.out = sums.out + y.sum(axis=0)
        if mode == "bias":
            return
        sums.gram = sums.gram + z.T @ z
        sums.cross = sums.cross + z.T @ y
        sums.target += float((y**2).sum())

    def system(self, sums: _Sums) -> tuple[np.ndarray, np.ndarray]:
        """(A, R) with ||Y - Z theta||^2 = target - 2 <theta, R> + <theta, A theta>, Z the kept
        features, or [Z 1] (theta's last row the bias change) where the reader has a bias."""
        if self.bias is None:
            return sums.gram, sums.cross
        total = np.asarray(sums.total)
        a = np.block([[sums.gram, total[:, None]], [total[None, :], np.full((1, 1), float(sums.rows))]])
        return a, np.vstack([sums.cross, np.asarray(sums.out)[None, :]])

    def start(self) -> np.ndarray:
        """theta of pruning alone: the kept rows as they are, no bias change."""
        kept = self.weight[self.kept]
        return kept if self.bias is None else np.vstack([kept, np.zeros((1, kept.shape[1]))])

    def candidates(self, sums: _Sums, only: str | None = None) -> dict[str, np.ndarray]:
        """theta for each choice, fit on `sums`: none, bias (FLAP: the mean residual, which is the
        limit of an infinite ridge), and ridge regression toward the kept rows for each of RIDGES:
        min ||Y - Z theta||^2 + lambda ||theta_kept - W_kept||^2, the intercept unpenalised.
        `only`: just that choice (and none)."""
        start = self.start()
        found = {"none": start}
        if sums.rows == 0:
            return found
        a, r = self.system(sums)
        if self.bias is not None:
            found["bias"] = start.copy()
            found["bias"][-1] = (r[-1] - a[-1, :-1] @ start[:-1]) / sums.rows
        k = len(self.kept)
        scale = max(float(np.trace(a[:k, :k])) / max(k, 1), 1e-30)
        penalty = np.zeros(len(a))
        penalty[:k] = 1.0
        basis = self.resolved(sums)
        for ridge in RIDGES:
            if only is not None and only != f"ridge {ridge:g}":
                continue
            lam = ridge * scale * penalty
            try:
                if basis is None:
                    found[f"ridge {ridge:g}"] = np.linalg.solve(a + np.diag(lam), r + lam[:, None] * start)
                else:  # the same objective, the kept rows' change confined to `basis`
                    step = np.linalg.solve(basis.T @ (a + np.diag(lam)) @ basis, basis.T @ (r - a @ start))
                    found[f"ridge {ridge:g}"] = start + basis @ step
            except np.linalg.LinAlgError:
                continue
        return found

    def resolved(self, sums: _Sums) -> np.ndarray | None:
        """A basis of theta's changes (columns) along which the kept features vary by more than
        float32 rounding over the rows of `sums` (about their mean where an intercept is fitted),
        the intercept free; None where every direction does. A ridge fits the target's real
        variation to a direction that varies only by rounding (rows equal in exact arithmetic:
        ONNX Runtime gave them bit for bit, torch one ulp apart, and ridge 1e-6 moved the weights
        by 0.02 in torch only, a fuzz finding), so its choice would follow the frontend."""
        gram = np.asarray(sums.gram, dtype=np.float64)
        spread = gram
        if self.bias is not None:
            total = np.asarray(sums.total, dtype=np.float64)
            spread = gram - np.outer(total, total) / sums.rows
        # relative to each feature's root mean square: float32 rounds a value to ~6e-8 of itself
        rms = np.sqrt(np.maximum(np.diag(gram), 0.0) / sums.rows)
        inverse = np.divide(1.0, rms, out=np.zeros_like(rms), where=rms > 0)
        values, vectors = np.linalg.eigh(spread / sums.rows * np.outer(inverse, inverse))
        keep = values > _RESOLUTION**2
        if keep.all():
            return None
        basis = inverse[:, None] * vectors[:, keep]
        if self.bias is None:
            return basis
        return np.block(
            [[basis, np.zeros((len(basis), 1))], [np.zeros((1, basis.shape[1])), np.ones((1, 1))]]
        )

    def error(self, sums: _Sums, theta: np.ndarray) -> float:
        """||Y - Z theta||^2 over the rows of `sums`."""
        a, r = self.system(sums)
        return sums.target - 2 * float((theta * r).sum()) + float((theta * (a @ theta)).sum())

    def apply(self, mode: str) -> None:
        """Write the choice into the pruned graph: the reader's weight (already sliced to the kept
        channels) and bias, or a new bias after it."""
        graph = self.reader.node.graph
        total = self.folds[0] + self.folds[1]
        if mode == "bias" and total.rows:
            # FLAP: what the pruned reader misses on average moves into the bias: mean(x_R) W_R
            # where its input is the original's; with pruned layers upstream, mean(y - z W_K).
            shift = (np.asarray(total.out) - np.asarray(total.total) @ self.weight[self.kept]) / total.rows
            if self.bias is None:
                _add_bias(graph, self.reader.node, shift, 1 if self.window is not None else -1)
            else:
                graph.set_payload(self.bias, _like(self.bias.payload, _array(self.bias) + shift))
            self.chosen = "bias"
            return
        # Each choice fit on one fold and scored on the other, both ways; the best on held-out
        # rows is fit again on all rows. Pruning alone is a choice, so the refit is never worse
        # than it on held-out rows, and ridge toward the kept rows never is on the fitted ones.
        if mode != "least_squares" or not all(fold.rows for fold in self.folds):
            return  # no rows to fit (every token padding), or none held out to choose on
        scored = [
            {
                name: self.error(self.folds[check], theta)
                for name, theta in self.candidates(self.folds[fit]).items()
            }
            for fit, check in ((0, 1), (1, 0))
        ]
        held_out = {name: scored[0][name] + scored[1][name] for name in scored[0] if name in scored[1]}
        self.chosen = _simplest_within_noise(held_out, self.folds[0].target + self.folds[1].target)
        if self.chosen == "none":
            return
        theta = self.candidates(total, self.chosen).get(self.chosen)
        if theta is None or self.error(total, theta) > self.error(total, self.start()):
            self.chosen = "none"
            return
        value, kept = self.reader.weight.value, theta[: len(self.kept)]
        shape = np.moveaxis(np.empty(value.shape, dtype=bool), self.layout, (0, -1)).shape
        kept = kept.reshape(-1, *shape[1:-1], kept.shape[-1])
        graph.set_payload(value, _like(value.payload, np.moveaxis(kept, (0, -1), self.layout)))
        if self.bias is not None:
            graph.set_payload(self.bias, _like(self.bias.payload, _array(self.bias) + theta[-1]))


_SIMPLEST_FIRST = ("none", "bias") + tuple(f"ridge {r:g}" for r in sorted(RIDGES, reverse=True))


def _simplest_within_noise(held_out: Mapping[str, float], target: float, tolerance: float = 1e-4) -> str:
    """The simplest choice (no refit, then bias, then ridges from the strongest) whose held-out
    error is within `tolerance` (relative) of the best: near-equal errors are float noise, and
    ONNX Runtime and torch would otherwise break the tie differently (a fuzz finding).
    `target`: ||Y||^2 of the same rows, the scale of the errors' rounding."""
    best = min(held_out.values())
    # relative to the best (an exact fit, error ~0, leaves no slack), plus a floor for errors
    # that are 0 up to rounding: float32 activations and ||Y||^2 - 2 theta.r + theta.A.theta in
    # float64 leave ~1e-14 ||Y||^2, and the frontends' activations differ at that level too (a
    # fuzz finding: every choice within 1e-14 of 0, ridge 1 in ORT and ridge 10 in torch)
    slack = tolerance * abs(best) + 1e-10 * abs(target)
    return next(n for n in _SIMPLEST_FIRST if n in held_out and held_out[n] <= best + slack)


def _refit(graph: Graph, plan: PrunePlan, probe, mode: str) -> tuple[list[str], dict[str, int], int]:
    """Prune `graph` as `plan` says and re-fit every reader of pruned channels so that its output
    on the calibration batches matches the unpruned one's. Inputs come from the pruned model,
    targets from the original, batch by batch; readers go in rounds by `level`, each round after
    the ones upstream are re-fit (Channel Pruning's sequential reconstruction). Returns the
    readers refused, with why, how many readers took each choice, and the rounds."""
    fits, refused, cut = [], [], plan.removed_slices()
    for reader, gone in plan.pruned_readers():
        reason, window, bias = _refit_refusal(reader, mode)
        if reason:
            refused.append(reason)
        else:
            fits.append(_Fit.of(reader, gone, cut, window, bias))
    original = GraphSnapshot.take(graph)
    _prune(graph, cut)
    levels = _levels(graph, fits)
    batches = list(probe.batches)
    masks = [attention_mask(b) for b in batches]
    split_rows = len(batches) == 1
    chosen: dict[str, int] = {}
    for level in levels:
        now = [f for f in fits if f.level == level]
        # What each reader reads now: a bias added after a reader upstream (refit=bias) comes
        # between its output and its readers.
        values = [f.reader.node.inputs[f.slot] for f in now]
        pruned = _prepared(graph, values)
        current = GraphSnapshot.take(graph)
        original.restore()
        try:
            before = _prepared(graph, [f.reader.data.value for f in now])
        finally:
            current.restore()
        pairs = zip(
            _guarded(functools.partial(before, batches)), _guarded(functools.partial(pruned, batches))
        )
        for number, (xs, zs) in enumerate(pairs):
            for fit, x, z in zip(now, xs, zs):
                x, z = fit.features(x, masks[number]), fit.features(z, masks[number])
                if split_rows:
                    fit.add(x[0::2], z[0::2], mode, 0)
                    fit.add(x[1::2], z[1::2], mode, 1)
                else:
                    fit.add(x, z, mode, number % 2)
        for fit in now:
            fit.apply(mode)
            chosen[fit.chosen] = chosen.get(fit.chosen, 0) + 1
    return refused, chosen, len(levels)


def _prepared(graph: Graph, values: list[Value]):
    """`prepare` (the graph as it is now), with a failure said in one line."""
    try:
        return prepare(graph, values)
    except RescompileError as exc:
        raise PassError(f"prune: {exc}") from exc
    except Exception as exc:
        raise PassError(f"prune: {_MISMATCH} ({_first_line(exc)})") from exc


def _levels(graph: Graph, fits: list[_Fit]) -> list[int]:
    """Set each fit's level, the most readers being fit on a path from the model's inputs to it
    (in graph order); returns the levels in order. Readers of one level do not feed each other."""
    level_of: dict[Node, int] = {}
    nodes = {fit.reader.node for fit in fits}
    depth: dict[Value, int] = {}
    for node in graph:
        d = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in nodes:
            level_of[node] = d
            d += 1
        for out in node.outputs:
            depth[out] = d
    for fit in fits:
        fit.level = level_of[fit.reader.node]
    return sorted({fit.level for fit in fits})


def _refit_refusal(reader: Reader, mode: str) -> tuple[str, _Window | None, Value | None]:
    """Why `reader` cannot be re-fitted ('' if it can), a conv's window, and the bias it would
    adjust (None: under `bias`, a new one is added after it; under least squares, no intercept is
    fitted)."""
    node, weight = reader.node, reader.weight.value
    window = None
    if len(weight.shape) != 2:
        kernel = tuple(weight.shape[2:])
        if len(weight.shape) < 3 or reader.weight.axis != 1 or reader.data.axis != 1:
            return f"{node.name}: its weight {weight.name} is neither a matrix nor a conv's", None, None
        window = _conv_window(node, kernel)
        if isinstance(window, str):
            return window, None, None
    if len(weight.uses()) != 1:
        return f"{node.name}: its weight {weight.name} is shared", None, None
    out_axis = 0 if window is not None else 1 - reader.weight.axis
    outputs = weight.shape[out_axis]
    bias = _bias_of(node)
    own = (
        bias is not None
        and bias.is_initializer
        and len(bias.uses()) == 1
        and np.size(numpy_of(bias.payload)) == outputs
    )
    if mode != "bias":  # least squares fits an intercept into the reader's own bias, if it has one
        return "", window, bias if own else None
    if bias is None:
        out = node.outputs[0]
        channel = 1 if window is not None else -1
        if out.is_graph_output or not out.shape or len(out.shape) < 2 or out.shape[channel] != outputs:
            return f"{node.name} has no bias to adjust, and one cannot be added after it", None, None
        return "", window, None
    if not own:
        return f"{node.name}: its bias {bias.name} is not its own vector", None, None
    return "", window, bias


def _bias_of(node: Node) -> Value | None:
    """The bias `node` adds: its own bias input (a torch linear or conv, an ONNX Gemm or Conv), or
    the constant of the Add that alone reads its output (an ONNX MatMul then Add), so both
    frontends fit alike."""
    call = call_of(node)
    name = call.role_name(Role.BIAS) if call is not None else ""
    index = call.input_index(name) if name else None
    if index is not None and index < len(node.inputs):
        return node.inputs[index]
    if name:
        return None
    out = node.outputs[0]
    consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Add" and not out.is_graph_output:
        other = [v for v in consumers[0].inputs if v is not out]
        if len(other) == 1 and other[0] is not None and other[0].is_initializer:
            return other[0]
    return None


def _add_bias(graph: Graph, node: Node, shift: np.ndarray, channel: int) -> None:
    """A new bias `shift` after `node`, whose output holds the outputs on axis `channel` (-1 for a
    linear, 1 for a conv): its readers read `node`'s output + shift."""
    out = node.outputs[0]
    uses = list(out.uses())
    dtype = out.dtype or "float32"
    trailing = len(out.shape) - 1 - channel % len(out.shape)
    shift = np.asarray(shift, dtype=dtype).reshape(-1, *([1] * trailing))
    bias = graph.add_param(f"rescompile.prune.{node.name}.bias", shift, dtype=dtype)
    added = insert_op(
        graph, "Add", [out, bias], pass_name="prune", name=f"{node.name}/bias", after=node, like=out
    )
    for usage in uses:
        usage.node.replace_input_with(usage.index, added)


def _like(payload, array: np.ndarray):
    """`array` in the payload's own kind and dtype (torch stays torch)."""
    if hasattr(payload, "detach"):
        return payload.detach().new_tensor(array)
    return np.asarray(array, dtype=numpy_of(payload).dtype)


# ----- rewriting the graph ------------------------------------------------------------------
def _prune(graph: Graph, cut: dict[Value, dict[int, list[int]]]) -> None:
    """Slice parameters, fix shape constants, set activation shapes; then inference must agree."""
    kept = {
        value: {axis: sorted(set(range(value.shape[axis])) - set(gone)) for axis, gone in axes.items()}
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
    for name in ("sizes", "unflattened_size"):  # unflatten(dim, sizes): output axes dim, dim + 1, ...
        if name in names and call.arg("dim") is not None and node.inputs[0] is not None:
            start = int(call.arg("dim")) % len(node.inputs[0].shape)
            _edit(graph, node, name, lambda k, old, n, start=start: by_output(start + k - rank + n, old, n))
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
    query = node.inputs[0]
    if call.is_torch and "scale" in names and call.arg("scale") is None and query is not None and query.shape:
        # softmax(q k^T / sqrt(head_dim)): scaled_dot_product_attention's default scale reads the
        # head_dim it is given, so a pruned head_dim would change it; pin the original one.
        if _new_size(kept, query, len(query.shape) - 1) is not None and isinstance(query.shape[-1], int):
            node.attrs = call.with_kwarg("scale", 1 / math.sqrt(query.shape[-1]))
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
    sweep(graph, [source])  # with the chain that computed it (the legacy exporter's chunk bounds)
