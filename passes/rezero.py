"""rezero: `skip + branch` -> `skip + alpha * branch`, one learned scalar per site.

ReZero (Bachlechner et al. 2020, arXiv 2003.04887) initialises alpha = 0 so every
block starts as the identity; on an existing model that changes the function,
so the default here is alpha = 1, which preserves it exactly.
"""

from __future__ import annotations

import dataclasses

from rescompile.infra import PassBase, PassResult, sites_option
from rescompile.ir import Graph

from ._branch import multiply_operand, new_param

__all__ = ["RezeroPass"]


class RezeroPass(PassBase):
    """Insert a trainable scalar gate on each selected residual branch.

    Handles identity and projection sites alike (the gate scales the branch, not
    the shortcut). A model with no residual sites is left unchanged.
    """

    name = "rezero"
    summary = "skip + alpha * branch, one trainable scalar per site"

    @dataclasses.dataclass
    class Options:
        init: float = dataclasses.field(
            default=1.0, metadata={"help": "initial alpha (1 keeps the function, 0 is the paper's)"}
        )
        sites: str = sites_option()

    @property
    def preserves_function(self) -> bool:
        return self.options.init == 1.0

    def call(self, graph: Graph) -> PassResult:
        sites = self.selected_sites(graph)
        for site in sites:
            alpha = new_param(graph, self.name, site, "alpha", self.options.init)
            multiply_operand(graph, site, "branch", alpha, self.name)
        return PassResult(graph, modified=bool(sites), stats={"sites": len(sites)})
