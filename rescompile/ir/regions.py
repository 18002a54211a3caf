"""Regions: the unit that block-level passes clone, remove and re-wire.

A `Region` is a set of nodes of one graph. What it reads from outside is split
into *entries* (activations and graph inputs) and *params* (initializers); what
it defines and something outside reads (or a graph output) are its *exits*.
These are computed from the live def-use edges on each access, so they stay
right while a pass edits around the region.

Passes that drop a branch or a block (`remove`, `remove_branch`), duplicate one
(`clone`) or feed a branch another stream value (`replace_entry`) work on
regions, not loose nodes. Every edit goes through the IR's mutation methods,
checks what it can before changing anything, and leaves a graph that passes
`verify`. Building a region and each operation cost one walk over the graph
(the node list keeps no positions, and topological checks need them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rescompile.ir._core import PARAM, Graph, IRError, Node, Value
from rescompile.ir._graphview import data_inputs
from rescompile.ir.ops import is_pure

__all__ = ["Region", "clone", "remove", "remove_branch", "replace_entry", "sweep"]


class Region:
    """A set of nodes of `graph`, held in graph (topological) order.

    Build one with `of_branch`, `of_block` or `between`; `Region(graph, nodes)`
    takes any nodes, e.g. a branch plus its add.
    """

    __slots__ = ("_members", "graph", "nodes")

    def __init__(self, graph: Graph, nodes: Iterable[Node]) -> None:
        members = set(nodes)
        for node in members:
            if node.graph is not graph:
                raise IRError(f"{node.name!r} is not in graph {graph.name!r}")
        self.graph = graph
        self._members = frozenset(members)
        self.nodes: tuple[Node, ...] = tuple(n for n in graph if n in members) if members else ()

    def __repr__(self) -> str:
        return (
            f"Region({len(self.nodes)} nodes, entries={[v.name for v in self.entries]}, "
            f"exits={[v.name for v in self.exits]})"
        )

    def __contains__(self, node: Node) -> bool:
        return node in self._members

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def _reads(self) -> dict[Value, None]:
        """Values read from outside, in first-read order."""
        return {
            v: None for n in self.nodes for v in n.inputs if v is not None and v.producer not in self._members
        }

    @property
    def entries(self) -> tuple[Value, ...]:
        """Values read from outside that are not initializers (stream values, masks, shapes)."""
        return tuple(v for v in self._reads() if not _is_initializer(v))

    @property
    def params(self) -> tuple[Value, ...]:
        """Initializers (parameters and constants) the region reads."""
        return tuple(v for v in self._reads() if _is_initializer(v))

    @property
    def exits(self) -> tuple[Value, ...]:
        """Values defined inside that a node outside reads, or that are graph outputs."""
        return tuple(
            out
            for n in self.nodes
            for out in n.outputs
            if out.is_graph_output or any(u.node not in self._members for u in out.uses())
        )

    # ----- constructors ---------------------------------------------------------------
    @classmethod
    def between(cls, entries: Sequence[Value], exits: Sequence[Value]) -> Region:
        """The nodes on data paths from `entries` to `exits`, plus the helpers only they use.

        A helper is a node outside those paths whose every output is read only by
        the region (shape arithmetic, Constant nodes, a Cast of a mask): it joins
        so that a clone is self-contained and a removal leaves nothing dead. The
        producers of `entries` never join. Edges into Shape/Size carry no data and
        do not make a path.

        Raises:
            IRError: an exit is not computed from the entries.
        """
        if not exits:
            raise IRError("a region needs at least one exit")
        graph = exits[0].graph
        if graph is None or any(v.graph is not graph for v in (*entries, *exits)):
            raise IRError("entries and exits must belong to one graph")
        stop = set(entries)
        order = graph.node_order()
        low = min((order[v.producer] if v.producer is not None else -1 for v in stop), default=-1)
        # Backward from the exits, never above the earliest entry; then forward from the entries.
        back: set[Node] = set()
        stack = [v.producer for v in exits if v.producer is not None and v not in stop]
        while stack:
            node = stack.pop()
            if node in back:
                continue
            back.add(node)
            for value in data_inputs(node):
                producer = value.producer
                if value not in stop and producer is not None and order[producer] > low:
                    stack.append(producer)
        core: set[Node] = set()
        frontier = list(stop)
        while frontier:
            value = frontier.pop()
            for node in value.consumers():
                if node in back and node not in core and value in data_inputs(node):
                    core.add(node)
                    frontier.extend(node.outputs)
        for value in exits:
            if value not in stop and value.producer not in core:
                raise IRError(
                    f"exit {value.name!r} is not computed from the entries {sorted(v.name for v in stop)}"
                )
        return cls(graph, _with_helpers(core, stop))

    @classmethod
    def of_branch(cls, site: Any) -> Region:
        """The branch of a residual site (`rescompile.analysis.ResidualSite`): the nodes
        strictly between the fork and the add, without the add and the shortcut."""
        return cls.between([site.fork], [site.branch])

    @classmethod
    def of_block(cls, sites: Sequence[Any], *, exit: Value | None = None) -> Region:
        """Consecutive residual sites of one stream as one region, adds included.

        One layer (attention + MLP of a transformer, the add between them inside) or
        a run of layers. The region reads the first site's fork and ends at
        `exit`, by default the last site's add output. For post-norm models pass
        the normed value the stream continues with (the next layer's fork), so
        the norm after the last add belongs to the block.

        Raises:
            IRError: the sites are not consecutive on one stream.
        """
        if not sites:
            raise IRError("of_block needs at least one site")
        end = exit if exit is not None else sites[-1].output
        region = cls.between([sites[0].fork], [end])
        for site in sites:
            if site.add not in region:
                raise IRError(
                    f"site {site.name!r} is not between {sites[0].fork.name!r} and "
                    f"{end.name!r}: the sites are not consecutive"
                )
        return region


def _is_initializer(value: Value) -> bool:
    graph = value.graph
    return graph is not None and graph.initializers.get(value.name) is value


def _only_read_by(node: Node, members: set[Node]) -> bool:
    return all(not out.is_graph_output and all(u.node in members for u in out.uses()) for out in node.outputs)


def _unread(node: Node) -> bool:
    return all(not out.uses() and not out.is_graph_output for out in node.outputs)


def _with_helpers(core: set[Node], stop: set[Value]) -> set[Node]:
    """`core` plus, to a fixed point, its helpers and its sinks.

    Helpers are pure producers whose outputs only the region reads. Sinks are
    nodes that read a region value and whose outputs nothing reads (torch's
    `_assert_tensor_metadata`, buffer `copy_`): they exist for the region's sake
    and must go or be copied with it.
    """
    members = set(core)
    changed = True
    while changed:
        changed = False
        helpers = {
            v.producer
            for n in members
            for v in n.inputs
            if v is not None and v not in stop and v.producer is not None
        }
        sinks = {u.node for n in members for out in n.outputs for u in out.uses()}
        for node in helpers - members:
            if is_pure(node) and _only_read_by(node, members):
                members.add(node)
                changed = True
        for node in sinks - members:
            if _unread(node):
                members.add(node)
                changed = True
    return members


# ----- operations ---------------------------------------------------------------------
def clone(
    region: Region,
    *,
    inputs: Mapping[Value, Value] | None = None,
    share_params: bool = True,
    prefix: str = "clone/",
) -> dict[Value, Value]:
    """Insert a copy of `region`; returns old -> new for every value the copy defines.

    The map covers each output of the region's nodes (so its exits) and, without
    `share_params`, each copied parameter. The copy's exits have no users yet:
    the caller wires them.

    Args:
        inputs: what the copy reads instead of an entry or a parameter of the
            region; unmapped ones are read as they are.
        share_params: read the same parameter Values (tied weights), or copy
            each parameter's payload into a new initializer (independent
            weights). Constants (shapes, buffers) are always shared: nothing
            trains them.
        prefix: prepended to the copied names; the graph then makes them unique.

    Placement: the copy goes, as one block in the region's order, right after
    the last node that defines a value it reads (at the front when none does).
    Placing it before the first consumer of its exits is not possible: they
    have none yet. The earliest point where all its inputs exist keeps the
    order topological and leaves the most room for the consumers the caller
    inserts next, which must come after the copy (e.g. before the add they feed).

    Raises:
        IRError: a mapped value is not read by the region or belongs to another graph.
    """
    graph = region.graph
    mapping = dict(inputs or {})
    reads = region._reads()
    for old, new in mapping.items():
        if old not in reads:
            raise IRError(f"{old.name!r} is not read by the region from outside")
        if new.graph is not graph:
            raise IRError(f"{new.name!r} does not belong to graph {graph.name!r}")
    defined: dict[Value, Value] = {}
    if not share_params:
        for param in reads:
            if _is_initializer(param) and param.role == PARAM and param not in mapping:
                new = Value(
                    prefix + param.name,
                    dtype=param.dtype,
                    shape=param.shape,
                    payload=_copy_payload(param.payload),
                    role=param.role,
                )
                new.meta.update(param.meta)
                defined[param] = graph.add_initializer(new)
    vmap = {**mapping, **defined}
    order = graph.node_order()
    producers = [vmap.get(v, v).producer for v in reads]
    anchor = max((p for p in producers if p is not None), key=order.__getitem__, default=None)
    copies = []
    for node in region.nodes:
        twin = Node(
            node.op_type,
            [None if v is None else vmap.get(v, v) for v in node.inputs],
            domain=node.domain,
            attrs=dict(node.attrs),
            num_outputs=len(node.outputs),
            kind=node.kind,
            name=prefix + node.name,
            output_names=[prefix + out.name for out in node.outputs],
        )
        twin.meta.update(node.meta)
        for out, new in zip(node.outputs, twin.outputs):
            new.dtype, new.shape = out.dtype, out.shape
            new.meta.update(out.meta)
            vmap[out] = defined[out] = new
        copies.append(twin)
    graph.insert_after(anchor, copies)
    return defined


def _copy_payload(payload: Any) -> Any:
    """An independent copy, in the payload's own kind where that keeps its dtype."""
    if hasattr(payload, "detach"):  # torch tensor (bf16 has no numpy form)
        return payload.detach().clone()
    if isinstance(payload, (np.ndarray, np.generic)):
        return payload.copy()
    if hasattr(payload, "numpy"):  # onnx-ir tensor, possibly memory-mapped
        return np.array(payload.numpy(), copy=True)
    return copy.deepcopy(payload)


