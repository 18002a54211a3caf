"""parallel: the two branches of a layer read the same stream (GPT-J, PaLM, GPT-NeoX, Falcon).

Sequential pre-norm: h = x + A(N1 x); x' = h + M(N2 h). Parallel (GPT-NeoX's
`use_parallel_residual=True`): x' = x + A(N1 x) + M(N2 x). With `shared_norm=true` the MLP
reads the attention's norm, x' = x + A(N1 x) + M(N1 x) (GPT-J / PaLM), and N2 goes.

Option `c` interpolates exactly: the second branch reads x + c * A(N1 x), so c = 1 is the
original function and c = 0 the parallel form; `learnable=true` makes c a parameter to anneal
while fine-tuning. Works on any two consecutive residual branches of one layer (a unit of
`rescompile.analysis.importance.depth_units`), not only transformers. Papers: GPT-NeoX-20B
(Black et al. 2022, arXiv 2204.06745), PaLM (Chowdhery et al. 2022, arXiv 2204.02311). The
literature's speed-up needs tensor parallelism (one all-reduce per layer instead of two) or
fused input matmuls on large GPUs; on a few CPU cores the parallel form is not faster.
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.importance import depth_units
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, OpKind, Value
from rescompile.ir.regions import Region, remove, replace_entry

from ._branch import insert_op, new_param

__all__ = ["ParallelPass"]


class ParallelPass(PassBase):
    """Make the second branch of each selected two-branch layer read the layer's input."""

    name = "parallel"
    summary = "x + A(N1 x) + M(N2 x): a layer's two branches read the same stream (exact at c=1)"

    @dataclasses.dataclass
    class Options:
        c: float = dataclasses.field(
            default=0.0, metadata={"help": "the MLP reads x + c*A(N1 x): 1 keeps the function, 0 is parallel"}
        )
        learnable: bool = dataclasses.field(default=False, metadata={"help": "make c a trainable scalar"})
        shared_norm: bool = dataclasses.field(
            default=False, metadata={"help": "the MLP reads the attention's norm N1 (GPT-J); N2 is removed"}
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.shared_norm and self.options.c != 0.0:
            raise PassError(
                "parallel: shared_norm needs c=0 (with c != 0 the two norms read different values)"
            )

    @property
    def preserves_function(self) -> bool:
        return self.options.c == 1.0 and not self.options.shared_norm

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        selector = SiteSelector(self.options.sites)
        layers = [
            u for u in depth_units(analysis, "block") if len(u.sites) == 2 and all(map(selector, u.sites))
        ]
        if not layers and analysis.sites:
            raise PassError(
                "parallel: no layer with two consecutive branches on one stream "
                f"(layers have {sorted({len(u.sites) for u in depth_units(analysis, 'block')})} branches)"
            )
        for layer in layers:
            first, second = layer.sites
            if first.kind != "identity" or second.kind != "identity":
                raise PassError(f"parallel: site {second.name}: projection shortcuts keep their order")
            if second.fork is not first.output:
                raise PassError(
                    f"parallel: site {second.name} reads {second.fork.name!r}, not the previous add's "
                    f"output: only pre-norm layers can run their branches side by side"
                )
            branch = Region.of_branch(second)
            source = self._source(graph, first, second)
            if self.options.shared_norm:
                self._share_norm(graph, first, second, branch)
            else:
                replace_entry(branch, second.fork, source)
        return PassResult(graph, modified=bool(layers), stats={"layers": len(layers)})

    def _source(self, graph: Graph, first, second) -> Value:
        """What the second branch reads: x, or x + c * A(N1 x) when c != 0 or c is learnable."""
        o = self.options
        if o.c == 0.0 and not o.learnable:
            return first.fork
        c = new_param(graph, self.name, second, "c", o.c, trainable=o.learnable)
        scaled = insert_op(
            graph, "Mul", [first.branch, c], before=first.add, pass_name=self.name, name=f"{second.name}/c_a"
        )
        return insert_op(
            graph,
            "Add",
            [first.fork, scaled],
            before=first.add,
            pass_name=self.name,
            name=f"{second.name}/x_ca",
        )

    def _share_norm(self, graph: Graph, first, second, branch: Region) -> None:
        n1, n2 = _leading_norm(first), _leading_norm(second)
        if n1 is None or n2 is None:
            site = second if n2 is None else first
            raise PassError(f"parallel: shared_norm: site {site.name}'s branch does not start with a norm")
        for node in list(n2.outputs[0].consumers()):
            for i, value in enumerate(node.inputs):
                if value is n2.outputs[0]:
                    node.replace_input_with(i, n1.outputs[0])
        remove(Region(graph, [n2]), replace={})


def _leading_norm(site):
    """The norm node that reads the site's fork first in its branch (its pre-norm)."""
    for node in site.fork.consumers():
        if node.kind is OpKind.NORM and node in site.nodes:
            return node
    return None
