"""compress: one planner over depth and width, to a parameter or latency budget.

Width pruning (`prune`) and depth pruning (`drop`) trade quality for size at different rates on
different models. A plan is a sequence of actions: drop the one block whose removal changes the
outputs least (SLEB's criterion, Song et al. 2024, arXiv 2402.09025), or prune `step` more of one
kind of width (MLP neurons, attention heads, conv channels) uniformly, the same fraction in every
layer, as NVIDIA's Minitron does so that a config describes the result. Each step takes the
action that costs the least calibration output change per parameter (or second of measured
latency) it saves, until the target is met.

Step by step alone, a whole block seldom wins: the first width steps are cheap and a block saves
more than a step needs, while the later width steps cost more and more. So by default
(`search=plans`) the planner makes one plan per number of blocks dropped, k = 0, 1, ..., the k
drops first and then width only, and keeps the plan that changes the outputs least
(`search=greedy`: one plan choosing any action each step).

The output change is always measured against the ORIGINAL model's outputs on the calibration
batches (computed once), padding tokens of batches with an `attention_mask` left out: a step is
charged what it adds to the total drift, not its change relative to the already-compressed
model. Savings past the target earn nothing, so the last step is not a block that overshoots when
a little width would do. Drop candidates are measured by the probe's bypass (no rewrite, no
re-export of a changed graph); prune candidates are applied, measured and rolled back. The plan
(which blocks, which widths, predicted versus measured size or latency after each step) is
logged, reported as progress and returned in the stats, with the plans the search compared.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from rescompile.analysis.cost import count_params
from rescompile.analysis.groups import find_groups
from rescompile.analysis.importance import DepthUnit, depth_units
from rescompile.frontends.probe import attention_mask
from rescompile.infra import PassBase, PassError, PassResult
from rescompile.ir import Graph, IRError
from rescompile.ir._transaction import GraphSnapshot

from .drop import DropPass, _remove
from .prune import PrunePass

__all__ = ["CompressPass"]

logger = logging.getLogger("rescompile")

_KINDS = ("mlp", "heads", "channels")


class CompressPass(PassBase):
    """Drop blocks and prune width until `params` (or `latency`) of the original is left.

    `params` counts, by default (`of=blocks`), only the parameters inside the residual blocks,
    the part any action can shrink: on a small transformer the word embedding is often half the
    model, and `params=0.7` of the whole model would remove most of its layers. `of=model`
    counts every parameter. Refused: a budget outside (0, 1), both or neither of params and
    latency, a model with nothing to drop or prune, a budget no sequence of actions reaches.
    """

    name = "compress"
    required = {"params": 0.7}
    summary = "plan drop + uniform prune to a parameter or latency budget by output change per saving"

    @dataclasses.dataclass
    class Options:
        params: float = dataclasses.field(
            default=0.0, metadata={"help": "fraction of the parameters to keep, in (0, 1) (see of)"}
        )
        latency: float = dataclasses.field(
            default=0.0,
            metadata={"help": "fraction of the measured latency to keep, in (0, 1) (instead of params)"},
        )
        of: str = dataclasses.field(
            default="blocks",
            metadata={
                "choices": ("blocks", "model"),
                "help": "what params= is a fraction of: blocks (the parameters inside the residual "
                "blocks, what drop and prune can remove) or model (all, embeddings included); "
                "latency= is always the whole model's",
            },
        )
        step: float = dataclasses.field(
            default=0.1,
            metadata={"help": "each width action prunes this fraction of one kind's original width"},
        )
        target: str = dataclasses.field(
            default="mlp|heads|channels",
            metadata={"help": "width kinds the planner may prune, each its own action: mlp|heads|channels"},
        )
        importance: str = dataclasses.field(
            default="activation",
            metadata={
                "choices": ("l2", "l1", "activation", "fluctuation"),
                "help": "how prune ranks units (fluctuation: the variance a unit carries, what "
                "refit=least_squares cannot restore; prune's best with refit)",
            },
        )
        refit: str = dataclasses.field(
            default="auto",
            metadata={
                "choices": ("auto", "none", "bias", "least_squares"),
                "help": "prune's refit of what reads pruned channels, at each width candidate; auto: "
                "least_squares when calibration data is given (MiniLM at params=0.7: 0.917 against "
                "0.866 without; about 4x the planner's time), else none",
            },
        )
        replace: str = dataclasses.field(
            default="identity",
            metadata={
                "choices": ("identity", "linear"),
                "help": "what takes a dropped block's place (drop's replace=): identity, or a "
                "least-squares linear map of the stream (fit and measured per candidate: slower)",
            },
        )
        distance: str = dataclasses.field(
            default="cosine",
            metadata={
                "choices": ("cosine", "pooled", "l2"),
                "help": "output change against the original: cosine (mean 1 - cos of each output "
                "vector: each token's hidden state, logits), pooled (1 - cos of each sequence's "
                "mean over its real tokens: what a sentence-embedding model is read by) or l2 "
                "(relative L2 over all outputs)",
            },
        )
        search: str = dataclasses.field(
            default="plans",
            metadata={
                "choices": ("plans", "greedy"),
                "help": "plans: one plan per number of blocks dropped (0, 1, ...; the drops first, "
                "then width), the one that changes the outputs least wins; greedy: one run choosing "
                "any action each step (a whole-block drop seldom beats the first cheap width steps, "
                "even where a mix is better)",
            },
        )
        max_steps: int = dataclasses.field(
            default=50, metadata={"help": "stop after this many actions (per plan)"}
        )

    def check_options(self) -> None:
        o = self.options
        if bool(o.params) == bool(o.latency):
            raise PassError("compress: give params=F or latency=F (the fraction to keep), one of them")
        budget = o.params or o.latency
        if not 0.0 < budget < 1.0:
            raise PassError(f"compress: the fraction to keep must be in (0, 1), not {budget:g}")
        if not 0.0 < o.step < 1.0:
            raise PassError(f"compress: step must be in (0, 1), not {o.step:g}")
        unknown = set(o.target.split("|")) - set(_KINDS)
        if unknown:
            raise PassError(f"compress: unknown target {'|'.join(sorted(unknown))}; use {'|'.join(_KINDS)}")
        if o.max_steps < 1:
            raise PassError(f"compress: max_steps must be >= 1, not {o.max_steps}")

    @property
    def preserves_function(self) -> bool:
        return False

    @property
    def keeps_model_class(self) -> bool:
        return True  # whole blocks and uniform widths: a config can describe the result

    def call(self, graph: Graph) -> PassResult:
        o = self.options
        self._refit = (
            o.refit if o.refit != "auto" else ("least_squares" if self.calibration is not None else "none")
        )
        probe = self.probe(graph)
        self.calibration = probe.batches  # the same batches for every measurement and for prune
        outputs = list(graph.outputs)
        self.report("running the original model on the calibration data")
        objective = _Objective(list(probe(outputs)), [attention_mask(b) for b in probe.batches], o.distance)
        units = depth_units(self.residuals(graph), "block")
        kinds = self._kinds(graph)
        if not _droppable(units) and not kinds:
            raise PassError(f"compress: the model has no block to drop and no {o.target} width to prune")
        by_latency = bool(o.latency)

        def cost() -> float:
            return _latency(self.probe(graph), outputs) if by_latency else float(count_params(graph))

        start = cost()
        blocks = float(_block_params(graph, units)) if not by_latency else 0.0
        if by_latency:
            scope, what = start, "latency"
            goal = start * o.latency
        else:
            scope, what = (blocks, "block parameters") if o.of == "blocks" else (start, "parameters")
            goal = start - (1.0 - o.params) * scope
        if scope <= 0:
            raise PassError("compress: the model's residual blocks hold no parameters to remove")
        budget = _Budget(start, goal, scope, what)
        began = time.perf_counter()
        if o.search == "greedy":
            run = self._plan(graph, objective, outputs, cost, kinds, budget, drops=None)
            if run.refused:
                raise PassError(run.refused)
            tried: list[_Plan] = [run]
        else:
            run, tried = self._search(graph, objective, outputs, cost, kinds, budget, len(_droppable(units)))
        self.report(f"done: {len(run.steps)} steps, output change {run.lost:.4f}")
        stats = {
            "steps": len(run.steps),
            "of": what,
            "left": round(budget.left(run.current), 4),
            "left_of_model": round(run.current / start, 4),
            "output_change": round(run.lost, 6),
            "refit": self._refit,
            "seconds": round(time.perf_counter() - began, 1),
            "plan": run.steps,
        }
        if o.search == "plans":
            stats["plans"] = [
                {"drops": p.drops, "actions": [step["action"] for step in p.steps]}
                | (
                    {"refused": p.refused}
                    if p.refused
                    else {"left": round(budget.left(p.current), 4), "output_change": round(p.lost, 6)}
                )
                for p in tried
            ]
        return PassResult(graph, modified=bool(run.steps), stats=stats)

    def _search(self, graph, objective, outputs, cost, kinds, budget, droppable):
        """One plan per number of blocks dropped, k = 0, 1, ...: the k drops first (each the block
        whose removal changes the outputs least; plan k goes on from plan k - 1's drops), then
        width only. Stops at the first k whose drops alone meet the budget (more would only
        overshoot). Returns the plan with the least output change (float-noise ties: the smaller
        result) and every plan tried, the graph left as that plan rewrote it."""
        original = GraphSnapshot.take(graph)
        tried: list[_Plan] = []
        most = min(droppable, self.options.max_steps)
        drops: _Drops | None = _Drops(original, [], 0.0)  # what the next plan goes on from
        for k in range(most + 1):
            self.report(f"plan {k + 1} of at most {most + 1}: {k} block(s) dropped, then width")
            try:
                plan = self._plan(graph, objective, outputs, cost, kinds, budget, drops=k, begun=drops)
                if not plan.refused:
                    plan.done = GraphSnapshot.take(graph)
            finally:
                original.restore()
            tried.append(plan)
            logger.info(
                "compress: plan with %d drop(s): %s", k, plan.refused or f"output change {plan.lost:.4f}"
            )
            drops = plan.drops_done
            if drops is None:  # no block left to drop, or max_steps spent on drops
                break
            if plan.drops == len(plan.steps) and budget.met(plan.current):
                break  # the drops alone met the budget: more would only overshoot
        done = [p for p in tried if not p.refused]
        if not done:
            raise PassError(tried[0].refused)
        reached = [p for p in done if budget.met(p.current)]
        if not reached:  # max_steps stopped every plan short: the one that came closest
            best = min(done, key=lambda p: (p.current, p.lost))
        else:
            least = min(p.lost for p in reached)
            near = [p for p in reached if p.lost <= least * (1 + _NOISE) + _FLOOR]
            best = min(near, key=lambda p: p.current)  # the first of equal sizes
        best.done.restore()
        return best, tried

    def _plan(self, graph, objective, outputs, cost, kinds, budget, drops: int | None, begun=None) -> _Plan:
        """Step until the budget is met (or max_steps): with `drops=None` any action each step
        (the least output change per saving); with `drops=k`, going on from `begun` (the graph
        after the plan with k - 1's drops), one more drop, then width actions only. A plan that
        cannot go on is returned with the reason in `refused`."""
        o = self.options
        width = dict.fromkeys(kinds, 1.0)  # fraction of each kind's original width left
        lost, steps = 0.0, []
        if begun is not None:
            begun.snapshot.restore()
            lost, steps = begun.lost, list(begun.steps)
        current, dropped, drops_done = cost(), len(steps), None
        if drops is not None and dropped == drops:
            drops_done = _Drops(GraphSnapshot.take(graph), list(steps), lost)
        goal = budget.goal
        while not budget.met(current) and len(steps) < o.max_steps:
            need = current - goal
            self.report(
                f"step {len(steps) + 1}: {budget.left(current):.1%} of the {budget.what} left, target "
                f"{budget.left(goal):.0%}, output change {lost:.4f}"
            )
            allowed = {"drop", "width"} if drops is None else {"drop" if dropped < drops else "width"}
            candidates = self._candidates(graph, objective, outputs, cost, current, need, width, allowed)
            best = _best(candidates, lost, need)
            if best is None:
                what = {"drop": "no block left to drop", "width": "no width action saves more"}
                why = "no action saves more" if drops is None else what[allowed.pop()]
                return _Plan(
                    dropped,
                    steps,
                    float("inf"),
                    float("inf"),
                    drops_done=drops_done,
                    refused=f"compress: cannot reach {budget.left(goal):.0%} of the {budget.what}: "
                    f"{why} (reached {budget.left(current):.0%})",
                )
            best.apply()
            current = cost()
            lost = objective(self.probe(graph)(outputs))  # measured again on the rewritten graph
            steps.append(
                {
                    "action": best.name,
                    "predicted_change": round(best.change, 6),
                    "output_change": round(lost, 6),
                    "predicted": round(budget.left(best.after), 4),
                    "measured": round(budget.left(current), 4),
                }
            )
            if best.kind in width:
                width[best.kind] -= best.fraction
            else:
                dropped += 1
                if dropped == drops:
                    drops_done = _Drops(GraphSnapshot.take(graph), list(steps), lost)
            logger.info(
                "compress: %s -> %.1f%% of the %s left, output change %.4f",
                best.name,
                100 * budget.left(current),
                budget.what,
                lost,
            )
        return _Plan(dropped, steps, lost, current, drops_done=drops_done)

    # ----- candidates ---------------------------------------------------------------------
    def _kinds(self, graph: Graph) -> list[str]:
        """The target kinds the model has prunable groups of."""
        wanted = self.options.target.split("|")
        have = {g.kind for g in find_groups(graph).groups if g.prunable}
        return [k for k in wanted if k in have]

    def _candidates(self, graph, objective, outputs, cost, current, need, width, allowed) -> list[_Candidate]:
        """Every `allowed` action ("drop", "width") of this step, measured: cost after it and output
        change against the original."""
        found: list[_Candidate] = []
        units = depth_units(self.residuals(graph), "block")
        droppable = _droppable(units) if "drop" in allowed else []
        if "width" not in allowed:
            width = {}
        for number, unit in enumerate(droppable):
            self.report(f"  trying drop {unit.name} ({number + 1}/{len(droppable)})")
            found.extend(self._drop(graph, unit, objective, outputs, cost, current))
        groups = find_groups(graph).groups if width and not self.options.latency else []
        for kind, left in width.items():
            fraction = min(self.options.step, left - 1e-6)
            if fraction <= 0:
                continue
            self.report(f"  trying prune {kind}")
            ours = [g for g in groups if g.prunable and g.kind == kind]
            found.extend(
                self._prune(graph, kind, fraction, left, ours, objective, outputs, cost, current, need)
            )
        return found

    def _drop(self, graph, unit: DepthUnit, objective, outputs, cost, current) -> Iterable[_Candidate]:
        name = f"drop {unit.name}"
        if self.options.replace == "linear":
            first, last = unit.sites[0].depth, unit.sites[-1].depth
            spec = dict(sites=f"stream:{unit.stream};depth:{first}-{last}", replace="linear")

            def apply():
                dropper = DropPass(**spec)
                dropper.calibration = self.calibration
                dropper.call(graph)

            yield from self._measured(
                graph, f"{name} (linear)", "drop", 0.0, apply, objective, outputs, cost, current
            )
            return
        if self.options.latency:  # latency needs the rewritten graph to time
            yield from self._measured(
                graph, name, "drop", 0.0, lambda: _remove(unit), objective, outputs, cost, current
            )
            return
        # Parameters: count them on the rewritten graph (cheap), measure the change through the
        # bypass on the unchanged one (the same function, without exporting a new module).
        snapshot = GraphSnapshot.take(graph)
        try:
            _remove(unit)
            after = cost()
        finally:
            snapshot.restore()
        change = objective(self.probe(graph)(outputs, bypass=unit.bypass))
        yield _Candidate(name, "drop", 0.0, current - after, after, change, lambda: _remove(unit))

    def _prune(self, graph, kind, fraction, left, groups, objective, outputs, cost, current, need):
        """Prune `fraction` of the kind's original width (`left` of it remains), or, where that
        saves more than the step needs (params budget), the least that meets it."""
        ratio = fraction / left
        if groups and _uniform_saving(groups, ratio) > need:
            lo, hi = 0.0, ratio  # the saving is monotone in the ratio: bisect for the least
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if _uniform_saving(groups, mid) >= need else (mid, hi)
            fraction, ratio = fraction * hi / ratio, hi

        def apply():
            p = PrunePass(
                ratio=ratio, uniform=True, target=kind, importance=self.options.importance, refit=self._refit
            )
            p.calibration = self.calibration
            if not p.call(graph).modified:  # the step is below one unit per group
                raise PassError(f"prune {kind}: ratio {ratio:.3g} removes no unit")

        name = f"prune {kind} to {left - fraction:.0%} of its width"
        return self._measured(graph, name, kind, fraction, apply, objective, outputs, cost, current)

    def _measured(
        self, graph, name, kind, fraction, apply, objective, outputs, cost, current
    ) -> Iterable[_Candidate]:
        """Apply, measure cost and output change, roll back; nothing if the action is refused.
        Choosing it later restores the rewritten graph (a snapshot restores any number of times)
        instead of running the action again."""
        snapshot = GraphSnapshot.take(graph)
        try:
            apply()
            after = cost()
            change = objective(self.probe(graph)(outputs))
            done = GraphSnapshot.take(graph)
        except PassError as exc:
            logger.info("compress: %s refused: %s", name, exc)
            return
        finally:
            snapshot.restore()
        yield _Candidate(name, kind, fraction, current - after, after, change, done.restore)


@dataclasses.dataclass
class _Budget:
    """The cost (parameters or seconds) at the start, the goal, and the scope the fractions in
    reports are of (the block parameters, the model's, or its latency)."""

    start: float
    goal: float
    scope: float
    what: str

    def left(self, cost: float) -> float:
        """The fraction of the scope a cost leaves."""
        return 1 - (self.start - cost) / self.scope

    def met(self, cost: float) -> bool:
        """Whether a cost meets the goal (up to float rounding of the sums)."""
        return cost <= self.goal * (1 + 1e-9)


@dataclasses.dataclass
class _Plan:
    drops: int  # blocks dropped
    steps: list[dict]
    lost: float  # output change against the original
    current: float  # cost after the plan
    done: GraphSnapshot | None = None  # the graph as the plan left it
    drops_done: _Drops | None = None  # the graph after its drops (None: they were not all made)
    refused: str = ""  # why the plan could not be made


@dataclasses.dataclass
class _Drops:
    """The graph after a plan's drops, with their steps and output change: where the plan with
    one more drop begins."""

    snapshot: GraphSnapshot
    steps: list[dict]
    lost: float


@dataclasses.dataclass
class _Candidate:
    name: str
    kind: str  # "drop" or the width kind
    fraction: float  # of the kind's original width (prune)
    saved: float
    after: float
    change: float
    apply: Callable[[], None]


class _Objective:
    """How far a variant's outputs are from the ORIGINAL's over the calibration batches; positions
    a batch's attention mask marks as padding do not count (their values are arbitrary and no user
    reads them). `l2`: relative L2 distance over every output. `cosine`: mean 1 - cos between the
    vectors along each output's last axis (tokens' hidden states, logits), scale-free like the
    normalised embeddings and argmaxes users read. `pooled`: the same after averaging each
    (batch, tokens, ...) output over its real tokens, as sentence-embedding models are read."""

    def __init__(
        self, reference: Sequence[list[np.ndarray]], masks: Sequence[np.ndarray | None], distance: str
    ):
        self.distance = distance
        self.reference = [[a.astype(np.float64) for a in arrays] for arrays in reference]
        self.weights = [
            [_weight(a, masks[b] if b < len(masks) else None) for a in arrays]
            for b, arrays in enumerate(self.reference)
        ]
        self.pooling = None
        if distance == "pooled":  # from here on a cosine over the pooled outputs
            self.pooling = self.weights
            self.reference = [
                [_pool(a, w) for a, w in zip(arrays, ws)] for arrays, ws in zip(self.reference, self.weights)
            ]
            self.weights = [[1.0 for _ in arrays] for arrays in self.reference]
        pairs = [(a, w) for arrays, ws in zip(self.reference, self.weights) for a, w in zip(arrays, ws)]
        if distance == "l2":
            self.total = sum(float(np.sum(w * a**2)) for a, w in pairs)
        else:
            self.total = sum(float(np.sum(np.broadcast_to(w, a.shape)[..., 0])) for a, w in _rows(pairs))

    def __call__(self, batches: Iterable[list[np.ndarray]]) -> float:
        num = 0.0
        for b, (ref, ws, arrays) in enumerate(zip(self.reference, self.weights, batches)):
            for i, (r, w, got) in enumerate(zip(ref, ws, arrays)):
                got = got.astype(np.float64)
                if self.pooling is not None:
                    got = _pool(got, self.pooling[b][i])
                if self.distance == "l2":
                    num += float(np.sum(w * (got - r) ** 2))
                    continue
                (r, w), (got, _) = _rows([(r, w), (got, w)])
                dot = np.sum(r * got, axis=-1)
                norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(got, axis=-1)
                cos = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
                num += float(np.sum(np.broadcast_to(w, r.shape)[..., 0] * (1.0 - cos)))
        if self.distance == "l2":
            return float(np.sqrt(num / max(self.total, 1e-30)))
        return num / max(self.total, 1e-30)


def _rows(pairs):
    """(array, weight) as vectors along the last axis (a 0-d or 1-d output: one vector)."""
    out = []
    for a, w in pairs:
        if a.ndim < 2:
            a, w = a.reshape(1, -1), 1.0
        out.append((a, w))
    return out


def _pool(array: np.ndarray, weight: np.ndarray | float) -> np.ndarray:
    """The mean over the token axis (1) of a (batch, tokens, ...) output, its padding left out;
    an output without a mask-shaped weight (logits of a pooled head) as it is."""
    if isinstance(weight, float) or array.ndim < 3:
        return array
    return np.sum(weight * array, axis=1) / np.maximum(np.sum(weight, axis=1), 1e-30)


def _weight(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray | float:
    """The mask broadcast over an output whose leading axes are (batch, tokens), else 1."""
    if mask is None or array.shape[: mask.ndim] != mask.shape:
        return 1.0
    return mask.reshape(mask.shape + (1,) * (array.ndim - mask.ndim)).astype(np.float64)


def _block_params(graph: Graph, units: Sequence[DepthUnit]) -> int:
    """Parameters inside the residual blocks: what removing each block alone removes (its
    branches' weights and the norms only it uses), counted on the rewritten graph."""
    total, before = 0, count_params(graph)
    for unit in units:
        snapshot = GraphSnapshot.take(graph)
        try:
            _remove(unit)
            total += before - count_params(graph)
        except IRError:  # a block the region rewrite refuses: its branches' weights
            total += unit.params
        finally:
            snapshot.restore()
    return total


# Scores this close are one score: ONNX Runtime and torch round the outputs differently, so a
# tie in the output change (quantised, e.g. a sign flip of a 1-element output row is 2 / rows)
# would otherwise go one way in one frontend and the other way in the other (a fuzz finding).
_NOISE = 1e-4  # relative to the best score
_FLOOR = 1e-6  # output change: float32 rounding of the outputs, far below any real difference


def _best(candidates: Sequence[_Candidate], lost: float, need: float) -> _Candidate | None:
    """The action with the least added output change per parameter (or second) it saves up to
    `need` (savings past the target earn nothing); scores within float noise of the least tie,
    and a tie goes to the larger saving, then to the earlier candidate. None if nothing saves."""
    scored = [(max(c.change - lost, 0.0) / min(c.saved, need), c) for c in candidates if c.saved > 0]
    if not scored:
        return None
    least = min(score for score, _ in scored)
    near = [c for score, c in scored if score <= least * (1 + _NOISE) + _FLOOR / min(c.saved, need)]
    return max(near, key=lambda c: c.saved)  # the first of equal savings


def _uniform_saving(groups, ratio: float) -> float:
    """Parameters `prune:uniform=true,ratio=R` removes from `groups` (int(R x size) units each,
    one kept at least), from the groups' parameters per unit."""
    total = 0.0
    for g in groups:
        units = min(int(ratio * g.size), g.size - 1)
        total += units * g.params / max(g.size, 1)
    return total


def _droppable(units: Sequence[DepthUnit]) -> list[DepthUnit]:
    """Blocks that may go: every stream keeps one; a block with a projection shortcut stays
    (its removal keeps the projection, which `replace` and the bypass do not model alike)."""
    per_stream: dict[int, int] = {}
    for unit in units:
        per_stream[unit.stream] = per_stream.get(unit.stream, 0) + 1
    return [u for u in units if per_stream[u.stream] > 1 and not u.per_branch]


def _latency(probe, outputs, repeats: int = 3) -> float:
    """Median seconds of the calibration batches after the first (the first call of a probe
    exports the module: not the model's latency), after one warm-up run."""
    runs = []
    for i in range(repeats + 1):
        total, last = 0.0, None
        for count, _ in enumerate(probe(outputs)):
            now = time.perf_counter()
            if count:
                total += now - last
            last = now
        if count == 0:  # one batch: time it whole, export included
            start = time.perf_counter()
            for _ in probe(outputs):
                pass
            total = time.perf_counter() - start
        if i:
            runs.append(total)
    return float(np.median(runs))
