"""Preconditions shared by passes that rewrite whole residual streams."""

from __future__ import annotations

from rescompile.analysis.residuals import ResidualStream
from rescompile.infra import PassError
from rescompile.ir import OpKind, Value

from ._branch import channel_count

__all__ = ["require_pure_stream", "through_casts"]


def through_casts(value: Value) -> Value:
    """The value under casts and identities (torch graphs may read x via x.to(float32))."""
    while (
        value.producer is not None
        and value.producer.kind in (OpKind.CAST, OpKind.IDENTITY)
        and len([v for v in value.producer.inputs if v is not None]) == 1
    ):
        value = value.producer.inputs[0]
    return value


def reads_output(site, previous) -> bool:
    """`site` reads `previous`'s add output, directly or through casts that keep its dtype (HF
    LLaMA's RMSNorm reads x.to(float32) of a float32 stream): a pre-norm link."""
    fork = site.fork
    return through_casts(fork) is previous.output and fork.dtype == previous.output.dtype


def require_pure_stream(pass_name: str, stream: ResidualStream) -> None:
    """Refuse, naming the site, unless each site's skip is the previous site's output
    (no norm or activation on the stream), every site is an identity site with an
    unscaled skip, and the stream keeps its shape.

    Stream-level rewrites (hyper, frac, dense) keep the function exactly under these
    conditions, as in pre-norm transformers and pre-activation CNNs.
    """
    shape = stream.input.shape
    for previous, site in zip((None,) + stream.sites, stream.sites):
        if previous is not None and through_casts(site.skip) is not previous.output:
            between = site.skip.producer.op_type if site.skip.producer else "?"
            raise PassError(
                f"{pass_name}: site {site.name} reads the stream through {between} "
                f"({site.norm}-norm or post-activation block); {pass_name} needs a pure residual "
                "stream as in pre-norm models (select others with streams=)"
            )
        if site.kind != "identity" or site.skip is not site.fork:
            raise PassError(
                f"{pass_name}: site {site.name} has a {site.kind} or rescaled skip; apply {pass_name} first"
            )
        if site.skip.shape != shape or site.output.shape != shape:
            raise PassError(
                f"{pass_name}: the stream changes shape at site {site.name} "
                f"({shape} -> {site.output.shape}); not supported"
            )
    try:
        channel_count(stream.input)
    except Exception as exc:
        raise PassError(f"{pass_name}: stream {stream.index}: {exc}") from exc
