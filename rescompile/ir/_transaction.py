"""Snapshots of a graph, so that a failed pass leaves the graph exactly as it was.

A snapshot records the state of the graph and of every node and value in it,
slot by slot; `restore` writes it back into the same objects, so references a
caller holds (nodes, values, analysis results) stay valid. Objects a failed
pass created are simply no longer reachable. Containers (attrs, meta, use
lists, the graph's lists and name registries) are copied one level deep;
their items and payloads are kept by reference, because the IR replaces
payloads (`Graph.set_payload`) rather than writing into them. Cost: one tuple
and a few small dict copies per node and value, linear in graph size.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from rescompile._gc import paused_gc
from rescompile.ir._core import Graph, Node, Value

__all__ = ["GraphSnapshot", "transaction"]

# Mutable containers held in slots, copied (not shared) by a snapshot; every other slot holds
# an immutable value (str, tuple, enum) or an object the IR does not edit in place.
_COPIED = ("attrs", "meta", "_uses")


class _SlotRecords:
    """The slots of many objects of one class, kept as parallel lists: mapping C-level getters
    over the objects costs a third less than building a record per object."""

    def __init__(self, cls: type, objects: list[Any]) -> None:
        self.objects, self.slots = objects, cls.__slots__
        self.states = list(map(attrgetter(*self.slots), objects))
        # Most meta dicts are empty: recording None for them saves a dict per object.
        self.copies = {
            slot: [d.copy() if d else None for d in map(attrgetter(slot), objects)]
            for slot in self.slots
            if slot in _COPIED
        }

    def restore(self) -> None:
        for obj, state in zip(self.objects, self.states):
            for slot, value in zip(self.slots, state):
                setattr(obj, slot, value)
        for slot, saved in self.copies.items():
            # Fresh copies: the snapshot must survive edits made after a restore.
            for obj, d in zip(self.objects, saved):
                setattr(obj, slot, {} if d is None else d.copy())


class GraphSnapshot:
    """The state of a graph at one moment; `restore()` puts it back (any number of times)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._graph_state = {
            k: copy.copy(v) if isinstance(v, (list, dict, set)) else v for k, v in vars(graph).items()
        }
        nodes = list(graph)
        outputs = (out for node in nodes for out in node.outputs)
        values = [*graph.inputs, *graph.initializers.values(), *outputs]
        with paused_gc():  # many small tuples and dicts, none of them garbage
            self._nodes = _SlotRecords(Node, nodes)
            self._values = _SlotRecords(Value, values)

    @classmethod
    def take(cls, graph: Graph) -> GraphSnapshot:
        return cls(graph)

    def restore(self) -> None:
        graph = self.graph
        for key in set(vars(graph)) - set(self._graph_state):
            delattr(graph, key)
        for key, value in self._graph_state.items():
            setattr(graph, key, copy.copy(value) if isinstance(value, (list, dict, set)) else value)
        with paused_gc():
            self._nodes.restore()
            self._values.restore()


@contextlib.contextmanager
def transaction(graph: Graph) -> Iterator[GraphSnapshot]:
    """Run the body on `graph`; if it raises (anything, KeyboardInterrupt included), restore
    the graph as it was on entry and re-raise."""
    snapshot = GraphSnapshot.take(graph)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
