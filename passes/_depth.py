"""Shared machinery of the depth-dependent passes: constant multipliers on the
skip or branch, and compensation of the branch by rescaling its parameters."""

from __future__ import annotations

import numpy as np

from rescompile.analysis.residuals import ResidualSite, ResidualStream, only_read_by_norms
from rescompile.infra import PassError
from rescompile.ir import Graph

from ._branch import multiply_operand, new_param
from ._scale_params import ScaleRefused, scale_output

__all__ = ["constant_multiply", "compensate_branch", "require_final_norm"]


def constant_multiply(graph: Graph, pass_name: str, site: ResidualSite, which: str, factor: float) -> None:
    """Multiply the site's skip or branch by a fixed (non-trainable) factor."""
    value = new_param(graph, pass_name, site, f"{which}_factor", factor, trainable=False)
    multiply_operand(graph, site, which, value, pass_name)


def compensate_branch(graph: Graph, pass_name: str, site: ResidualSite, factor: float) -> None:
    """Multiply the site's branch by `factor` through its parameters (no new op)."""
    try:
        edits = scale_output(graph, site.branch, np.asarray(factor, dtype=np.float64))
    except ScaleRefused as exc:
        raise PassError(f"{pass_name}: cannot compensate site {site.name}: {exc}") from None
    for edit in edits:
        edit()


def require_final_norm(graph: Graph, pass_name: str, stream: ResidualStream) -> None:
    """Compensation relies on a scale-invariant norm removing the stream's overall
    scale: every site pre-norm and the stream's end read only by norms."""
    for site in stream.sites:
        if site.norm != "pre":
            raise PassError(
                f"{pass_name}: compensate needs pre-norm blocks; site {site.name} is {site.norm}-norm"
            )
    if not only_read_by_norms(graph, stream.output):
        users = [n.op_type for n in stream.output.consumers()] or "the graph output"
        raise PassError(
            f"{pass_name}: compensate needs the stream to end in a norm; "
            f"{stream.output.name!r} is read by {users}"
        )
