"""Shared machinery of the depth-dependent passes: constant multipliers on the
skip or branch, and compensation of the branch by rescaling its parameters."""

from __future__ import annotations

import numpy as np

from rescompile.analysis.residuals import ResidualSite, ResidualStream, only_read_by_norms
from rescompile.infra import PassError
from rescompile.ir import Graph, Role, Value, input_roles

from ._branch import multiply_operand, new_param
from ._scale_params import ScaleRefused, scale_output

__all__ = ["constant_multiply", "compensate_branch", "require_final_norm", "require_scale_invariant_readers"]


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


_RUNNING_STATS = (Role.RUNNING_MEAN, Role.RUNNING_VAR)


def _refuse_running_stats(pass_name: str, site: ResidualSite, value: Value) -> None:
    """A norm with running statistics (BatchNorm in inference) is a fixed affine map, not a
    scale-invariant one: it does not remove a constant factor on its input."""
    for node in value.consumers():
        if any(role in _RUNNING_STATS for role in input_roles(node) or ()):
            raise PassError(
                f"{pass_name}: cannot compensate site {site.name}: {node.op_type} ({node.name}) "
                "normalises with running statistics, which do not remove a scale"
            )


def require_final_norm(graph: Graph, pass_name: str, stream: ResidualStream) -> None:
    """Compensation relies on a scale-invariant norm removing the stream's overall
    scale: every site pre-norm and the stream's end read only by norms, none of them
    with running statistics."""
    for site in stream.sites:
        if site.norm != "pre":
            raise PassError(
                f"{pass_name}: compensate needs pre-norm blocks; site {site.name} is {site.norm}-norm"
            )
        _refuse_running_stats(pass_name, site, site.fork)
    if not only_read_by_norms(graph, stream.output):
        users = [n.op_type for n in stream.output.consumers()] or "the graph output"
        raise PassError(
            f"{pass_name}: compensate needs the stream to end in a norm; "
            f"{stream.output.name!r} is read by {users}"
        )
    _refuse_running_stats(pass_name, stream.sites[-1], stream.output)


def require_scale_invariant_readers(graph: Graph, pass_name: str, site: ResidualSite) -> None:
    """Compensating a post-norm site scales its output: only scale-invariant norms may read it
    (norm(a x) = norm(x)), not an activation or the graph output on the way to the norm, nor a
    norm with running statistics."""
    if not only_read_by_norms(graph, site.output):
        users = [n.op_type for n in site.output.consumers()] or "the graph output"
        raise PassError(
            f"{pass_name}: cannot compensate site {site.name}: its output is read by {users}, "
            "not only by a norm"
        )
    _refuse_running_stats(pass_name, site, site.output)
