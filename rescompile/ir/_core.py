"""Value, Node and Graph: the rescompile IR.

The IR keeps def-use edges consistent by construction. A `Value` has at most one
producer and an ordered set of `Usage(node, index)`; a `Node` registers itself as
a user of each input when it is built, and inputs change only through
`Node.replace_input_with` or `Value.replace_all_uses_with`, which update both
sides. `Graph.remove` refuses to delete a node whose outputs are still used, so a
pass cannot leave a dangling value.

Nodes live in a doubly linked list so passes can insert and erase while
iterating, in O(1) per edit, on graphs with hundreds of thousands of nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from rescompile.ir._kinds import OpKind, ParamSlots
from rescompile.ir.ops import call_of, is_pure, kind_of_onnx_op, param_slots

__all__ = ["Usage", "Value", "Node", "Graph", "IRError"]


class IRError(ValueError):
    """A structural rule of the IR would be broken; raised before anything changes."""


class Usage(NamedTuple):
    node: Node
    index: int


# Roles of values. Parameters are trainable weights; constants are everything
# else with a fixed payload (buffers, shapes, scalars).
INPUT, PARAM, CONST, ACTIVATION = "input", "param", "const", "activation"


class Value:
    """An SSA value: a graph input, an initializer (param/const) or a node output.

    Values compare by identity. `shape` is a tuple of int (static), str
    (symbolic) or None (unknown) per axis, or None when even the rank is unknown.
    `origin` is the frontend's own record of where the value came from (opaque
    to passes; a slot rather than a `meta` entry because large graphs have
    hundreds of thousands of values).
    """

    __slots__ = (
        "name",
        "dtype",
        "shape",
        "payload",
        "role",
        "producer",
        "index",
        "graph",
        "meta",
        "origin",
        "_uses",
    )

    def __init__(
        self,
        name: str,
        *,
        dtype: str | None = None,
        shape: tuple | None = None,
        payload: Any = None,
        role: str = ACTIVATION,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = None if shape is None else tuple(shape)
        self.payload = payload
        self.role = role
        self.producer: Node | None = None
        self.index: int | None = None
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        self.origin: Any = None
        self._uses: dict[Usage, None] = {}

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.role}, shape={self.shape})"

    @property
    def is_initializer(self) -> bool:
        return self.role in (PARAM, CONST)

    def uses(self) -> tuple[Usage, ...]:
        """A snapshot of the uses, safe to iterate while rewiring."""
        return tuple(self._uses)

    def consumers(self) -> list[Node]:
        """Distinct consumer nodes in first-use order."""
        return list(dict.fromkeys(u.node for u in self._uses))

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and self in self.graph._output_set

    def replace_all_uses_with(self, new: Value, *, replace_graph_outputs: bool = False) -> None:
        """Point every user of this value at `new`.

        Raises:
            IRError: `new` belongs to another graph, or this value is a graph
                output and `replace_graph_outputs` is False.
        """
        if new is self:
            return
        if new.graph is not None and self.graph is not None and new.graph is not self.graph:
            raise IRError(f"{new.name!r} belongs to another graph")
        if self.is_graph_output and not replace_graph_outputs:
            raise IRError(f"{self.name!r} is a graph output; pass replace_graph_outputs=True")
        for usage in self.uses():
            usage.node.replace_input_with(usage.index, new)
        if replace_graph_outputs and self.is_graph_output:
            graph = self.graph
            assert graph is not None
            graph.set_outputs([new if v is self else v for v in graph.outputs])


class Node:
    """An operation. Inputs are an immutable tuple; outputs are made with the node.

    Args:
        op_type: the op's name in its domain (ONNX names for the core op set).
        inputs: input values; None stands for an omitted optional input.
        domain: op domain ("" is the ONNX standard domain, the IR's core op set).
        attrs: attributes; frontends may keep their own attribute objects here
            so that export is lossless.
        num_outputs: number of output values to create.
        kind: normalized kind for analysis; derived from the core op set if omitted.
        name: node name; the graph makes it unique on insertion.
        output_names: names for the outputs (made unique on insertion).
    """

    __slots__ = (
        "op_type",
        "domain",
        "kind",
        "attrs",
        "_inputs",
        "outputs",
        "name",
        "graph",
        "meta",
        "origin",
        "_prev",
        "_next",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        *,
        domain: str = "",
        attrs: Mapping[str, Any] | None = None,
        num_outputs: int = 1,
        kind: OpKind | None = None,
        name: str | None = None,
        output_names: Sequence[str] | None = None,
    ) -> None:
        self.op_type = op_type
        self.domain = domain
        self.kind = (
            kind
            if kind is not None
            else (kind_of_onnx_op(op_type) if domain in ("", "ai.onnx") else OpKind.OTHER)
        )
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.name = name or op_type
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        self.origin: Any = None  # the frontend's record of where the node came from (see Value)
        self._prev: Node | None = None
        self._next: Node | None = None
        self._inputs: tuple[Value | None, ...] = tuple(inputs)
        if output_names is not None and len(output_names) != num_outputs:
            raise IRError(f"{op_type}: {len(output_names)} output names for {num_outputs} outputs")
        self.outputs: tuple[Value, ...] = tuple(
            Value(output_names[i] if output_names else f"{self.name}_out{i}") for i in range(num_outputs)
        )
        for i, out in enumerate(self.outputs):
            out.producer, out.index = self, i
        for i, value in enumerate(self._inputs):
            if value is not None:
                value._uses[Usage(self, i)] = None

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.domain + '::' if self.domain else ''}{self.op_type})"

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return self._inputs

    @property
    def param_slots(self) -> ParamSlots | None:
        """Where this op's parameters are, from the op table (a frontend may override in meta)."""
        if "param_slots" in self.meta:
            return self.meta["param_slots"]
        call = call_of(self)
        return None if call is None else param_slots(call)

    @property
    def output(self) -> Value:
        """The only output; raises when the node has several."""
        if len(self.outputs) != 1:
            raise IRError(f"{self.name!r} has {len(self.outputs)} outputs")
        return self.outputs[0]

    def replace_input_with(self, index: int, value: Value | None) -> None:
        """Rewire input `index`, keeping both sides' use lists in step."""
        if not 0 <= index < len(self._inputs):
            raise IRError(f"{self.name!r} has no input {index}")
        if (
            value is not None
            and self.graph is not None
            and value.graph is not None
            and value.graph is not self.graph
        ):
            raise IRError(f"{value.name!r} belongs to another graph")
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.pop(Usage(self, index), None)
        if value is not None:
            value._uses[Usage(self, index)] = None
        self._inputs = self._inputs[:index] + (value,) + self._inputs[index + 1 :]

    def _detach_inputs(self) -> None:
        for i, value in enumerate(self._inputs):
            if value is not None:
                value._uses.pop(Usage(self, i), None)


class Graph:
    """An ordered, mutation-safe list of nodes plus inputs, outputs and initializers.

    The node order is a topological order; insertion helpers check that every
    input of a new node is defined before it. Value and node names are unique
    within the graph, assigned deterministically.
    """

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self._output_set: set[Value] = set()
        self.initializers: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        # Frontend-owned data needed for a lossless export (opaque to passes).
        self.source: Any = None
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self._value_names: set[str] = set()
        self._node_names: set[str] = set()
        self._name_counters: dict[str, int] = {}

    # ----- names -----------------------------------------------------------------
    def _unique(self, base: str, taken: set[str]) -> str:
        if base not in taken:
            taken.add(base)
            return base
        n = self._name_counters.get(base, 0)
        while True:
            n += 1
            candidate = f"{base}_{n}"
            if candidate not in taken:
                self._name_counters[base] = n
                taken.add(candidate)
                return candidate

    def _adopt_value(self, value: Value) -> None:
        if value.graph is not None and value.graph is not self:
            raise IRError(f"{value.name!r} belongs to another graph")
        value.name = self._unique(value.name, self._value_names)
        value.graph = self

    # ----- inputs, outputs, initializers -----------------------------------------
    def add_input(self, value: Value) -> Value:
        value.role = INPUT
        self._adopt_value(value)
        self.inputs.append(value)
        return value

    def add_initializer(self, value: Value) -> Value:
        """Register a parameter or constant (a value with a payload and no producer)."""
        if value.producer is not None:
            raise IRError(f"{value.name!r} is produced by a node; it cannot be an initializer")
        if value.role not in (PARAM, CONST):
            value.role = PARAM
        self._adopt_value(value)
        self.initializers[value.name] = value
        return value

    def remove_initializer(self, value: Value) -> None:
        if value._uses or value in self._output_set:
            raise IRError(f"initializer {value.name!r} is still used")
        del self.initializers[value.name]
        value.graph = None

    def set_payload(self, value: Value, payload: Any) -> None:
        """Replace an initializer's data (e.g. scaled weights), keeping its name and uses.

        The old payload object is not modified: a torch module or ONNX file the
        graph was imported from keeps its weights.
        """
        if value.graph is not self or value.name not in self.initializers:
            raise IRError(f"{value.name!r} is not an initializer of this graph")
        shape = tuple(int(d) for d in getattr(payload, "shape", ()))
        value.payload = payload
        value.shape = shape

    def set_outputs(self, outputs: Iterable[Value]) -> None:
        outputs = list(outputs)
        for value in outputs:
            if value.graph is not self:
                raise IRError(f"output {value.name!r} is not defined in this graph")
        self.outputs = outputs
        self._output_set = set(outputs)

    # ----- node list ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        """Iterate in order; removing or inserting around the current node is safe."""
        node = self._head
        while node is not None:
            following = node._next
            yield node
            node = following

    def __len__(self) -> int:
        return self._count

    def reversed(self) -> Iterator[Node]:
        node = self._tail
        while node is not None:
            preceding = node._prev
            yield node
            node = preceding

    def _check_insertable(self, node: Node) -> None:
        if node.graph is not None:
            raise IRError(f"{node.name!r} is already in a graph")
        for value in node.inputs:
            if value is not None and value.graph is not self:
                owner = "another graph" if value.graph is not None else "no graph"
                raise IRError(f"{node.name!r}: input {value.name!r} belongs to {owner}")
        # A node removed earlier (to move it) detached its inputs: attach them again.
        for i, value in enumerate(node.inputs):
            if value is not None:
                value._uses[Usage(node, i)] = None

    def _link(self, node: Node, prev: Node | None, nxt: Node | None) -> None:
        node._prev, node._next = prev, nxt
        if prev is None:
            self._head = node
        else:
            prev._next = node
        if nxt is None:
            self._tail = node
        else:
            nxt._prev = node
        node.graph = self
        node.name = self._unique(node.name, self._node_names)
        for out in node.outputs:
            self._adopt_value(out)
        self._count += 1

    def append(self, node: Node) -> Node:
        self._check_insertable(node)
        self._link(node, self._tail, None)
        return node

    def insert_after(self, anchor: Node | None, nodes: Node | Sequence[Node]) -> list[Node]:
        """Insert `nodes` in order right after `anchor` (None: at the front)."""
        nodes = [nodes] if isinstance(nodes, Node) else list(nodes)
        if anchor is not None and anchor.graph is not self:
            raise IRError(f"anchor {anchor.name!r} is not in this graph")
        for node in nodes:
            # Inputs may be outputs of earlier nodes in the same batch.
            self._check_insertable(node)
            prev = anchor
            nxt = self._head if anchor is None else anchor._next
            self._link(node, prev, nxt)
            anchor = node
        return nodes

    def insert_before(self, anchor: Node, nodes: Node | Sequence[Node]) -> list[Node]:
        if anchor.graph is not self:
            raise IRError(f"anchor {anchor.name!r} is not in this graph")
        return self.insert_after(anchor._prev, nodes)

    def remove(self, node: Node, *, safe: bool = True) -> None:
        """Unlink `node`. With `safe`, refuse while any output is used."""
        if node.graph is not self:
            raise IRError(f"{node.name!r} is not in this graph")
        if safe:
            for out in node.outputs:
                if out._uses:
                    users = ", ".join(u.node.name for u in out.uses()[:3])
                    raise IRError(f"cannot remove {node.name!r}: {out.name!r} is used by {users}")
                if out in self._output_set:
                    raise IRError(f"cannot remove {node.name!r}: {out.name!r} is a graph output")
        node._detach_inputs()
        if node._prev is None:
            self._head = node._next
        else:
            node._prev._next = node._next
        if node._next is None:
            self._tail = node._prev
        else:
            node._next._prev = node._prev
        node._prev = node._next = None
        node.graph = None
        self._count -= 1
        # Free the names so that a node moved by remove + insert keeps them.
        self._node_names.discard(node.name)
        for out in node.outputs:
            self._value_names.discard(out.name)

    def remove_dead(self, *, initializers: bool = False) -> int:
        """Remove pure nodes none of whose outputs are used; returns how many were removed.

        Nodes that mutate a tensor or draw random numbers, and ops the op table does not know,
        stay: their effect is not in their outputs.

        Args:
            initializers: also drop initializers that nothing uses any more.
        """
        removed = 0
        for node in self.reversed():
            if all(not out._uses and out not in self._output_set for out in node.outputs) and is_pure(node):
                self.remove(node)
                removed += 1
        if initializers:
            for value in list(self.initializers.values()):
                if not value._uses and value not in self._output_set:
                    self.remove_initializer(value)
        return removed

    # ----- convenience -----------------------------------------------------------
    def add_param(self, name: str, payload: Any, *, dtype: str, trainable: bool = True) -> Value:
        """Create and register a new initializer holding `payload` (e.g. a numpy array).

        A trainable scalar is stored with shape (1,): it broadcasts the same, and FSDP2's
        `fully_shard` refuses 0-d parameters."""
        if trainable and getattr(payload, "ndim", None) == 0 and hasattr(payload, "reshape"):
            payload = payload.reshape(1)
        shape = tuple(int(d) for d in getattr(payload, "shape", ()))
        return self.add_initializer(
            Value(name, dtype=dtype, shape=shape, payload=payload, role=PARAM if trainable else CONST)
        )

    def values(self) -> Iterator[Value]:
        """Every value: inputs, initializers, then node outputs in order."""
        yield from self.inputs
        yield from self.initializers.values()
        for node in self:
            yield from node.outputs

    def node_order(self) -> dict[Node, int]:
        """Position of each node in the current order (a topological index)."""
        return {node: i for i, node in enumerate(self)}
