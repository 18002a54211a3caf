"""macaron: attention between two half-step FFNs (Macaron Net, Lu et al. 2019, arXiv 1906.02762).

Macaron Net reads a transformer layer as a Strang splitting of an ODE step:
x <- x + 1/2 FFN_a(N_a x); x <- x + Attn(N x); x <- x + 1/2 FFN_b(N_b x), with FFN_a and FFN_b
separate weights. A pre-norm layer [A, M] (h = x + A(N1 x); x' = h + M(N2 h)) becomes that
layer without changing its function:
- FFN_a, with its own norm N_a, is a copy of the MLP branch N2, M whose output projection is
  zeroed, so it adds 0 (its weights train from there);
- FFN_b is the original MLP with its output layer doubled, so 1/2 FFN_b = M.
The 1/2 factors are constants in the graph, not parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.analysis.importance import depth_units
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph
from rescompile.ir.regions import Region, clone, replace_entry

from ._branch import insert_op, new_param
from ._scale_params import ScaleRefused, scale_output
from ._streams import reads_output

__all__ = ["MacaronPass"]


class MacaronPass(PassBase):
    """Insert a zero-initialised half-step copy of each selected layer's MLP before its attention.

    Refused (one line, nothing changed): models without two-branch layers, post-norm layers
    (the second branch does not read the first add's output), projection shortcuts, and MLPs
    whose output layer has no parameters to scale (or shares them).
    """

    name = "macaron"
    summary = "x + 1/2 FFN_a, + Attn, + 1/2 FFN_b: a zeroed MLP copy before the attention (exact)"

    @dataclasses.dataclass
    class Options:
        sites: str = sites_option()

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        selector = SiteSelector(self.options.sites)
        units = depth_units(analysis, "block")
        layers = [u for u in units if len(u.sites) == 2 and all(map(selector, u.sites))]
        if not layers and analysis.sites:
            raise PassError(
                "macaron: no layer with two consecutive branches on one stream "
                f"(layers have {sorted({len(u.sites) for u in units})} branches)"
            )
        for layer in layers:
            self._check(*layer.sites)
        for layer in layers:
            self._convert(graph, *layer.sites)
        return PassResult(graph, modified=bool(layers), stats={"layers": len(layers)})

    @staticmethod
    def _check(first, second) -> None:
        for site in (first, second):
            if site.kind != "identity":
                raise PassError(f"macaron: site {site.name}: a projection shortcut cannot take a half step")
        if not reads_output(second, first):
            raise PassError(
                f"macaron: site {second.name} reads {second.fork.name!r}, not the previous add's output: "
                "only pre-norm layers convert exactly"
            )

    def _convert(self, graph: Graph, first, second) -> None:
        x = first.fork
        attention = Region.of_branch(first)
        copied = clone(
            Region.of_branch(second), inputs={second.fork: x}, share_params=False, prefix="macaron/"
        )
        ffn_a = copied[second.branch]
        site = second
        try:
            edits = scale_output(graph, ffn_a, np.float64(0.0)) + scale_output(
                graph, second.branch, np.float64(2.0)
            )
        except ScaleRefused as exc:
            raise PassError(f"macaron: site {site.name}: the MLP's output layer: {exc}") from exc
        for edit in edits:
            edit()
        half_b = new_param(graph, self.name, second, "half_step", 0.5, trainable=False)
        halved = insert_op(
            graph,
            "Mul",
            [second.branch, half_b],
            before=second.add,
            pass_name=self.name,
            name=f"{site.name}/half",
        )
        second.add.replace_input_with(1 - second.skip_index, halved)
        half_a = new_param(graph, self.name, first, "half_step", 0.5, trainable=False)
        step = insert_op(
            graph,
            "Mul",
            [ffn_a, half_a],
            after=ffn_a.producer,
            pass_name=self.name,
            name=f"{first.name}/half",
        )
        x_a = insert_op(
            graph, "Add", [x, step], after=step.producer, pass_name=self.name, name=f"{first.name}/ffn_a"
        )
        replace_entry(attention, x, x_a)
        first.add.replace_input_with(first.skip_index, x_a)