def remove(region: Region, *, replace: Mapping[Value, Value] | None = None) -> None:
    """Delete the region's nodes and everything only they used, initializers included.

    Args:
        replace: exit -> outside value its users read instead; every exit must
            be listed here or re-pointed by the caller first. An exit that is a
            graph output keeps its name: an Identity of the new value takes its
            place, so the model's interface does not change.

    What only the region used: producers (outside the region) of the values it
    read whose outputs nothing reads any more, recursively, and initializers
    nothing reads any more. Graph inputs stay.

    Raises:
        IRError: an exit is still used and not replaced, or a replacement is
            defined inside the region, in another graph or after a reader.
    """
    graph = region.graph
    replace = dict(replace or {})
    exits = region.exits
    for old, new in replace.items():
        if old.producer not in region:
            raise IRError(f"{old.name!r} is not defined by the region")
        if new.graph is not graph or new.producer in region:
            raise IRError(
                f"{new.name!r} cannot replace {old.name!r}: it is removed with the region "
                "or belongs to another graph"
            )
    kept = [v for v in exits if v not in replace]
    if kept:
        users = [u.node.name for u in kept[0].uses() if u.node not in region][:3]
        raise IRError(
            f"{kept[0].name!r} is still used outside the region "
            f"({', '.join(users) or 'graph output'}); re-point it first or pass replace="
        )
    if any(new.producer is not None for new in replace.values()):
        order = graph.node_order()
        for old, new in replace.items():
            late = [
                n
                for n in old.consumers()
                if n not in region and new.producer is not None and order[n] <= order[new.producer]
            ]
            if late:
                raise IRError(f"{new.name!r} is defined after {late[0].name!r}, which reads {old.name!r}")
    renamed = []
    for old, new in replace.items():
        if old.is_graph_output:
            positions = [i for i, v in enumerate(graph.outputs) if v is old]
            renamed.append((old.name, old.producer.name, old.dtype, old.shape, new, positions))
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    read = list(region._reads())
    for node in reversed(region.nodes):
        graph.remove(node)
    for name, node_name, dtype, shape, new, positions in renamed:
        identity = Node("Identity", [new], name=node_name, output_names=[name])
        identity.output.dtype, identity.output.shape = dtype, shape
        graph.insert_after(new.producer, identity)
        outputs = list(graph.outputs)
        for i in positions:
            outputs[i] = identity.output
        graph.set_outputs(outputs)
    sweep(graph, read)


