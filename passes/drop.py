"""drop: depth pruning. Remove whole residual branches or blocks, chosen by measured importance.

A residual site makes it one rewrite: `out = skip + branch` becomes `out = skip`, and a block
(the branches of one layer) is removed whole: its exit is replaced by its entry. What only the
removed nodes used goes too (weights included), so the file and the module shrink. Removing
about a quarter of a transformer's layers keeps most of its quality (ShortGPT, Men et al. 2024,
arXiv 2403.03853; Gromov et al. 2024, arXiv 2403.17887; SLEB, Song et al. 2024, arXiv
2402.09025), and latency falls with the layers removed on any runtime.

Units are chosen by a metric on calibration inputs (`rescompile.analysis.importance`): `bi`,
`angular` (a contiguous run), `greedy` (re-measured after each pick) or `norm`; or named with
`sites=`, bypassing the metric. `replace=linear` puts an affine map of the stream, fit on the
calibration tokens, in each removed run's place (LLM-Streamline, Chen et al. 2024, in closed
form). Not function-preserving.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from rescompile.analysis.importance import (
    METRICS,
    DepthUnit,
    UnitScore,
    best_run,
    depth_units,
    greedy_order,
    score_units,
)
from rescompile.frontends.probe import attention_mask
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, Value
from rescompile.ir.regions import Region, remove, remove_branch

from ._branch import channel_axis, insert_op, new_param

__all__ = ["DropPass", "unit_scores"]

logger = logging.getLogger("rescompile")


class DropPass(PassBase):
    """Remove `n` (or a `ratio` of the) residual units with the lowest importance.

    unit=block removes whole layers (for HF models the result is still that model class with
    fewer layers); unit=branch removes single attention or MLP branches. A projection site
    keeps its shortcut. Refuses to remove every unit.
    """

    name = "drop"
    summary = "depth pruning: remove whole residual blocks or branches by measured importance"

    @dataclasses.dataclass
    class Options:
        n: int = dataclasses.field(default=0, metadata={"help": "how many units to remove (default 1)"})
        ratio: float = dataclasses.field(
            default=0.0, metadata={"help": "fraction of the units to remove, in (0, 1) (instead of n)"}
        )
        unit: str = dataclasses.field(
            default="block",
            metadata={"choices": ("block", "branch"), "help": "block (a whole layer) or branch"},
        )
        metric: str = dataclasses.field(
            default="bi",
            metadata={
                "choices": METRICS,
                "help": "bi (1 - cos in/out), angular (contiguous run), greedy (output change), "
                "norm (update size)",
            },
        )
        replace: str = dataclasses.field(
            default="identity",
            metadata={
                "choices": ("identity", "linear"),
                "help": "what takes a removed run's place: identity, or linear (an affine d x d map "
                "of the stream fit on the calibration tokens, ridge towards the identity with the "
                "strength that does best on held-out batches; LLM-Streamline's idea)",
            },
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        o = self.options
        if o.n < 0:
            raise PassError(f"drop: n must be >= 1, not {o.n}")
        if o.ratio and not 0.0 < o.ratio < 1.0:
            raise PassError(f"drop: ratio must be in (0, 1), not {o.ratio:g}")
        if o.n and o.ratio:
            raise PassError("drop: give n or ratio, not both")

    @property
    def preserves_function(self) -> bool:
        return False

    @property
    def keeps_model_class(self) -> bool:
        """Removing whole layers leaves a model its own class describes (with fewer layers); a
        linear map in their place is nothing the class has."""
        return self.options.unit == "block" and self.options.replace == "identity"

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        units = depth_units(analysis, self.options.unit)
        if not units:
            return PassResult(graph, modified=False, stats={"removed": 0})
        chosen, scores = self.choose(graph, units)
        if self.options.replace == "linear":
            runs = _runs(chosen)
            for run, linear in zip(runs, self.fit_linear(graph, runs)):
                sites = [site for unit in run for site in unit.sites]
                remove(Region.of_block(sites, exit=run[-1].exit), replace={run[-1].exit: linear})
        else:
            for unit in sorted(chosen, key=lambda u: graph.node_order()[u.sites[-1].add], reverse=True):
                _remove(unit)
        stats = {
            "units": len(units),
            "removed": len(chosen),
            "removed_units": [u.name for u in chosen],
            "removed_positions": [[u.stream, u.index] for u in chosen],
            "params_removed": sum(u.params for u in chosen),
        }
        if self.options.replace == "linear":
            stats["linear_fits"] = self.linear_fits
        if scores is not None:  # inf (never chosen) as None: JSON has no infinity
            stats["scores"] = {
                s.unit.name: round(s.score, 6) if np.isfinite(s.score) else None for s in scores
            }
        return PassResult(graph, modified=True, stats=stats)

    def count(self, total: int) -> int:
        o = self.options
        count = o.n or (round(o.ratio * total) if o.ratio else 1)
        if o.ratio and count == 0:
            raise PassError(f"drop: ratio={o.ratio:g} of {total} units removes none; raise it or use n=1")
        if count >= total:
            raise PassError(
                f"drop: removing {count} of the model's {total} {self.options.unit} units would "
                f"remove every one; n must be below {total}"
            )
        return count

    def choose(self, graph: Graph, units: list[DepthUnit]) -> tuple[list[DepthUnit], list[UnitScore] | None]:
        """The units to remove, and the scores behind the choice (None for `sites=`)."""
        o = self.options
        if o.sites != "all":
            selector = SiteSelector(o.sites)
            chosen = [u for u in units if any(selector(s) for s in u.sites)]
            if o.n or o.ratio:
                raise PassError("drop: sites= names the units to remove; leave out n and ratio")
            if len(chosen) >= len(units):
                raise PassError(f"drop: sites={o.sites} selects all {len(units)} units; keep at least one")
            return chosen, None
        count = self.count(len(units))
        probe = self.probe(graph)
        if o.metric == "greedy":
            try:
                picks = greedy_order(units, count, probe, list(graph.outputs))
            except ValueError as exc:
                raise PassError(f"drop: metric=greedy measures no finite output change: {exc}") from None
            return [p.unit for p in picks], picks
        scores = unit_scores(units, o.metric, probe, graph=graph, run=count)
        if o.metric == "angular":
            try:
                return best_run(scores, count), scores
            except ValueError:
                raise PassError(
                    f"drop: angular removes a run of {count} consecutive units of one stream; "
                    f"no stream has {count} units"
                ) from None
        ranked = sorted(scores, key=lambda s: s.score)
        if not all(np.isfinite(s.score) for s in ranked[:count]):
            finite = sum(np.isfinite(s.score) for s in scores)
            raise PassError(
                f"drop: only {finite} of {len(units)} units have a finite {o.metric} score on the "
                f"calibration inputs (their activations are not finite); cannot remove {count}"
            )
        return [s.unit for s in ranked[:count]], scores

    def fit_linear(self, graph: Graph, runs: list[list[DepthUnit]]) -> list[Value]:
        """For each run of removed units, an affine map y = x A + c of the stream, from the run's
        entry x to its exit y (the value the rest of the graph reads, after a post-norm block's
        LayerNorm), inserted before the run. Returns the value that replaces each run's exit.

        Rows are the calibration tokens, padding left out (`attention_mask`). A d x d map fit by
        plain least squares on a few hundred tokens overfits and can be worse than removing the
        run outright, so the fit is ridge regression shrunk towards the identity, its strength
        (relative to the mean Gram diagonal) chosen by two-fold cross-validation over the
        calibration batches; the identity itself is a candidate, so the chosen map is never worse
        than dropping the run on held-out rows (then it is dropped). Statistics are streamed
        (Gram matrices per fold), never all activations."""
        for run in runs:
            for unit in run:
                if unit.per_branch:
                    raise PassError(
                        f"drop: replace=linear removes whole blocks; {unit.name} keeps a shortcut"
                    )
            axis = channel_axis(run[0].entry)
            if axis != len(run[0].entry.shape) - 1:
                raise PassError(
                    f"drop: replace=linear needs channels last; {run[0].name}'s stream has "
                    f"them on axis {axis}"
                )
        values = [v for run in runs for v in (run[0].entry, run[-1].exit)]
        widths = [run[0].entry.shape[-1] for run in runs]
        folds = [[_Moments(d) for _ in range(2)] for d in widths]
        probe = self.probe(graph)
        batches = list(getattr(probe, "batches", ()))
        split_rows = len(batches) < 2  # one batch: alternate tokens instead of batches
        for number, arrays in enumerate(probe(values)):
            mask = attention_mask(batches[number]) if number < len(batches) else None
            for k, d in enumerate(widths):
                x, y = arrays[2 * k], arrays[2 * k + 1]
                keep = _token_rows(mask, x.shape[:-1])
                x = x.reshape(-1, d)[keep].astype(np.float64)
                y = y.reshape(-1, d)[keep].astype(np.float64)
                if split_rows:
                    folds[k][0].add(x[0::2], y[0::2])
                    folds[k][1].add(x[1::2], y[1::2])
                else:
                    folds[k][number % 2].add(x, y)
        maps, fits = [], []
        for run, (first, second) in zip(runs, folds):
            solution, fit = _ridge_towards_identity(first, second)
            fits.append({"unit": run[0].name, "units": len(run), **fit})
            if solution is None:
                maps.append(run[0].entry)  # the identity won on held-out rows: drop the run
                continue
            site = run[0].sites[0]
            weight = new_param(graph, self.name, site, "W", solution[:-1])
            bias = new_param(graph, self.name, site, "b", solution[-1])
            kw = dict(pass_name=self.name, before=site.nodes[0] if site.nodes else site.add)
            product = insert_op(graph, "MatMul", [run[0].entry, weight], name=f"{site.name}/linear", **kw)
            maps.append(insert_op(graph, "Add", [product, bias], name=f"{site.name}/linear_bias", **kw))
        self.linear_fits = fits
        return maps


# Ridge strengths tried, relative to the mean diagonal of the Gram matrix of the run's input.
RIDGE_GRID = (0.0, *(float(10.0**e) for e in np.arange(-6.0, 2.01, 0.25)))


class _Moments:
    """Streamed sums for an affine least-squares fit: [x 1]^T [x 1], [x 1]^T y, per-column y^2."""

    def __init__(self, d: int) -> None:
        self.gram = np.zeros((d + 1, d + 1))
        self.cross = np.zeros((d + 1, d))
        self.yy = np.zeros(d)
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        self.gram += x1.T @ x1
        self.cross += x1.T @ y
        self.yy += np.sum(y * y, axis=0)
        self.rows += len(x)

    def error(self, solution: np.ndarray) -> float:
        """Sum of squared residuals of y - [x 1] solution over these rows."""
        s = solution
        return float(np.sum(s * (self.gram @ s)) - 2.0 * np.sum(s * self.cross) + np.sum(self.yy))

    def __add__(self, other: _Moments) -> _Moments:
        total = _Moments(len(self.yy))
        total.gram, total.cross = self.gram + other.gram, self.cross + other.cross
        total.yy, total.rows = self.yy + other.yy, self.rows + other.rows
        return total


def _identity_solution(d: int) -> np.ndarray:
    solution = np.zeros((d + 1, d))
    solution[:d] = np.eye(d)
    return solution


def _ridge_solve(m: _Moments, strength: float) -> np.ndarray:
    """argmin ||[x 1] S - y||^2 + lam ||A - I||^2 (the bias unpenalized), lam = strength x the
    mean diagonal of x^T x: large strengths give the identity plus the mean offset."""
    d = len(m.yy)
    scale = max(float(np.trace(m.gram[:d, :d])) / d, 1e-30)
    penalty = np.eye(d + 1)
    penalty[d, d] = 0.0
    lam = strength * scale
    jitter = 1e-10 * scale * np.eye(d + 1)  # keeps lam = 0 solvable when x is rank-deficient
    return np.linalg.solve(m.gram + lam * penalty + jitter, m.cross + lam * penalty @ _identity_solution(d))


def _ridge_towards_identity(first: _Moments, second: _Moments) -> tuple[np.ndarray | None, dict]:
    """The affine map for the held-out-best ridge strength, fit on both folds; None when the
    identity (dropping the run) is at least as good on held-out rows. Also the choice's record."""
    d = len(first.yy)
    if min(first.rows, second.rows) == 0:
        raise PassError("drop: replace=linear needs calibration tokens in two batches (or two tokens)")
    identity = _identity_solution(d)
    held_identity = first.error(identity) + second.error(identity)
    best_error, best_strength = held_identity, None
    for strength in RIDGE_GRID:
        held = second.error(_ridge_solve(first, strength)) + first.error(_ridge_solve(second, strength))
        if held < best_error:
            best_error, best_strength = held, strength
    record = {
        "rows": first.rows + second.rows,
        "ridge": best_strength,
        "heldout_error_vs_identity": round(best_error / max(held_identity, 1e-30), 6),
    }
    if best_strength is None:
        return None, record
    return _ridge_solve(first + second, best_strength), record


