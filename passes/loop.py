"""loop: run a run of blocks N times with tied weights (Loop-Residual, Ng and Wang 2024, arXiv 2409.14199).

Loop-Residual refines the stream by applying the same blocks f again:
x^(i) = x^(i-1) + s_i * (f(x^(i-1)) - x^(i-1)), i = 1..n, where f is the run of consecutive
blocks (their own residuals inside) and s_i a trainable scale per loop, as in the third-party
nanoGPT versions. s_1 = 1 makes the first loop the original run; s_i = `init` for the later
loops, and the default `init=0` is an exact start: the model computes what it did and learns
how much each further loop adds. With every s_i = 1 the run is applied n times in a row.

The later loops are copies of the run that read the previous loop's output and share its
parameters (tied weights); masks, positions and other values the run reads are shared too.
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.importance import depth_units
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, Value
from rescompile.ir.regions import Region, clone

from ._branch import insert_op, new_param

__all__ = ["LoopPass"]


class LoopPass(PassBase):
    """Loop the selected consecutive blocks of one stream `n` times with a learnable scale per loop.

    Refused (one line, nothing changed): selections spanning streams or with gaps, runs whose
    output shape differs from their input's, and runs whose output is a graph output.
    """

    name = "loop"
    summary = "x_i = x_{i-1} + s_i (f(x_{i-1}) - x_{i-1}): a run of blocks looped n times, tied weights"

    @dataclasses.dataclass
    class Options:
        n: int = dataclasses.field(default=2, metadata={"help": "how many times the run is applied (>= 2)"})
        init: float = dataclasses.field(
            default=0.0, metadata={"help": "scale of the loops after the first: 0 keeps the function"}
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.n < 2:
            raise PassError(f"loop: n must be at least 2, not {self.options.n}")

    @property
    def preserves_function(self) -> bool:
        return self.options.init == 0.0

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        if not analysis.sites:
            return PassResult(graph, modified=False)
        run = self._run(analysis)
        entry, exit = run[0].entry, run[-1].exit
        site = run[0].sites[0]
        if entry.shape != exit.shape:
            raise PassError(
                f"loop: site {site.name}: the run maps shape {entry.shape} to {exit.shape}; "
                "a loop needs the same shape in and out"
            )
        region = Region.between([entry], [exit])
        readers = [(u.node, u.index) for u in exit.uses() if u.node not in region]
        current = self._step(graph, site, 1, entry, exit, 1.0)
        for i in range(2, self.options.n + 1):
            copied = clone(region, inputs={entry: current}, share_params=True, prefix=f"loop{i}/")
            current = self._step(graph, site, i, current, copied[exit], self.options.init)
        for node, index in readers:
            node.replace_input_with(index, current)
        if exit.is_graph_output:
            # A model whose last block is its output (a torch module returning the add): the
            # loop's result takes the output's place and its name (the names swap, so both stay
            # unique), so an ONNX output keeps its name.
            exit.name, current.name = current.name, exit.name
            graph.set_outputs([current if v is exit else v for v in graph.outputs])
        return PassResult(graph, modified=True, stats={"blocks": len(run), "loops": self.options.n})

    def _run(self, analysis) -> list:
        """The selected blocks: consecutive, on one stream (the first one under `sites=all`)."""
        selector = SiteSelector(self.options.sites)
        units = [u for u in depth_units(analysis, "block") if all(map(selector, u.sites))]
        if not units:
            raise PassError(f"loop: sites={self.options.sites} selects no whole block")
        streams = sorted({u.stream for u in units})
        if len(streams) > 1 and self.options.sites != "all":
            raise PassError(
                f"loop: sites={self.options.sites} selects blocks of streams {streams}; a loop runs on one"
            )
        run = [u for u in units if u.stream == streams[0]]
        for before, after in zip(run, run[1:]):
            if after.index != before.index + 1:
                site = after.sites[0]
                raise PassError(
                    f"loop: site {site.name}: the selected blocks are not consecutive "
                    f"(block {before.index} is followed by block {after.index})"
                )
        return run

    def _step(self, graph: Graph, site, i: int, previous: Value, result: Value, init: float) -> Value:
        """previous + s_i * (result - previous), inserted right after `result`."""
        scale = new_param(graph, self.name, site, f"scale_{i}", init)
        delta = insert_op(
            graph, "Sub", [result, previous], after=result.producer, pass_name=self.name, name=f"delta_{i}"
        )
        step = insert_op(
            graph, "Mul", [delta, scale], after=delta.producer, pass_name=self.name, name=f"step_{i}"
        )
        return insert_op(
            graph, "Add", [previous, step], after=step.producer, pass_name=self.name, name=f"out_{i}"
        )
