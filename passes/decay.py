"""decay: decayed identity shortcuts ("Residual Connections Harm Generative
Representation Learning", Zhang, Jiang, Gao, Willett, Maire, 2024, arXiv 2404.10947).

`x_{l+1} = x_l + F_l(x_l)` -> `x_{l+1} = alpha_l * x_l + F_l(x_l)`, with
alpha_l = 1 - (1 - alpha_min) * (l + 1) / L for the site at depth l (0-based)
of a stream of L sites: alpha decreases linearly and the last site's is
alpha_min. Sites not selected keep alpha = 1.

compensate=true (pre-norm streams ending in a norm): with c_0 = 1 and
c_{l+1} = alpha_l c_l, the decayed net carries c_l x_l; because the norms are
scale-invariant, scaling each branch's last parameterised op by c_{l+1} makes
it compute exactly c_{l+1} x_{l+1}, and the final norm removes c_L. The
function is then preserved up to the norms' eps.
"""

from __future__ import annotations

import dataclasses

from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph

from ._depth import compensate_branch, constant_multiply, require_final_norm

__all__ = ["DecayPass", "decay_schedule"]


def decay_schedule(depth: int, length: int, alpha_min: float) -> float:
    return 1.0 - (1.0 - alpha_min) * (depth + 1) / length


class DecayPass(PassBase):
    """Decay the identity shortcut with depth along each stream.

    Refuses compensate=true on post-norm streams and on streams that do not end
    in a norm, naming the site or value.
    """

    name = "decay"
    summary = "alpha_l * skip + branch, alpha decaying linearly with depth to alpha_min"

    @dataclasses.dataclass
    class Options:
        alpha_min: float = dataclasses.field(
            default=0.5, metadata={"help": "skip weight of the deepest site"}
        )
        compensate: bool = dataclasses.field(
            default=False, metadata={"help": "rescale branches so the function is kept (pre-norm streams)"}
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        if not 0.0 < self.options.alpha_min <= 1.0:
            raise PassError("decay: alpha_min must be in (0, 1]")

    @property
    def preserves_function(self) -> bool:
        return self.options.compensate or self.options.alpha_min == 1.0

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        chosen = SiteSelector(self.options.sites)
        count = 0
        for stream in analysis.streams:
            if not any(chosen(s) for s in stream.sites):
                continue
            if self.options.compensate:
                require_final_norm(graph, self.name, stream)
            scale = 1.0
            for site in stream.sites:
                alpha = (
                    decay_schedule(site.depth, len(stream.sites), self.options.alpha_min)
                    if chosen(site)
                    else 1.0
                )
                if alpha != 1.0:
                    constant_multiply(graph, self.name, site, "skip", alpha)
                    count += 1
                scale *= alpha
                if self.options.compensate and scale != 1.0:
                    compensate_branch(graph, self.name, site, scale)
        return PassResult(graph, modified=count > 0, stats={"sites": count})
