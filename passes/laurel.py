"""laurel: learned augmented residuals (LAuReL, Menghani et al. 2024, arXiv 2411.07501).

- rw: `skip + branch` -> `beta * skip + alpha * branch` (learned scalars, init 1);
- lr: `skip + branch` -> `skip + branch + (skip @ A) @ B`, a rank-r linear map of
  the skip with B = 0 at init (A random, scaled 1/sqrt(d)); at a projection site
  `W x + branch` the map reads x (d_in -> d_out), so the site stays a projection;
- pa: `skip + branch` -> `skip + branch + sum_j gamma_j * x_j` over the earlier
  values x_j entering blocks j < l of the same stream (learned scalars, init 0;
  `window` limits j to the last k blocks). Earlier values of another shape
  (after a projection in a CNN) are not used.
Every default keeps the function.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.infra import PassBase, PassError, PassResult, sites_option
from rescompile.ir import Graph

from ._branch import channel_axis, channel_count, insert_op, multiply_operand, new_param

__all__ = ["LaurelPass"]


class LaurelPass(PassBase):
    """Rewrite each selected site into a LAuReL variant (see the module docstring).

    `lr` needs the channel axis last (token streams); it refuses NCHW sites by name.
    """

    name = "laurel"
    summary = "LAuReL residuals: rw (learned weights), lr (low-rank skip map), pa (earlier activations)"

    @dataclasses.dataclass
    class Options:
        variant: str = dataclasses.field(
            default="rw", metadata={"choices": ("rw", "lr", "pa"), "help": "rw, lr or pa"}
        )
        rank: int = dataclasses.field(default=8, metadata={"help": "lr: rank r of the skip map"})
        window: int = dataclasses.field(default=0, metadata={"help": "pa: earlier blocks used (0: all)"})
        alpha: float = dataclasses.field(default=1.0, metadata={"help": "rw: initial branch weight"})
        beta: float = dataclasses.field(default=1.0, metadata={"help": "rw: initial skip weight"})
        seed: int = dataclasses.field(default=0, metadata={"help": "lr: seed for A"})
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.rank < 1 or self.options.window < 0:
            raise PassError("laurel: rank must be >= 1 and window >= 0")

    @property
    def preserves_function(self) -> bool:
        return self.options.variant != "rw" or (self.options.alpha == 1.0 and self.options.beta == 1.0)

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        sites = self.selected_sites(graph)
        streams = {s.index: s for s in analysis.streams}
        rng = np.random.default_rng(self.options.seed)
        added = 0
        for site in sites:
            if self.options.variant == "rw":
                multiply_operand(
                    graph,
                    site,
                    "branch",
                    new_param(graph, self.name, site, "alpha", self.options.alpha),
                    self.name,
                )
                multiply_operand(
                    graph,
                    site,
                    "skip",
                    new_param(graph, self.name, site, "beta", self.options.beta),
                    self.name,
                )
                continue
            extras = (
                self._lowrank(graph, site, rng)
                if self.options.variant == "lr"
                else self._previous(graph, site, streams[site.stream])
            )
            total = site.branch
            for i, extra in enumerate(extras):
                total = insert_op(
                    graph,
                    "Add",
                    [total, extra],
                    before=site.add,
                    pass_name=self.name,
                    name=f"{site.name}/sum{i}",
                    like=site.branch,
                )
            if extras:
                site.add.replace_input_with(1 - site.skip_index, total)
                added += len(extras)
        return PassResult(
            graph,
            modified=bool(sites),
            stats={"sites": len(sites), "terms": added}
            if self.options.variant != "rw"
            else {"sites": len(sites)},
        )

    def _lowrank(self, graph, site, rng):
        """The term reads the skip of an identity site, but the fork `x` of a projection site
        (a d_in -> d_out map beside the shortcut `W x`): read from `W x`, it would make `W x` the
        input of a weighted path into the branch, and the site an identity site of `W x`."""
        skip = site.skip
        source = site.fork if site.kind == "projection" else skip
        for value in dict.fromkeys((source, skip)):
            if channel_axis(value) != len(value.shape) - 1:
                raise PassError(f"laurel: lr needs channels last; site {site.name} is NCHW ({value.shape})")
        d_in, d = channel_count(source), channel_count(skip)
        r = min(self.options.rank, d_in, d)
        a = new_param(graph, self.name, site, "A", rng.standard_normal((d_in, r)) / np.sqrt(d_in))
        b = new_param(graph, self.name, site, "B", np.zeros((r, d)))
        kw = dict(before=site.add, pass_name=self.name)
        low = insert_op(graph, "MatMul", [source, a], name=f"{site.name}/down", **kw)
        low.dtype, low.shape = source.dtype, source.shape[:-1] + (r,)
        return [insert_op(graph, "MatMul", [low, b], name=f"{site.name}/up", like=skip, **kw)]

    def _previous(self, graph, site, stream):
        earlier = [s.fork for s in stream.sites[: site.depth] if s.fork.shape == site.skip.shape]
        if self.options.window:
            earlier = earlier[-self.options.window :]
        terms = []
        for j, value in enumerate(earlier):
            gamma = new_param(graph, self.name, site, f"gamma{j}", 0.0)
            terms.append(
                insert_op(
                    graph,
                    "Mul",
                    [value, gamma],
                    before=site.add,
                    pass_name=self.name,
                    name=f"{site.name}/prev{j}",
                    like=site.skip,
                )
            )
        return terms
