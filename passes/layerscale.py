"""layerscale: `skip + branch` -> `skip + gamma * branch`, gamma a per-channel vector.

LayerScale (CaiT, Touvron et al. 2021, arXiv 2103.17239). The channel axis comes
from the graph: the last axis for token streams [B, T, d], axis 1 for NCHW
(gamma then has shape [C, 1, 1]).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.analysis.residuals import ResidualStream
from rescompile.infra import PassBase, PassError, PassResult, sites_option
from rescompile.ir import Graph

from ._branch import multiply_operand, new_param, vector_shape

__all__ = ["LayerScalePass", "cait_init"]


def cait_init(stream: ResidualStream) -> float:
    """CaiT's init by depth: 0.1 up to 18 layers, 1e-5 up to 24, 1e-6 beyond.

    A layer is an attention + MLP pair (2 sites) on token streams and one site
    on NCHW streams.
    """
    rank = len(stream.input.shape or ())
    layers = len(stream.sites) // 2 if rank == 3 else len(stream.sites)
    return 0.1 if layers <= 18 else 1e-5 if layers <= 24 else 1e-6


class LayerScalePass(PassBase):
    """Insert a trainable per-channel gain on each selected branch.

    Handles token and NCHW streams; refuses a site whose channel dimension is
    dynamic or whose rank is unknown (the error names the site).
    """

    name = "layerscale"
    summary = "skip + gamma * branch, a trainable per-channel vector per site"

    @dataclasses.dataclass
    class Options:
        init: str = dataclasses.field(
            default="1",
            metadata={
                "help": "initial gamma: a number (1 keeps the function) or 'cait' (CaiT's eps by depth)"
            },
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        if self.options.init != "cait":
            try:
                float(self.options.init)
            except ValueError:
                raise PassError(
                    f"layerscale: init must be a number or 'cait', not {self.options.init!r}"
                ) from None

    @property
    def preserves_function(self) -> bool:
        return self.options.init != "cait" and float(self.options.init) == 1.0

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        sites = [s for s in self.selected_sites(graph)]
        streams = {s.index: s for s in analysis.streams}
        for site in sites:
            value = (
                float(self.options.init) if self.options.init != "cait" else cait_init(streams[site.stream])
            )
            try:
                shape = vector_shape(site.branch)
            except Exception as exc:
                raise PassError(f"layerscale: site {site.name}: {exc}") from exc
            gamma = new_param(graph, self.name, site, "gamma", np.full(shape, value))
            multiply_operand(graph, site, "branch", gamma, self.name)
        return PassResult(graph, modified=bool(sites), stats={"sites": len(sites)})
