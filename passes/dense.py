"""dense: DenseFormer's depth-weighted average (Pagliardini et al. 2024, arXiv 2402.02622).

With X_0 the stream's input and X_{i+1} the raw output of block i, after block i
the stream continues with x_{i+1} = sum_j alpha_{i,j} X_j over j = 0..i+1. The
authors' init (alpha = 1 on the newest output, 0 elsewhere) keeps the function.
`dilation` k keeps only the outputs j with (i + 1 - j) divisible by k; `period`
p adds an average only after every p-th block (DenseFormer's code). A block is
`block_size` consecutive residual sites: 0 picks 2 for token streams (attention
then MLP) and 1 for others. Needs a pure residual stream (see _streams.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.analysis.residuals import ResidualStream
from rescompile.infra import PassBase, PassError, PassResult, select_streams, streams_option
from rescompile.ir import Graph, Value

from ._branch import insert_op
from ._streams import require_pure_stream

__all__ = ["DenseFormerPass"]


class DenseFormerPass(PassBase):
    """Insert a learned depth-weighted average of earlier block outputs after each block."""

    name = "dense"
    summary = "DenseFormer: after each block, a learned weighted average of all earlier block outputs"

    @dataclasses.dataclass
    class Options:
        dilation: int = dataclasses.field(default=1, metadata={"help": "use every k-th earlier output"})
        period: int = dataclasses.field(default=1, metadata={"help": "average after every p-th block"})
        block_size: int = dataclasses.field(
            default=0, metadata={"help": "residual sites per block (0: 2 for token streams, 1 otherwise)"}
        )
        streams: str = streams_option()

    def check_options(self) -> None:
        if self.options.dilation < 1 or self.options.period < 1 or self.options.block_size < 0:
            raise PassError("dense: dilation and period must be >= 1, block_size >= 0")

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        streams = select_streams(self.name, analysis, self.options.streams)
        for stream in streams:
            require_pure_stream(self.name, stream)
        averages = sum(self._rewrite(graph, stream) for stream in streams)
        return PassResult(graph, modified=averages > 0, stats={"streams": len(streams), "averages": averages})

    def _block_size(self, stream: ResidualStream) -> int:
        if self.options.block_size:
            return self.options.block_size
        return 2 if len(stream.input.shape or ()) == 3 else 1

    def _rewrite(self, graph: Graph, stream: ResidualStream) -> int:
        size = self._block_size(stream)
        if len(stream.sites) % size:
            raise PassError(
                f"dense: stream {stream.index} has {len(stream.sites)} sites, not a multiple of "
                f"block_size={size}"
            )
        ends = [stream.sites[i + size - 1] for i in range(0, len(stream.sites), size)]
        outputs: list[Value] = [stream.input] + [site.output for site in ends]  # X_0 .. X_B (raw)
        count = 0
        for i, site in enumerate(ends):
            if (i + 1) % self.options.period:
                continue
            terms = [j for j in range(i + 2) if (i + 1 - j) % self.options.dilation == 0]
            raw = outputs[i + 1]
            users = [u for u in raw.uses() if u.node.meta.get("pass") != self.name]
            cursor = site.add
            total = None
            for j in terms:
                alpha = graph.add_param(
                    f"rescompile.dense.{stream.index}.block{i}.alpha{j}",
                    np.asarray(1.0 if j == i + 1 else 0.0, dtype=raw.dtype or "float32"),
                    dtype=raw.dtype or "float32",
                )
                term = insert_op(
                    graph,
                    "Mul",
                    [outputs[j], alpha],
                    after=cursor,
                    pass_name=self.name,
                    name=f"block{i}/x{j}",
                    like=raw,
                )
                cursor = term.producer
                if total is not None:
                    total = insert_op(
                        graph,
                        "Add",
                        [total, term],
                        after=cursor,
                        pass_name=self.name,
                        name=f"block{i}/sum{j}",
                        like=raw,
                    )
                    cursor = total.producer
                else:
                    total = term
            for usage in users:
                usage.node.replace_input_with(usage.index, total)
            if raw.is_graph_output:
                graph.set_outputs([total if v is raw else v for v in graph.outputs])
            count += 1
        return count
