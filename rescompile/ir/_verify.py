"""Structural invariant checks, run after every pass in tests and with --debug."""

from __future__ import annotations

from rescompile.ir._core import Graph, IRError, Usage

__all__ = ["verify"]


def verify(graph: Graph) -> None:
    """Check ownership, topological order, unique names and use symmetry.

    Raises:
        IRError: naming the first broken invariant.
    """
    defined = set(graph.inputs) | set(graph.initializers.values())
    names: set[str] = set()
    for value in defined:
        if value.graph is not graph:
            raise IRError(f"{value.name!r} is registered but not owned by the graph")
        if value.name in names:
            raise IRError(f"duplicate value name {value.name!r}")
        names.add(value.name)
    count = 0
    for node in graph:
        count += 1
        if node.graph is not graph:
            raise IRError(f"{node.name!r} is linked but not owned by the graph")
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            if value not in defined:
                raise IRError(f"{node.name!r} input {i} {value.name!r} is used before it is defined")
            if Usage(node, i) not in value._uses:
                raise IRError(f"{value.name!r} does not record its use by {node.name!r}")
        for out in node.outputs:
            if out.producer is not node or out.graph is not graph:
                raise IRError(f"{out.name!r} has the wrong producer or owner")
            if out.name in names:
                raise IRError(f"duplicate value name {out.name!r}")
            names.add(out.name)
            defined.add(out)
    if count != len(graph):
        raise IRError(f"node count {len(graph)} disagrees with the list ({count})")
    for value in defined:
        for usage in value._uses:
            if usage.node.graph is not graph or usage.node.inputs[usage.index] is not value:
                raise IRError(f"{value.name!r} records a stale use by {usage.node.name!r}")
    for value in graph.outputs:
        if value not in defined:
            raise IRError(f"graph output {value.name!r} is not defined")
