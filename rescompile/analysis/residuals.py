"""Find residual adds, classify them and order them into residual streams.

A residual site is an elementwise add `out = skip + branch` without broadcasting,
of one of two kinds:

- identity: the branch is computed from the skip through at least one weighted
  op (an op with a parameter operand: MatMul/Gemm/Conv/Linear);
- projection: both operands descend from a fork value `x`; the skip is a short
  projection of `x` (weighted op plus norms/activations) and the branch reaches
  `x` through other weighted ops.

"Computed from" is decided by a *closure*: starting at the skip, a node joins
when every non-constant data input it reads is already in the closure. This lets
the skip flow through norms, activations and decomposed norms (x - mean(x) mixes
x only with itself) but stops where it meets an unrelated tensor. That is what
rejects `scores + mask`: the mask of layer 0 is an ancestor of every later
layer's scores, but it meets the scores in an add, so no weighted op is reached
from the mask alone. Edges into Shape/Size carry no data and are ignored, and so
are values computed from shapes alone (symbolic sizes, pad amounts, crop ends,
ConstantOfShape): with dynamic dims `x[:, :H]` or `x.view(B, H // w, ...)` reads
them, and they are not an unrelated tensor. A concatenation joins the closure when
any input is in it: `cat(x_cls, x)` places x_cls next to other tokens without
combining any element with them (CaiT's class attention, prefix tokens). An op
without an entry in the op table (`rescompile.ir.ops`) is opaque: closures stop
there and the analysis lists it (`ResidualAnalysis.opaque`) instead of guessing.

Streams link a site to the next one through ops without parameters of their own
only (norms, activations, dropout, reshapes; never through a concatenation with
other tensors). A projection site starts a new stream: its weighted skip changes
the stream's width or resolution (ResNet and RegNet stages), as a weighted op
between two sites does (Swin's patch merging).

Not reported, by construction: bias adds (the bias reaches nothing), token +
position embeddings (Gather is not a weighted op), rotary adds and adds inside
decomposed GELU/LayerNorm (no weighted op between the fork and the add).

All searches are local (bounded closures, ancestry searches that never go above
the skip's position in topological order), so analysis is linear in graph size
for graphs made of blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from rescompile.ir import MIXING_FREE_KINDS, Graph, Node, OpKind, Value, data_inputs
from rescompile.ir._core import PARAM
from rescompile.ir.ops import op_info

__all__ = ["ResidualAnalysis", "ResidualSite", "ResidualStream", "find_residuals", "only_read_by_norms"]

# A closure this large is not a residual branch's start; stop looking.
_CLOSURE_LIMIT = 512
# Ops between a projection shortcut's weighted op and the add (norm, activation...).
_PROJECTION_TAIL_LIMIT = 4


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualSite:
    """One residual add. Records refer to IR objects of the analysed graph.

    Attributes:
        add: the add node.
        skip_index: which input of `add` is the skip.
        kind: "identity" or "projection".
        fork: the stream value the block reads: the skip for identity sites
            (under any constant scaling a rewrite put on it), the common input
            `x` for projection sites.
        weighted: the branch's weighted ops in topological order.
        norm: "pre" (the branch starts with a norm), "post" (a norm follows the
            add) or "none".
        branch_params: parameters in the branch's weighted ops.
        nodes: the branch's nodes (on data paths from the fork to the branch),
            in topological order.
        stream, depth: the residual stream and 0-based position along it.
    """

    add: Node
    skip_index: int
    kind: str
    fork: Value
    weighted: tuple[Node, ...]
    norm: str
    branch_params: int
    nodes: tuple[Node, ...] = ()
    stream: int = -1
    depth: int = -1

    @property
    def skip(self) -> Value:
        return self.add.inputs[self.skip_index]

    @property
    def branch(self) -> Value:
        return self.add.inputs[1 - self.skip_index]

    @property
    def output(self) -> Value:
        return self.add.outputs[0]

    @property
    def name(self) -> str:
        return self.add.name

    def to_json(self) -> dict:
        return {
            "add": self.add.name,
            "skip": self.skip.name,
            "branch": self.branch.name,
            "kind": self.kind,
            "stream": self.stream,
            "depth": self.depth,
            "norm": self.norm,
            "fork": self.fork.name,
            "branch_params": self.branch_params,
            "branch_weighted_ops": [n.name for n in self.weighted],
        }


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualStream:
    """A chain of residual sites: each site's output reaches the next one's fork
    through mixing-free ops only (norms, activations, casts, reshapes)."""

    index: int
    sites: tuple[ResidualSite, ...]

    @property
    def input(self) -> Value:
        return self.sites[0].fork

    @property
    def output(self) -> Value:
        return self.sites[-1].output

    @property
    def norm(self) -> str:
        kinds = {s.norm for s in self.sites}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def to_json(self) -> dict:
        return {
            "stream": self.index,
            "sites": [s.add.name for s in self.sites],
            "input": self.input.name,
            "output": self.output.name,
            "norm": self.norm,
            "length": len(self.sites),
        }


@dataclasses.dataclass(frozen=True)
class ResidualAnalysis:
    """Sites and streams, and `opaque`: the nodes without an op-table entry where a search stopped
    (a site or stream continuing through one of them is not reported: analysis does not guess)."""

    sites: tuple[ResidualSite, ...]
    streams: tuple[ResidualStream, ...]
    opaque: tuple[Node, ...] = ()

    def to_json(self) -> dict:
        data = {
            "residuals": [s.to_json() for s in self.sites],
            "streams": [s.to_json() for s in self.streams],
        }
        if self.opaque:
            data["opaque"] = [f"{n.name} ({n.op_type})" for n in self.opaque]
        return data


class _Facts:
    """Per-graph facts computed once: topological index, constness, parameter sizes.

    Values computed from shapes alone (Shape/sym_size and arithmetic on their results, and tensors
    made from a shape such as ConstantOfShape or new_zeros) carry no data of the tensor they were read
    from. They are left out of the closures like constants: in a graph with dynamic dims, `x[:, :H]`,
    `pad(x, [0, (w - W % w) % w])` and `x.view(B, H // w, ...)` read symbolic sizes, and counting those
    as unrelated tensors cut every closure (shifted-window attention lost its sites)."""

    def __init__(self, graph: Graph) -> None:
        self.order = graph.node_order()
        # Parameter elements reachable through constant-only computation; None = not constant.
        self.param_size: dict[Value, int] = {}
        self.shape_only: set[Value] = set()
        for value in graph.initializers.values():
            self.param_size[value] = _numel(value) if value.role == PARAM else 0
        for node in graph:
            ins = [v for v in node.inputs if v is not None]
            if node.kind is OpKind.SHAPE or (node.kind is OpKind.CONSTANT and ins):
                self.shape_only.update(node.outputs)  # sizes, or a tensor filled from a shape
                continue
            if node.kind is OpKind.CONSTANT:
                size = _constant_node_params(node)
            elif ins and all(v in self.param_size or v in self.shape_only for v in ins):
                size = sum(self.param_size.get(v, 0) for v in ins)
                if not size and any(v in self.shape_only for v in ins):
                    self.shape_only.update(node.outputs)  # shape arithmetic
                    continue
            else:
                continue
            for out in node.outputs:
                self.param_size[out] = size
        # Ops without a table entry: closures stop there (recorded in `met`). Constness still flows
        # through them: outputs computed from constants and shapes alone carry no data either way.
        self.opaque = {node for node in graph if op_info(node) is None}
        self.met: set[Node] = set()
        self.weighted: dict[Node, int] = {}
        for node in graph:
            if node.kind is OpKind.WEIGHTED:
                params = sum(self.param_size.get(v, 0) for v in node.inputs if v is not None)
                if params > 0:
                    self.weighted[node] = params
            elif node.kind is OpKind.ADD and len(node.inputs) == 2:
                # A linear's bias added after it (ONNX MatMul + Add; torch's linear holds it):
                # counted with the linear, so branch sizes do not depend on the frontend.
                for data, bias in (node.inputs, node.inputs[::-1]):
                    if data is None or bias is None or data.producer not in self.weighted:
                        continue
                    if bias.role == PARAM and bias.shape is not None and len(bias.shape) == 1:
                        if data.consumers() == [node]:
                            self.weighted[data.producer] += self.param_size.get(bias, 0)
                            break

    def is_const(self, value: Value) -> bool:
        """Whether `value` does not depend on the data of any graph input."""
        return value in self.param_size or value in self.shape_only

    def live_inputs(self, node: Node) -> list[Value]:
        """Non-constant data inputs."""
        return [v for v in data_inputs(node) if not self.is_const(v)]

    def pos(self, value: Value) -> int:
        return -1 if value.producer is None else self.order[value.producer]


def _numel(value: Value) -> int:
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return int(np.prod(value.shape, dtype=np.int64))
    size = getattr(value.payload, "size", None)
    return int(size) if size is not None else 1


def _constant_node_params(node: Node) -> int:
    attr = node.attrs.get("value")
    tensor = getattr(attr, "value", attr)
    size = getattr(tensor, "size", None)
    dtype = getattr(tensor, "dtype", None)
    floating = dtype is not None and getattr(dtype, "is_floating_point", lambda: False)()
    return int(size) if floating and size and size > 1 else 0


def _closure(facts: _Facts, start: Value, stop: Node | None = None, *, concat: bool = False):
    """Forward closure of `start` through ops that read nothing but the closure.

    A path counts as normalised after a norm op, or after a decomposed norm: a
    reduction whose result rejoins the unreduced tensor (x - mean(x),
    x * rsqrt(mean(x^2))). A reduction that does not rejoin (pooling) does not count.

    With `concat`, a concatenation joins when any of its inputs is in the closure: it places
    the closure's values next to other tensors without combining any element with them, so
    what a weighted op computes from `cat(x_cls, x)` or `cat(memory, x)` is computed from
    each part (CaiT's class attention, prefix tokens). Residual detection uses this; stream
    linking does not, since the stream does not continue into a tensor that also holds others.

    Returns:
        (values, weighted): each value in the closure mapped to whether its path
        was normalised; each weighted op reached (not entered) likewise.
    """
    values: dict[Value, tuple[bool, bool]] = {start: (False, False)}  # (normed, reduced)
    weighted: dict[Node, bool] = {}
    frontier = [start]
    seen_nodes: set[Node] = set()
    while frontier and len(seen_nodes) < _CLOSURE_LIMIT:
        value = frontier.pop()
        for node in value.consumers():
            if node in seen_nodes or node is stop:
                continue
            inside = [v for v in data_inputs(node) if v in values]
            if not inside:
                continue
            if any(v not in values for v in facts.live_inputs(node)) and not (
                concat and node.kind is OpKind.CONCAT
            ):
                continue
            if node in facts.opaque:
                if any(out.consumers() or out.is_graph_output for out in node.outputs):
                    facts.met.add(node)
                continue
            seen_nodes.add(node)
            flags = [values[v] for v in inside]
            normed = any(n for n, _ in flags)
            if node in facts.weighted:
                weighted[node] = normed
                continue
            reduced = [r for _, r in flags]
            rejoins = len(set(inside)) > 1 and any(reduced) and not all(reduced)
            normed = normed or node.kind is OpKind.NORM or rejoins
            reduced_out = (any(reduced) and not rejoins) or node.kind is OpKind.REDUCE
            for out in node.outputs:
                if out not in values:
                    values[out] = (normed, reduced_out)
                    frontier.append(out)
    return {v: n for v, (n, _) in values.items()}, weighted


def _is_ancestor(facts: _Facts, node: Node, target: Value) -> bool:
    """Whether `node` feeds `target` through data edges. Searches only between them."""
    low = facts.order[node]
    if target.producer is None or facts.order[target.producer] < low:
        return False
    stack, seen = [target.producer], set()
    while stack:
        current = stack.pop()
        if current is node:
            return True
        for value in data_inputs(current):
            producer = value.producer
            if producer is not None and producer not in seen and facts.order[producer] >= low:
                seen.add(producer)
                stack.append(producer)
    return False


def _between(facts: _Facts, start: Value, end: Value) -> list[Node]:
    """Nodes on data paths from `start` to `end`, in topological order."""
    low = facts.pos(start)
    back, stack = set(), [end.producer] if end.producer is not None else []
    while stack:
        current = stack.pop()
        if current in back:
            continue
        back.add(current)
        for value in data_inputs(current):
            p = value.producer
            if p is not None and p not in back and facts.order[p] > low:
                stack.append(p)
    forward, stack = set(), [start]
    seen_values = {start}
    while stack:
        value = stack.pop()
        for node in value.consumers():
            if node in back and node not in forward:
                forward.add(node)
                for out in node.outputs:
                    if out not in seen_values:
                        seen_values.add(out)
                        stack.append(out)
    return sorted(forward, key=facts.order.__getitem__)


def _same_shape(a: Value, b: Value, out: Value) -> bool:
    """Whether the add does not broadcast. Two different symbolic dims are taken as equal: two
    expressions may name one size (`h*w//16` and `(h//4)*(w//4)` after Swin's window reshapes), and
    if they differed the add could not run unless one were 1. A fixed size and a symbolic one may
    differ (the symbol may be 1 at run time)."""
    shapes = [v.shape for v in (a, b, out)]
    if any(s is None for s in shapes):
        return True  # unknown: let structure decide
    if len({len(s) for s in shapes}) != 1:
        return False
    for dims in zip(*shapes):
        fixed = {d for d in dims if isinstance(d, int)}
        if len(fixed) > 1 or (fixed and any(d is not None and not isinstance(d, int) for d in dims)):
            return False
    return True


def _unscaled(facts: _Facts, value: Value) -> list[Value]:
    """`value` and the stream values under it, nearest first, when a rewrite scaled the skip
    (beta * x, x * alpha_l, casts).

    After `decay` or `laurel` multiply the skip, the branch is still computed
    from x, not from beta * x; looking through the scaling keeps such sites
    visible to later passes (fold, a second rewrite). The caller takes the nearest
    value the branch reads: a written-out RMSNorm ends in `normed * gain`, which
    looks like one more scaling, and the fork is the norm's output (as in torch,
    where the norm is one node), not the value before its gain. A constant stream
    (a class token expanded from a parameter) is the operand with the product's shape."""
    chain = [value]
    for _ in range(4):
        node = value.producer
        if node is None or node.kind not in (OpKind.MUL, OpKind.DIV, OpKind.CAST, OpKind.IDENTITY):
            break
        live = facts.live_inputs(node)
        if not live and value.shape is not None:
            live = [v for v in data_inputs(node) if v.shape == value.shape]
        if len(live) != 1 or len([v for v in node.inputs if v is not None]) > 2:
            break
        if node.kind is OpKind.DIV and node.inputs[0] is not live[0]:
            break  # c / x is not a scaling of x
        value = live[0]
        chain.append(value)
    return chain


def _identity_site(facts: _Facts, add: Node, skip_index: int):
    """Return (normed, fork) when input `skip_index` is the skip of an identity site."""
    skip, branch = add.inputs[skip_index], add.inputs[1 - skip_index]
    for start in _unscaled(facts, skip):
        values, weighted = _closure(facts, start, stop=add, concat=True)
        if branch in values:
            return None  # the branch is a function of the skip with no weighted op: x + f(x) inside an op
        for node in sorted(weighted, key=facts.order.__getitem__):
            if _is_ancestor(facts, node, branch):
                return weighted[node], start
    return None


def _projection_root(facts: _Facts, value: Value):
    """Walk back from an add operand through at most a few mixing-free or elementwise ops to a
    weighted op; return (weighted_node, its live input) or None.

    The tail between the weighted op and the add is computed from the weighted op's output alone:
    an op in it may read that output more than once, so a written-out activation (ONNX has no
    SiLU: y * sigmoid(y), where torch has one silu node) is a tail as its one-op form is."""
    tail: set[Node] = set()
    roots: set[Node] = set()
    frontier = [value]
    while frontier:
        node = frontier.pop().producer
        if node is None:
            return None
        if node in tail or node in roots:
            continue
        live = facts.live_inputs(node)
        if node in facts.weighted:
            if len(live) != 1:
                return None
            roots.add(node)
            continue
        if not live or (
            node.kind not in MIXING_FREE_KINDS
            and node.kind not in (OpKind.ADD, OpKind.MUL, OpKind.SUB, OpKind.DIV)
        ):
            return None
        tail.add(node)
        if len(tail) > _PROJECTION_TAIL_LIMIT:
            return None
        frontier.extend(live)
    if len(roots) != 1:
        return None
    (root,) = roots
    return root, facts.live_inputs(root)[0]


def _projection_site(facts: _Facts, add: Node):
    """Return (skip_index, fork, normed) for a projection shortcut, or None."""
    found = []
    for index in (0, 1):
        root = _projection_root(facts, add.inputs[index])
        if root is None:
            continue
        w_skip, fork = root
        other = add.inputs[1 - index]
        _, weighted = _closure(facts, fork, stop=add, concat=True)
        for node in sorted(weighted, key=facts.order.__getitem__):
            if node is not w_skip and _is_ancestor(facts, node, other):
                found.append((facts.weighted[w_skip], index, fork, weighted[node]))
                break
    if not found:
        return None
    # Both sides qualify (conv_a(x) + conv_b(x)): the shortcut is the cheaper side.
    _, index, fork, normed = min(found, key=lambda f: f[0])
    return index, fork, normed


def _classify(facts: _Facts, add: Node) -> ResidualSite | None:
    if add.kind is not OpKind.ADD or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    a, b = add.inputs
    if a is None or b is None or a is b:
        return None
    if facts.is_const(a) and facts.is_const(b):
        return None
    if not _same_shape(a, b, add.outputs[0]):
        return None
    for skip_index in (0, 1):
        found = _identity_site(facts, add, skip_index)
        if found is not None:
            kind, (normed, fork) = "identity", found
            break
    else:
        projection = _projection_site(facts, add)
        if projection is None:
            return None
        skip_index, fork, normed = projection
        kind = "projection"
    branch = add.inputs[1 - skip_index]
    inside = _between(facts, fork, branch)
    weighted = tuple(n for n in inside if n in facts.weighted)
    return ResidualSite(
        add=add,
        skip_index=skip_index,
        kind=kind,
        fork=fork,
        weighted=weighted,
        norm="pre" if normed else "none",
        branch_params=sum(facts.weighted[n] for n in weighted),
        nodes=tuple(inside),
    )


def _feeds(facts: _Facts, source: Value, target: Value) -> bool:
    """Whether `source` is a strict data ancestor of `target`. Searches only between them."""
    low = facts.pos(source)
    stack, seen = [target.producer] if target.producer is not None else [], set()
    while stack:
        current = stack.pop()
        if current in seen or facts.order[current] <= low:
            continue
        seen.add(current)
        if source in data_inputs(current):
            return True
        stack.extend(v.producer for v in data_inputs(current) if v.producer is not None)
    return False


def _drop_nested_terms(facts: _Facts, sites: list[ResidualSite]) -> list[ResidualSite]:
    """Drop the adds that are terms of another site's branch, not residuals of their own.

    - An add in the branch of a site S that reads an earlier stream value (its fork feeds S's
      fork): `x_l + (F(x_l) + g x_j)`, laurel's previous-activation term, has the shape of a
      scaled long skip from x_j around the blocks j..l, which would take their sites apart
      (a projection site among them looked nested in it). Nested residuals (ESRGAN's
      residual-in-residual) are kept: an inner site's fork lies in or at the outer fork.
    - Then a projection add in the branch of another site with the same fork: `x + (W x + B A x)`
      (laurel's low-rank term beside a one-matmul branch) has the shape of a projection
      `W x + (B A) x` within an identity site.
    """
    holders: dict[Node, list[ResidualSite]] = {}
    for site in sites:
        for node in site.nodes:
            holders.setdefault(node, []).append(site)
    sites = [
        s
        for s in sites
        if not any(o.fork is not s.fork and _feeds(facts, s.fork, o.fork) for o in holders.get(s.add, ()))
    ]
    inside: dict[Value, set[Node]] = {}
    for site in sites:
        inside.setdefault(site.fork, set()).update(site.nodes)
    return [s for s in sites if s.kind != "projection" or s.add not in inside.get(s.fork, ())]


def _link_streams(facts: _Facts, sites: list[ResidualSite]) -> list[list[int]]:
    """Chain each site to the first later site whose fork its output reaches through ops without
    parameters of their own (norms, activations, dropout, reshapes), and mark post-norm sites.

    A projection site starts a stream: its skip is a weighted op (a strided conv, a linear) on the
    fork, so the stream's width or resolution changes there, as at every ResNet/RegNet stage. A
    weighted op between two sites (Swin's patch merging, a stem) ends the closure and so the stream.
    """
    by_fork: dict[Value, list[int]] = {}
    for i, site in enumerate(sites):
        if site.kind != "projection":
            by_fork.setdefault(site.fork, []).append(i)
    successor: dict[int, int] = {}
    has_pred: set[int] = set()
    post: set[int] = set()
    for i, site in enumerate(sites):
        values, _ = _closure(facts, site.output)
        if any(values.values()):
            post.add(i)
        candidates = sorted(
            (j for v in values for j in by_fork.get(v, ()) if j > i and j not in has_pred),
            key=lambda j: facts.order[sites[j].add],
        )
        if candidates:
            successor[i] = candidates[0]
            has_pred.add(candidates[0])
    chains = []
    for i in range(len(sites)):
        if i in has_pred:
            continue
        chain = [i]
        while chain[-1] in successor:
            chain.append(successor[chain[-1]])
        chains.append(chain)
    chains.sort(key=lambda c: c[0])
    for chain in chains:
        for i in chain:
            if sites[i].norm != "pre" and i in post:
                sites[i] = dataclasses.replace(sites[i], norm="post")
    return chains


def find_residuals(graph: Graph, *, candidates: Iterable[Node] | None = None) -> ResidualAnalysis:
    """Find, classify and order every residual add of `graph`.

    Args:
        graph: the graph to analyse (not modified).
        candidates: restrict classification to these add nodes (default: all).

    Returns:
        A `ResidualAnalysis` whose sites are in topological order of their adds
        and whose streams are ordered by their first site.
    """
    facts = _Facts(graph)
    nodes = graph if candidates is None else candidates
    sites = [
        site
        for node in nodes
        if node.kind is OpKind.ADD
        for site in [_classify(facts, node)]
        if site is not None
    ]
    sites.sort(key=lambda s: facts.order[s.add])
    sites = _drop_nested_terms(facts, sites)
    chains = _link_streams(facts, sites)
    final: dict[int, ResidualSite] = {}
    streams = []
    for index, chain in enumerate(chains):
        members = []
        for depth, i in enumerate(chain):
            final[i] = dataclasses.replace(sites[i], stream=index, depth=depth)
            members.append(final[i])
        streams.append(ResidualStream(index=index, sites=tuple(members)))
    return ResidualAnalysis(
        sites=tuple(final[i] for i in range(len(sites))),
        streams=tuple(streams),
        opaque=tuple(sorted(facts.met, key=facts.order.__getitem__)),
    )


def only_read_by_norms(graph: Graph, value: Value) -> bool:
    """Whether every use of `value` goes into a norm (a norm op, or a decomposed
    norm such as RMSNorm's x * rsqrt(mean(x^2))) before anything else reads it."""
    facts = _Facts(graph)
    values, weighted = _closure(facts, value)
    if not all(weighted.values()):  # a weighted op reads it unnormalised (after a norm is fine)
        return False
    for v, normed in values.items():
        if normed:
            continue
        if v.is_graph_output:
            return False
        for node in v.consumers():
            if any(out not in values for out in node.outputs):
                return False
    return True
