"""gate: `x + F(x)` -> `x + 2 * sigmoid(w . x + b) * F(x)`, an input-dependent gate.

A highway-style sigmoid gate (Highway Networks, Srivastava, Greff, Schmidhuber
2015, arXiv 1505.00387) in its function-preserving form: one gate value per
position, computed from the skip x by a learned per-channel weight vector w and
a bias b. With w = 0 and b = 0 the
gate is 2 * sigmoid(0) = 1, so the rewritten model computes the original
function exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.infra import PassBase, PassError, PassResult, sites_option
from rescompile.ir import Graph

from ._branch import channel_axis, insert_op, new_param, vector_shape

__all__ = ["GatePass"]


class GatePass(PassBase):
    """Insert a sigmoid gate read from the skip on each selected branch.

    Refuses sites whose channel axis cannot be found (unknown rank, dynamic channels).
    """

    name = "gate"
    summary = "skip + 2*sigmoid(w.skip + b) * branch, w=0, b=0 at init"

    @dataclasses.dataclass
    class Options:
        bias: float = dataclasses.field(default=0.0, metadata={"help": "initial b (0 keeps the function)"})
        sites: str = sites_option()

    @property
    def preserves_function(self) -> bool:
        return self.options.bias == 0.0

    def call(self, graph: Graph) -> PassResult:
        sites = self.selected_sites(graph)
        for site in sites:
            skip, branch = site.skip, site.branch
            try:
                shape, axis = vector_shape(skip), channel_axis(skip)
            except Exception as exc:
                raise PassError(f"gate: site {site.name}: {exc}") from exc
            w = new_param(graph, self.name, site, "weight", np.zeros(shape))
            b = new_param(graph, self.name, site, "bias", np.array(self.options.bias))
            axes = graph.add_param(
                f"rescompile.gate.{site.name}.axes",
                np.array([axis], np.int64),
                dtype="int64",
                trainable=False,
            )
            two = new_param(graph, self.name, site, "two", np.array(2.0), trainable=False)
            gate_shape = tuple(1 if i == axis else d for i, d in enumerate(skip.shape))
            prefix = f"{site.name}/"
            kw = dict(before=site.add, pass_name=self.name)
            weighted = insert_op(graph, "Mul", [skip, w], name=prefix + "wx", like=skip, **kw)
            score = insert_op(
                graph,
                "ReduceSum",
                [weighted, axes],
                name=prefix + "sum",
                like=skip,
                attrs={"keepdims": 1},
                **kw,
            )
            score.shape = gate_shape
            score = insert_op(graph, "Add", [score, b], name=prefix + "bias", like=score, **kw)
            gate = insert_op(graph, "Sigmoid", [score], name=prefix + "sigmoid", like=score, **kw)
            gate = insert_op(graph, "Mul", [gate, two], name=prefix + "gate", like=score, **kw)
            gated = insert_op(graph, "Mul", [branch, gate], name=prefix + "gated", like=branch, **kw)
            site.add.replace_input_with(1 - site.skip_index, gated)
        return PassResult(graph, modified=bool(sites), stats={"sites": len(sites)})
