"""deepnorm: DeepNet's residual scaling (Wang et al. 2022, arXiv 2203.00555).

Post-norm blocks `x_{l+1} = LN(x_l + G_l(x_l))` become
`x_{l+1} = LN(alpha * x_l + G_l(x_l))` with microsoft/torchscale's constants:
encoder-only alpha = (2N)^(1/4), decoder-only alpha = (2M)^(1/4); for
encoder-decoder models (stream 0 = encoder with N layers, stream 1 = decoder
with M layers) encoder alpha = 0.81 (N^4 M)^(1/16), decoder alpha = (3M)^(1/4).
N and M default to the number of layers on the stream (two sites per layer on
token streams). DeepNet's beta is an initialisation rule and is not applied
to existing weights.

compensate=true multiplies each branch's output parameters by alpha as well:
LN(alpha x + alpha G(x)) = LN(x + G(x)), so the function is preserved (up to
the norm's eps).
"""

from __future__ import annotations

import dataclasses

from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph

from ._depth import compensate_branch, constant_multiply, require_scale_invariant_readers

__all__ = ["DeepNormPass", "deepnorm_alpha"]


def deepnorm_alpha(arch: str, n: int, m: int, part: str) -> float:
    if arch == "encoder":
        return (2 * n) ** 0.25
    if arch == "decoder":
        return (2 * m) ** 0.25
    return 0.81 * (n**4 * m) ** (1 / 16) if part == "encoder" else (3 * m) ** 0.25


class DeepNormPass(PassBase):
    """Scale the skip of post-norm sites by DeepNet's alpha.

    Refuses pre-norm and norm-free sites (naming them): DeepNorm is defined for
    post-norm blocks. encoder-decoder needs exactly two streams.
    """

    name = "deepnorm"
    summary = "LN(alpha * skip + branch) with DeepNet's alpha, post-norm blocks"

    @dataclasses.dataclass
    class Options:
        arch: str = dataclasses.field(
            default="encoder",
            metadata={
                "choices": ("encoder", "decoder", "encoder-decoder"),
                "help": "which DeepNet constants",
            },
        )
        layers: int = dataclasses.field(
            default=0, metadata={"help": "N (or M): 0 counts the stream's layers"}
        )
        decoder_layers: int = dataclasses.field(
            default=0, metadata={"help": "M for encoder-decoder (0: count)"}
        )
        compensate: bool = dataclasses.field(
            default=False, metadata={"help": "also scale the branch output by alpha (keeps the function)"}
        )
        sites: str = sites_option()

    @property
    def preserves_function(self) -> bool:
        return self.options.compensate

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        chosen = SiteSelector(self.options.sites)
        streams = list(analysis.streams)
        if self.options.arch == "encoder-decoder" and len(streams) != 2:
            raise PassError(f"deepnorm: encoder-decoder needs 2 residual streams, found {len(streams)}")

        def layers(stream):
            rank = len(stream.input.shape or ())
            return max(1, len(stream.sites) // 2 if rank == 3 else len(stream.sites))

        count = 0
        for index, stream in enumerate(streams):
            sites = [s for s in stream.sites if chosen(s)]
            if not sites:
                continue
            n = self.options.layers or layers(
                streams[0] if self.options.arch == "encoder-decoder" else stream
            )
            m = (
                (self.options.decoder_layers or layers(streams[1]))
                if self.options.arch == "encoder-decoder"
                else (self.options.layers or layers(stream))
            )
            alpha = deepnorm_alpha(self.options.arch, n, m, "encoder" if index == 0 else "decoder")
            for site in sites:
                if site.norm != "post":
                    raise PassError(
                        f"deepnorm: site {site.name} is {site.norm}-norm; DeepNorm applies to "
                        "post-norm blocks (select others with sites=)"
                    )
                if self.options.compensate:
                    # NOTE: LN(a x) = LN(x) holds only for a norm reading the add alone and by its
                    # own statistics: BN(a x) != BN(x) with running statistics (found by the fuzzer).
                    require_scale_invariant_readers(graph, self.name, site)
                constant_multiply(graph, self.name, site, "skip", alpha)
                if self.options.compensate:
                    compensate_branch(graph, self.name, site, alpha)
                count += 1
        return PassResult(graph, modified=count > 0, stats={"sites": count})