def sweep(graph: Graph, values: Iterable[Value]) -> None:
    """Remove what defined `values` once nothing reads it, recursively (pure nodes, initializers)."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if value.uses() or value.is_graph_output:
            continue
        if _is_initializer(value):
            graph.remove_initializer(value)
            continue
        node = value.producer
        if node is None or node.graph is not graph or not is_pure(node):
            continue
        if _unread(node):
            graph.remove(node)
            stack.extend(v for v in node.inputs if v is not None)


def remove_branch(site: Any) -> None:
    """Turn `out = skip + branch` into `out = skip`: the add, the branch and what only they used go.

    A projection site keeps its shortcut (`out = proj(x)`). The site's records
    refer to removed nodes afterwards; analyse the graph again.

    Raises:
        IRError: a value of the branch is also read elsewhere.
    """
    branch = Region.of_branch(site)
    remove(Region(branch.graph, (*branch.nodes, site.add)), replace={site.output: site.skip})


def replace_entry(region: Region, old: Value, new: Value) -> None:
    """Make every node of `region` that reads `old` (an entry or a parameter) read `new`.

    Raises:
        IRError: `old` is defined inside the region or not read by it, `new`
            belongs to another graph, or `new` is defined after a node that would
            read it (the graph must stay in topological order).
    """
    graph = region.graph
    if old.producer in region:
        raise IRError(f"{old.name!r} is defined inside the region; it is not an entry")
    readers = [(n, i) for n in region.nodes for i, v in enumerate(n.inputs) if v is old]
    if not readers:
        raise IRError(f"the region does not read {old.name!r}")
    if new.graph is not graph:
        raise IRError(f"{new.name!r} does not belong to graph {graph.name!r}")
    if new.producer is not None:
        order = graph.node_order()
        first = readers[0][0]
        if order[new.producer] >= order[first]:
            raise IRError(f"{new.name!r} is defined after {first.name!r}, which would read it")
    for node, index in readers:
        node.replace_input_with(index, new)