def _token_rows(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Which rows of the flattened (tokens, d) activations are real tokens: the attention mask's
    ones when it has the activations' leading shape, else every row."""
    if mask is None or tuple(mask.shape) != tuple(shape):
        return np.ones(int(np.prod(shape)), dtype=bool)
    return mask.reshape(-1) != 0


def unit_scores(units, metric: str, probe, *, graph: Graph, run: int = 1) -> list[UnitScore]:
    """Every unit's score under `metric` (what `inspect --importance` prints); padding tokens of
    batches with an `attention_mask` are left out of per-token averages."""
    masks = [attention_mask(b) for b in getattr(probe, "batches", ())]
    return score_units(
        units,
        metric,
        probe,
        channel_axis=channel_axis,
        run=run,
        outputs=list(graph.outputs),
        token_masks=masks,
    )


def _runs(units: list[DepthUnit]) -> list[list[DepthUnit]]:
    """Maximal runs of consecutive units of one stream."""
    runs: list[list[DepthUnit]] = []
    for unit in sorted(units, key=lambda u: (u.stream, u.index)):
        if runs and runs[-1][-1].stream == unit.stream and runs[-1][-1].index + 1 == unit.index:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs


def _remove(unit: DepthUnit) -> None:
    if unit.per_branch:
        for site in reversed(unit.sites):
            remove_branch(site)
        return
    region = Region.of_block(unit.sites, exit=unit.exit)
    remove(region, replace={unit.exit: unit.entry})
