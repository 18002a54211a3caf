"""ladder: each residual module reads the stream from before the previous module's update.

Ladder Residual (Zhang, Mishra, ..., Dao, ICML 2025, arXiv 2501.06589). Modules k = 1..2L
(attention, MLP, attention, ...), each with its pre-norm inside h_k:
standard x_k = x_{k-1} + h_k(x_{k-1}); ladder x_k = x_{k-1} + h_k(x_{k-2}), so under tensor
parallelism the all-reduce of h_{k-1} overlaps the computation of h_k.

Option `c` interpolates exactly: module k reads x_{k-2} + c * h_{k-1}; c = 1 is the original
function, c = 0 the ladder; `learnable=true` makes each c a parameter. `layers=n` converts the
modules of the last n layers of each stream (0: all), `sites=` the listed modules. A stream's
first module has no previous one and keeps reading x_0 (the paper's x_{-1} := x_0); the first
converted module of a partly converted stream reads the stream before its predecessor's update,
as the formula says. Refused, naming the site: post-norm modules (the stream before the
previous update is not what the module reads) and projection shortcuts.
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.importance import depth_units
from rescompile.analysis.residuals import ResidualSite
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, Value
from rescompile.ir.regions import Region, replace_entry

from ._branch import insert_op, new_param
from ._streams import reads_output

__all__ = ["LadderPass"]


class LadderPass(PassBase):
    """Make each selected module read x_{k-2} + c * h_{k-1} instead of x_{k-1}."""

    name = "ladder"
    summary = "x_k = x_{k-1} + h_k(x_{k-2}): module k skips module k-1's update (exact at c=1)"

    @dataclasses.dataclass
    class Options:
        c: float = dataclasses.field(
            default=0.0,
            metadata={"help": "module k reads x_{k-2} + c*h_{k-1}: 1 keeps the function, 0 is ladder"},
        )
        learnable: bool = dataclasses.field(
            default=False, metadata={"help": "make each c a trainable scalar"}
        )
        layers: int = dataclasses.field(
            default=0, metadata={"help": "convert the modules of the last n layers of each stream (0: all)"}
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.layers < 0:
            raise PassError(f"ladder: layers must be >= 0, got {self.options.layers}")

    @property
    def preserves_function(self) -> bool:
        return self.options.c == 1.0

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        pairs = self._pairs(analysis)
        if not pairs and analysis.sites:
            raise PassError("ladder: no selected module has a previous module on its stream")
        for previous, site in pairs:
            if previous.kind != "identity" or site.kind != "identity":
                raise PassError(f"ladder: site {site.name}: projection shortcuts change the stream's shape")
            if not reads_output(site, previous):
                raise PassError(
                    f"ladder: site {site.name} reads {site.fork.name!r}, not the previous add's output: "
                    "only pre-norm modules can read the stream from before it"
                )
        branches = [Region.of_branch(site) for _, site in pairs]
        for (previous, site), branch in zip(pairs, branches):
            replace_entry(branch, site.fork, self._source(graph, previous, site))
        return PassResult(graph, modified=bool(pairs), stats={"modules": len(pairs)})

    def _pairs(self, analysis) -> list[tuple[ResidualSite, ResidualSite]]:
        """(module k-1, module k) for every selected module k that has a predecessor."""
        selector, n = SiteSelector(self.options.sites), self.options.layers
        chosen: set[ResidualSite] = set()
        every_unit = depth_units(analysis, "block")
        for stream in analysis.streams:
            units = [u for u in every_unit if u.stream == stream.index]
            for unit in units[-n:] if n else units:
                chosen.update(s for s in unit.sites if selector(s))
        return [
            (previous, site)
            for stream in analysis.streams
            for previous, site in zip(stream.sites, stream.sites[1:])
            if site in chosen
        ]

    def _source(self, graph: Graph, previous: ResidualSite, site: ResidualSite) -> Value:
        """x_{k-2}, or x_{k-2} + c * h_{k-1} when c != 0 or c is learnable."""
        o = self.options
        if o.c == 0.0 and not o.learnable:
            return previous.fork
        c = new_param(graph, self.name, site, "c", o.c, trainable=o.learnable)
        scaled = insert_op(
            graph,
            "Mul",
            [previous.branch, c],
            before=previous.add,
            pass_name=self.name,
            name=f"{site.name}/c_h",
        )
        return insert_op(
            graph,
            "Add",
            [previous.fork, scaled],
            before=previous.add,
            pass_name=self.name,
            name=f"{site.name}/x_ch",
        )
