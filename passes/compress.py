"""compress: one planner over depth and width, to a parameter or latency budget.

Width pruning (`prune`) and depth pruning (`drop`) trade quality for size at different rates on
different models; the planner picks, step by step, whichever action costs the least
calibration output change per parameter (or per second of measured latency) it saves, until the
target is met: drop the one block whose removal changes the outputs least (SLEB's criterion,
Song et al. 2024, arXiv 2402.09025), or prune `step` more of the prunable parameters uniformly
(the same fraction in every layer, as NVIDIA's Minitron does so that a config describes the
result). Each candidate is applied to the graph, measured and rolled back; the winner is
applied for real. The plan is logged and returned in the stats: which blocks went, how much
width, and the predicted versus measured size or latency after each step.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from rescompile.analysis.cost import count_params
from rescompile.analysis.importance import depth_units
from rescompile.infra import PassBase, PassError, PassResult
from rescompile.ir import Graph
from rescompile.ir._transaction import GraphSnapshot

from .drop import _remove
from .prune import PrunePass

__all__ = ["CompressPass"]

logger = logging.getLogger("rescompile")


class CompressPass(PassBase):
    """Drop blocks and prune width until `params` (or `latency`) of the original is left."""

    name = "compress"
    required = {"params": 0.7}
    summary = "plan drop + uniform prune to a parameter or latency budget by output change per saving"

    @dataclasses.dataclass
    class Options:
        params: float = dataclasses.field(
            default=0.0, metadata={"help": "fraction of the parameters to keep, in (0, 1)"}
        )
        latency: float = dataclasses.field(
            default=0.0,
            metadata={"help": "fraction of the measured latency to keep, in (0, 1) (instead of params)"},
        )
        step: float = dataclasses.field(
            default=0.1,
            metadata={"help": "each width action prunes this fraction of the prunable parameters"},
        )
        importance: str = dataclasses.field(
            default="activation",
            metadata={"choices": ("l2", "l1", "activation"), "help": "how prune ranks units"},
        )
        max_steps: int = dataclasses.field(default=50, metadata={"help": "stop after this many actions"})

    def check_options(self) -> None:
        o = self.options
        if bool(o.params) == bool(o.latency):
            raise PassError("compress: give params=F or latency=F (the fraction to keep), one of them")
        budget = o.params or o.latency
        if not 0.0 < budget < 1.0:
            raise PassError(f"compress: the fraction to keep must be in (0, 1), not {budget:g}")
        if not 0.0 < o.step < 1.0:
            raise PassError(f"compress: step must be in (0, 1), not {o.step:g}")

    @property
    def preserves_function(self) -> bool:
        return False

    @property
    def keeps_model_class(self) -> bool:
        return True  # whole blocks and uniform widths: a config can describe the result

    def call(self, graph: Graph) -> PassResult:
        self._refit = "none"  # as prune's auto: least_squares overfits small calibration sets
        probe = self.probe(graph)
        self.calibration = probe.batches  # the same batches for every measurement and for prune
        outputs = list(graph.outputs)
        reference = [np.concatenate([a.ravel() for a in arrays]) for arrays in probe(outputs)]
        measure_latency = bool(self.options.latency)

        def change() -> float:
            num = den = 0.0
            for ref, arrays in zip(reference, self.probe(graph)(outputs)):
                got = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
                num += float(np.sum((got - ref) ** 2))
                den += float(np.sum(ref.astype(np.float64) ** 2))
            return float(np.sqrt(num / max(den, 1e-30)))

        def cost() -> float:
            if not measure_latency:
                return float(count_params(graph))
            return _latency(self.probe(graph), outputs)

        start = cost()
        goal = start * (self.options.latency or self.options.params)
        current, lost = start, 0.0
        plan: list[dict] = []
        while current > goal and len(plan) < self.options.max_steps:
            options = []
            for action in self._candidates(graph):
                snapshot = GraphSnapshot.take(graph)
                try:
                    action["apply"]()
                    after, changed = cost(), change()
                except PassError:
                    continue  # e.g. nothing prunable is left
                finally:
                    snapshot.restore()
                saved = current - after
                if saved > 0:
                    options.append((max(changed - lost, 0.0) / saved, after, changed, action))
            if not options:
                raise PassError(
                    f"compress: cannot reach {goal / start:.0%} of the "
                    f"{'latency' if measure_latency else 'parameters'}: no action saves more "
                    f"(reached {current / start:.0%})"
                )
            _, predicted, lost, action = min(options, key=lambda o: o[0])
            action["apply"]()
            current = cost()
            plan.append(
                {
                    "action": action["name"],
                    "output_change": round(lost, 6),
                    "predicted": round(predicted / start, 4),
                    "measured": round(current / start, 4),
                }
            )
            logger.info(
                "compress: %s -> %.1f%% left, output change %.4f", action["name"], 100 * current / start, lost
            )
        return PassResult(
            graph,
            modified=bool(plan),
            stats={
                "steps": len(plan),
                "left": round(current / start, 4),
                "output_change": round(lost, 6),
                "plan": plan,
            },
        )

    def _candidates(self, graph: Graph) -> list[dict]:
        """This step's actions on the current graph: drop each block (keeping at least one per
        stream), or prune `step` more width."""
        actions = []
        units = depth_units(self.residuals(graph), "block")
        per_stream = {}
        for unit in units:
            per_stream[unit.stream] = per_stream.get(unit.stream, 0) + 1
        for unit in units:
            if per_stream[unit.stream] > 1 and not unit.per_branch:
                actions.append({"name": f"drop {unit.name}", "apply": lambda unit=unit: _remove(unit)})
        pruner = PrunePass(
            ratio=self.options.step, uniform=True, importance=self.options.importance, refit=self._refit
        )
        pruner.calibration = self.calibration

        actions.append(
            {"name": f"prune {self.options.step:g} of the width", "apply": lambda: pruner.call(graph)}
        )
        return actions


def _latency(probe, outputs, repeats: int = 3) -> float:
    """Median seconds of one pass over the calibration batches (after one warm-up run)."""
    runs = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for _ in probe(outputs):
            pass
        if i:
            runs.append(time.perf_counter() - start)
    return float(np.median(runs))
