"""depthscale: depth-muP branch multipliers (Bordelon et al. 2023, arXiv 2309.16620;
Yang et al. 2023, arXiv 2310.02244).

`skip + branch` -> `skip + branch / sqrt(L)` (mode=sqrt) or `/ L` (mode=linear),
L the number of sites on the stream. compensate=true multiplies the branch's
last parameterised op by sqrt(L) (or L) so the function is kept while the
parametrisation (and so the training dynamics) changes; `fold` can then fold
the multiplier back for inference.
"""

from __future__ import annotations

import dataclasses
import math

from rescompile.infra import PassBase, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph

from ._depth import compensate_branch, constant_multiply

__all__ = ["DepthScalePass"]


class DepthScalePass(PassBase):
    """Insert a constant 1/sqrt(L) or 1/L multiplier on each selected branch."""

    name = "depthscale"
    summary = "skip + branch / sqrt(L) (or / L), optional weight compensation"

    @dataclasses.dataclass
    class Options:
        mode: str = dataclasses.field(
            default="sqrt", metadata={"choices": ("sqrt", "linear"), "help": "1/sqrt(L) or 1/L"}
        )
        compensate: bool = dataclasses.field(
            default=False,
            metadata={"help": "scale the branch's parameters by the inverse (keeps the function)"},
        )
        sites: str = sites_option()

    @property
    def preserves_function(self) -> bool:
        return self.options.compensate

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        chosen = SiteSelector(self.options.sites)
        count = 0
        for stream in analysis.streams:
            length = len(stream.sites)
            factor = 1 / math.sqrt(length) if self.options.mode == "sqrt" else 1 / length
            for site in stream.sites:
                if not chosen(site):
                    continue
                if self.options.compensate:
                    compensate_branch(graph, self.name, site, 1 / factor)
                constant_multiply(graph, self.name, site, "branch", factor)
                count += 1
        return PassResult(graph, modified=count > 0, stats={"sites": count})
