"""frac: frac-connections (Zhu et al. 2025, arXiv 2503.14125).

Like hyper-connections, but the stream is split into m fractions of its width
instead of copied: H = reshape(x, [..., m, d/m]). Site k becomes

    h_in  = merge(Gamma^T H)          the branch reads the re-assembled mixed fractions
    H_new = B^T split(T_k(h_in)) + A^T H

Function-preserving init: Gamma = I_m, A = I_m, B = 1 (then H_new =
split(T_k(x)) + H, the plain residual update); dynamic=true adds the same
input-dependent terms as hyper (zero at init). The stream ends by merging the
fractions back. Same refusals as hyper, plus widths not divisible by m.
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.residuals import ResidualStream
from rescompile.infra import PassError, streams_option

from ._branch import channel_count
from .hyper import HyperConnectionsPass

__all__ = ["FracConnectionsPass"]


class FracConnectionsPass(HyperConnectionsPass):
    """Split each selected pure residual stream into m learned-mixed fractions."""

    name = "frac"
    summary = "frac-connections: the stream split into m fractions mixed by learned connections"
    layout = "fractions"

    @dataclasses.dataclass
    class Options:
        m: int = dataclasses.field(default=4, metadata={"help": "number of fractions of the width"})
        dynamic: bool = dataclasses.field(default=False, metadata={"help": "add input-dependent connections"})
        streams: str = streams_option()

    def check_options(self) -> None:
        if self.options.m < 1:
            raise PassError("frac: m must be >= 1")

    @property
    def preserves_function(self) -> bool:
        return True

    def _rows(self) -> int:
        return self.options.m

    def _check(self, stream: ResidualStream) -> None:
        super()._check(stream)
        d = channel_count(stream.input)
        if d % self.options.m:
            raise PassError(f"frac: stream {stream.index} has width {d}, not divisible by m={self.options.m}")
