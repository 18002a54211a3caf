"""parallel: the two branches of a layer read the same stream (GPT-J, PaLM, GPT-NeoX, Falcon).

Sequential pre-norm: h = x + A(N1 x); x' = h + M(N2 h). Parallel (GPT-NeoX's
`use_parallel_residual=True`): x' = x + A(N1 x) + M(N2 x). With `shared_norm=true` the MLP
reads the attention's norm, x' = x + A(N1 x) + M(N1 x) (GPT-J / PaLM), and N2 goes.
Post-norm layers (BERT: h = N1(x + A x), x' = N2(h + M h)) become x' = N2(h + M x): the MLP
reads the layer's input, the skip stays h.

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

from rescompile.analysis.importance import depth_units, written_out_norm
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, OpKind, Value
from rescompile.ir.regions import Region, remove, replace_entry

from ._branch import insert_op, new_param
from ._streams import reads_output

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
        if self.options.shared_norm and self.options.learnable:
            raise PassError("parallel: shared_norm has no c to learn (the MLP reads N1 x); drop learnable")

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
            post = _post_norm_of(second, first)
            if not post and not reads_output(second, first):
                raise PassError(
                    f"parallel: site {second.name} reads {second.fork.name!r}, neither the previous "
                    "add's output (pre-norm) nor a norm of it (post-norm)"
                )
            if post and self.options.shared_norm:
                raise PassError(f"parallel: site {second.name}: shared_norm needs a pre-norm layer")
            branch = Region.of_branch(second)
            source = self._post_source(graph, first, second) if post else self._source(graph, first, second)
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

    def _post_source(self, graph: Graph, first, second) -> Value:
        """Post-norm (BERT): h = N1(x + A(x)) and x' = N2(h + M(h)). The MLP reads x, or
        x + c * (h - x) when c != 0 or c is learnable; the skip stays h, so
        x' = N2(h + M(x)) at c = 0."""
        o = self.options
        if o.c == 0.0 and not o.learnable:
            return first.fork
        c = new_param(graph, self.name, second, "c", o.c, trainable=o.learnable)
        entry = second.nodes[0]  # the branch's first node: after h, before anything reads the source
        step = insert_op(
            graph,
            "Sub",
            [second.fork, first.fork],
            before=entry,
            pass_name=self.name,
            name=f"{second.name}/h_x",
        )
        scaled = insert_op(
            graph, "Mul", [step, c], before=entry, pass_name=self.name, name=f"{second.name}/c_hx"
        )
        return insert_op(
            graph, "Add", [first.fork, scaled], before=entry, pass_name=self.name, name=f"{second.name}/x_chx"
        )

    def _share_norm(self, graph: Graph, first, second, branch: Region) -> None:
        n1, n2 = _leading_norm(first), _leading_norm(second)
        if n1 is None or n2 is None:
            site = second if n2 is None else first
            raise PassError(f"parallel: shared_norm: site {site.name}'s branch does not start with a norm")
        (out1, _), (out2, nodes2) = n1, n2
        for node in list(out2.consumers()):
            for i, value in enumerate(node.inputs):
                if value is out2:
                    node.replace_input_with(i, out1)
        remove(Region(graph, nodes2), replace={})


def _post_norm_of(second, first) -> bool:
    """The second branch reads the first add's output after a post-norm (or post-activation):
    the analysis chained the two sites through it and marked the first one post. Whether the
    norm is one node (torch's rms_norm) or several (ONNX's decomposed RMSNorm) does not matter."""
    return first.norm == "post" and not reads_output(second, first)


def _leading_norm(site) -> tuple[Value, list] | None:
    """The norm that reads the site's fork first in its branch (its pre-norm): its output and
    its nodes. One norm node (torch's rms_norm, ONNX's LayerNormalization) or a norm written out
    in elementwise ops (ONNX's RMSNorm), so that both frontends share it alike."""
    for node in site.fork.consumers():
        if node.kind is OpKind.NORM and node in site.nodes:
            return node.outputs[0], [node]
    return written_out_norm(site.fork, within=set(site.nodes))
