"""A networkx view of the data-flow graph, for dominator and ancestry queries.

Analysis on large graphs uses bounded searches on the IR itself; this view is for
whole-graph questions (dominators, all paths) where building a DiGraph once pays.
"""

from __future__ import annotations

from rescompile.ir._core import Graph
from rescompile.ir._kinds import OpKind

__all__ = ["to_networkx", "data_inputs"]


def data_inputs(node):
    """Inputs whose *data* the node reads (Shape/Size read only the shape)."""
    if node.kind is OpKind.SHAPE:
        return ()
    return tuple(v for v in node.inputs if v is not None)


def to_networkx(graph: Graph, *, data_only: bool = True):
    """Values and nodes as one DiGraph: value -> node -> value edges.

    Args:
        data_only: drop edges that carry only a shape (into Shape/Size ops).
    """
    import networkx as nx  # imported here: 0.1 s that inspect/apply do not need

    g = nx.DiGraph()
    for value in graph.values():
        g.add_node(value, type="value")
    for node in graph:
        g.add_node(node, type="node")
        inputs = data_inputs(node) if data_only else [v for v in node.inputs if v is not None]
        for value in inputs:
            g.add_edge(value, node)
        for out in node.outputs:
            g.add_edge(node, out)
    return g
