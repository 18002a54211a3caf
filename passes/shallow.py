"""shallow: a run of k consecutive residual branches all read the run's input and are summed.

Make Deep Networks Shallow Again (Bermeitinger, Hrycej, Handschuh, 2023, arXiv 2309.08414).
Sequential: y = (I + F_k) o ... o (I + F_1)(x) = x + sum_l F_l(x) + sum_{i<j} J_{F_j} F_i + O(F^3).
Shallow keeps the first two terms, y = x + sum_l F_l(x): one wide layer instead of k deep ones.
Not function-preserving; the error is second order in the branch size.

Runs are k consecutive identity sites of one stream, starting at the selected sites (`sites=`),
taken in stream order without overlap. The adds stay where they are (x + F_1(x) + F_2(x) + ...);
each branch after the first is re-pointed at the run's input. Refused, naming the site: a
post-norm run (a branch reads a normed value, not the previous add's output) and an
intermediate stream value that something outside the run also reads (it would silently change).
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.residuals import ResidualSite
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, OpKind
from rescompile.ir.regions import Region, replace_entry

from ._streams import reads_output

__all__ = ["ShallowPass"]


class ShallowPass(PassBase):
    """Sum each run of k consecutive branches computed from the run's input."""

    name = "shallow"
    summary = "x + sum_l F_l(x): a run of k consecutive branches reads the run's input (2nd-order change)"

    @dataclasses.dataclass
    class Options:
        k: int = dataclasses.field(default=2, metadata={"help": "branches per run (>= 2)"})
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.k < 2:
            raise PassError(f"shallow: k must be >= 2, got {self.options.k}")

    @property
    def preserves_function(self) -> bool:
        return False

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        runs = self._runs(analysis)
        if not runs and analysis.sites:
            raise PassError(
                f"shallow: no run of {self.options.k} consecutive identity branches on one stream"
            )
        rewires = [(Region.of_branch(site), site.fork, run[0].fork) for run in runs for site in run[1:]]
        for region, old, new in rewires:
            replace_entry(region, old, new)
        return PassResult(graph, modified=bool(runs), stats={"runs": len(runs), "k": self.options.k})

    def _runs(self, analysis) -> list[tuple[ResidualSite, ...]]:
        """Non-overlapping runs from the selected starts; every run checked before any edit."""
        k, selector = self.options.k, SiteSelector(self.options.sites)
        explicit = self.options.sites != "all"
        runs = []
        for stream in analysis.streams:
            sites, i = stream.sites, 0
            while i < len(sites):
                run = sites[i : i + k]
                if not selector(sites[i]):
                    i += 1
                    continue
                if len(run) < k or any(s.kind != "identity" for s in run):
                    if explicit:
                        raise PassError(
                            f"shallow: site {sites[i].name} starts no run of {k} identity branches "
                            f"on stream {stream.index}"
                        )
                    i += 1
                    continue
                for previous, site in zip(run, run[1:]):
                    _check_link(previous, site)
                runs.append(tuple(run))
                i += k
        return runs


def _check_link(previous: ResidualSite, site: ResidualSite) -> None:
    """`site` must read `previous`'s output directly, and nothing outside the run may read it."""
    if not reads_output(site, previous):
        raise PassError(
            f"shallow: site {site.name} reads {site.fork.name!r}, not the previous add's output: "
            "only pre-norm runs can read the run's input"
        )
    if site.fork.shape != previous.fork.shape:
        raise PassError(f"shallow: site {site.name}: the stream's shape changes along the run")
    branch = Region.of_branch(site)
    others = [
        n
        for n in site.fork.consumers()
        if n is not site.add and n not in branch and n.kind is not OpKind.SHAPE
    ]
    if others or site.fork.is_graph_output:
        reader = others[0].name if others else "a graph output"
        raise PassError(
            f"shallow: site {site.name}: {site.fork.name!r} inside the run is also read by {reader}"
        )
