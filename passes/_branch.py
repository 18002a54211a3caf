"""Helpers shared by passes that rewrite a residual branch: insert an op between
the branch and its add, and create new parameters with stable names."""

from __future__ import annotations

from typing import Any

import numpy as np

from rescompile.analysis.residuals import ResidualSite
from rescompile.ir import Graph, Node, Value

__all__ = ["param_name", "new_param", "multiply_branch"]


def param_name(pass_name: str, site: ResidualSite, role: str) -> str:
    """Stable, readable name for a new parameter: rescompile.<pass>.<add node>.<role>."""
    return f"rescompile.{pass_name}.{site.name}.{role}"


def new_param(graph: Graph, pass_name: str, site: ResidualSite, role: str, array: Any,
              *, trainable: bool = True) -> Value:
    dtype = site.branch.dtype or "float32"
    array = np.asarray(array, dtype=dtype)
    return graph.add_param(param_name(pass_name, site, role), array, dtype=dtype, trainable=trainable)


def multiply_branch(graph: Graph, site: ResidualSite, factor: Value, pass_name: str) -> Node:
    """Rewire `skip + branch` into `skip + branch * factor`; returns the Mul node."""
    branch = site.branch
    mul = Node("Mul", [branch, factor], name=f"{pass_name}/{site.name}/mul",
               output_names=[f"{branch.name}.{pass_name}"])
    mul.meta["pass"] = pass_name
    mul.output.dtype, mul.output.shape = branch.dtype, branch.shape
    graph.insert_before(site.add, mul)
    site.add.replace_input_with(1 - site.skip_index, mul.output)
    return mul
