"""fold: fold constant factors on residual branches into the branch's parameters.

`skip + (branch * c)` with c a scalar or per-channel vector (rezero's alpha,
layerscale's gamma, depthscale's multiplier, any constant Mul on a branch)
-> `skip + branch'`, where the parameters of the op producing the branch (a
weighted op's weight and bias, a norm's gain and shift, through bias adds,
reshapes and casts) are scaled by c and the Mul is removed. For inference:
after `-p rezero -p fold` the model has the original node count.
Trainable factors are folded with their current values.

A site whose factor cannot be folded is left as it is and reported with the
reason (in the pass stats and the log).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from rescompile.errors import RescompileError
from rescompile.infra import PassBase, PassResult, sites_option
from rescompile.ir import Graph, OpKind

from ._branch import channel_count
from ._scale_params import ScaleRefused, literal_factor, numpy_of, scale_output

__all__ = ["FoldPass"]

logger = logging.getLogger("rescompile.fold")


class FoldPass(PassBase):
    """Fold `branch * constant` into the branch's parameters at each selected site.

    Refused (left as is, with the reason): factors that are neither scalar nor
    per-channel, branches whose last op has no parameters (e.g. an activation),
    parameters shared with other ops.
    """

    name = "fold"
    summary = "fold constant scalar/per-channel branch factors into the branch's last weighted op"

    @dataclasses.dataclass
    class Options:
        sites: str = sites_option()

    def call(self, graph: Graph) -> PassResult:
        folded, refused = 0, []
        for site in self.selected_sites(graph):
            while True:  # several factors may be stacked (rezero then layerscale)
                reason = self._fold_one(graph, site)
                if reason is None:
                    folded += 1
                    continue
                if reason != "no factor":
                    refused.append(f"{site.name}: {reason}")
                    logger.warning("fold: site %s left as is: %s", site.name, reason)
                break
        self._drop_unused_factors(graph)
        stats = {"folded": folded}
        if refused:
            stats["refused"] = refused
        return PassResult(graph, modified=folded > 0, stats=stats)

    @staticmethod
    def _fold_one(graph: Graph, site) -> str | None:
        branch = site.branch
        mul = branch.producer
        if (
            mul is None
            or mul.kind is not OpKind.MUL
            or (len(mul.inputs) != 2 and literal_factor(mul) is None)
            or branch.consumers() != [site.add]
        ):
            return "no factor"
        consts = [v for v in mul.inputs if v is not None and v.is_initializer]
        number = literal_factor(mul)  # torch's `branch * 0.5`: ONNX holds it as a constant
        if number is not None:
            inner = next(v for v in mul.inputs if v is not None)
            factor = np.float64(number)
        elif len(consts) != 1:
            return "no factor"
        else:
            factor_value = consts[0]
            inner = mul.inputs[1 - mul.inputs.index(factor_value)]
            factor = numpy_of(factor_value.payload).astype(np.float64)
        squeezed = np.squeeze(factor)
        if squeezed.ndim == 1:
            try:
                if squeezed.shape[0] != channel_count(branch):
                    return f"factor of shape {factor.shape} is not per-channel"
            except RescompileError as exc:  # unknown rank or dynamic channels
                return str(exc)
        elif squeezed.ndim > 1:
            return f"factor of shape {factor.shape} is not scalar or per-channel"
        if inner.consumers() != [mul]:
            return f"{inner.name!r} is also used outside the branch"
        try:
            edits = scale_output(graph, inner, squeezed)
        except ScaleRefused as exc:
            return str(exc)
        slot = next(i for i, v in enumerate(mul.inputs) if v is inner)
        for edit in edits:
            edit()
        inner = mul.inputs[slot]  # a new value where an edit replaced its op (torch's `x * 0.5`)
        site.add.replace_input_with(1 - site.skip_index, inner)
        graph.remove(mul)
        factor_value = None if number is not None else consts[0]
        if factor_value is not None and not factor_value.uses() and not factor_value.is_graph_output:
            graph.remove_initializer(factor_value)  # folded: a parameter nothing reads gets no gradient
        return None

    @staticmethod
    def _drop_unused_factors(graph: Graph) -> None:
        for value in list(graph.initializers.values()):
            if value.name.startswith("rescompile.") and not value.uses() and not value.is_graph_output:
                graph.remove_initializer(value)
