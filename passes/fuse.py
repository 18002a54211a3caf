"""fuse: the exact rewrites that make parallel blocks pay: fold norm affines, concatenate matmuls.

(a) `norms`: a per-channel affine read only by linear layers moves into them. With
LN(x) = g * n(x) + b, W LN(x) + c = (W diag g) n(x) + (W b + c); the norm keeps gain 1 and
shift 0 (RMSNorm and HF LLaMA's separate gain multiply: b = 0, the multiply goes). Branches
that read differently-scaled norms of one stream then read the same n(x), and identical norms
and reshapes of one value merge into one.
(b) `inputs`: linear layers that read the same tensor become one MatMul with the weights
concatenated along their outputs, W_in = [W_q | W_k | W_v | W_up | W_gate], whose result is
sliced back into the parts (Q/K/V, gate/up; after `parallel:shared_norm=true` the attention's
and the MLP's input projections together, the fused form of PaLM, Chowdhery et al. 2022,
arXiv 2204.02311, and OLMo, Groeneveld et al. 2024, arXiv 2402.00838).
(c) `outputs`: linear layers whose results are summed become one MatMul with the weights
concatenated along K: a W_o + b_o + h W_down + b_down = [a | h] [W_o; W_down] + (b_o + b_down).
After `parallel` the two outputs reach the stream through two adds, (x + A) + M; the adds
are re-associated so the stream gets one, x + [a | h] W. Done only where exact: the partial
sums and each output feed nothing else, the outputs have one width and dtype and pass through
the same reshapes, the weights are not shared. OLMo found this one did not help on its GPUs;
under tensor parallelism it is what leaves one all-reduce per layer.

Sites that cannot be rewritten (a norm also read by something other than a linear layer,
shared weights, a summed output read elsewhere) are left as they are and reported in the stats'
`refused` list, one line each; a sum whose partial sum something else reads (a sequential
layer, before `parallel`) is only logged.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np

from rescompile.infra import PassBase, PassResult
from rescompile.ir import Graph, Node, OpKind, Role, Value, axis_map, input_roles, is_pure
from rescompile.ir.ops import Contract, Keep, call_of

from ._branch import insert_op, numpy_of
from ._streams import through_casts

__all__ = ["FusePass"]

logger = logging.getLogger("rescompile.fuse")


class FusePass(PassBase):
    """Fold norm gains and shifts into the linear layers that read them; fuse linear layers that
    read one tensor, or whose outputs are summed, into one MatMul. Exact up to float rounding."""

    name = "fuse"
    summary = (
        "fold norm affines into the linears reading them; concatenate linears that read one tensor or "
        "are summed"
    )

    @dataclasses.dataclass
    class Options:
        norms: bool = dataclasses.field(
            default=True, metadata={"help": "fold each norm's gain and shift into the linears reading it"}
        )
        inputs: bool = dataclasses.field(
            default=True, metadata={"help": "concatenate linears that read the same tensor into one"}
        )
        outputs: bool = dataclasses.field(
            default=True, metadata={"help": "concatenate linears whose results are summed into one (along K)"}
        )

    def call(self, graph: Graph) -> PassResult:
        self._names = itertools.count()
        stats: dict = {
            "norms_folded": 0,
            "merged": 0,
            "groups_fused": 0,
            "linears_fused": 0,
            "sums_fused": 0,
            "outputs_fused": 0,
        }
        refused: list[str] = []
        if self.options.norms:
            self._constants: dict = {}
            for node in list(graph):
                reason = self._fold(graph, node)
                if reason is None:
                    stats["norms_folded"] += 1
                elif reason:
                    refused.append(f"{node.name}: {reason}")
                    logger.info("fuse: %s left as is: %s", node.name, reason)
        if self.options.inputs:
            stats["merged"] = _merge_duplicates(graph)
            for value in list(graph.values()):
                group = _fusable_readers(value)
                if len(group) >= 2:
                    self._fuse(graph, value, group)
                    stats["groups_fused"] += 1
                    stats["linears_fused"] += len(group)
        if self.options.outputs:
            self._inner: set = set()
            for root in reversed([n for n in graph if _is_sum(n)]):
                if root.graph is None or root in self._inner:  # inside a tree already seen
                    continue
                done = self._fuse_outputs(graph, root, refused)
                if done:
                    stats["sums_fused"] += 1
                    stats["outputs_fused"] += done
        if refused:
            stats["refused"] = refused
        modified = any(stats[k] for k in ("norms_folded", "merged", "groups_fused", "sums_fused"))
        return PassResult(graph, modified=modified, stats=stats)

    # ----- (a) norm affines -------------------------------------------------------------
    def _fold(self, graph: Graph, node: Node) -> str | None:
        """Fold `node`'s affine into its readers; None when done, "" when `node` has none,
        else why not."""
        affine = _affine(node)
        if affine is None:
            return ""
        gain, shift = affine
        channels = node.outputs[0].shape[-1]
        g = numpy_of(gain.payload).astype(np.float64).reshape(-1) if gain is not None else np.ones(channels)
        s = (
            numpy_of(shift.payload).astype(np.float64).reshape(-1)
            if shift is not None
            else np.zeros(channels)
        )
        if node.kind is OpKind.NORM and np.all(g == 1) and not np.any(s):
            return ""  # already plain (or folded before)
        readers = _linear_readers(node.outputs[0])
        if isinstance(readers, str):
            return readers
        for reader in readers:
            for value in _owned(reader):
                if value.consumers() != [reader]:
                    return f"{reader.name} shares {value.name!r} with another op"
        for reader in readers:
            weight, bias, transposed = _linear_params(reader)
            w = numpy_of(weight.payload).astype(np.float64)
            w_in_out = w.T if transposed else w
            _assign(graph, weight, (g[:, None] * w_in_out).T if transposed else g[:, None] * w_in_out)
            if not np.any(s):
                continue
            extra = s @ w_in_out
            if bias is None:
                bias = _separate_bias(reader)
            if bias is not None:
                b = numpy_of(bias.payload)
                _assign(graph, bias, b.astype(np.float64) + extra.reshape(b.shape))
            else:
                out = reader.outputs[0]
                users = [(u.node, u.index) for u in out.uses()]
                b = self._param(graph, f"{reader.name}.bias", extra, weight.dtype)
                biased = insert_op(
                    graph, "Add", [out, b], after=reader, pass_name=self.name, name=reader.name
                )
                for user, index in users:
                    user.replace_input_with(index, biased)
        if node.kind is OpKind.NORM:
            slots = node.param_slots
            node.replace_input_with(slots.gain, self._constant(graph, 1.0, channels, gain.dtype))
            if shift is not None:
                node.replace_input_with(slots.shift, self._constant(graph, 0.0, channels, shift.dtype))
        else:  # a gain multiply: its readers read its input
            data = next(v for v in node.inputs if v is not gain)
            node.outputs[0].replace_all_uses_with(data)
            graph.remove(node)
        for value in (gain, shift):  # gone into the linears: a parameter nothing reads gets no gradient
            if value is not None and not value.uses() and not value.is_graph_output:
                graph.remove_initializer(value)
        return None

    def _constant(self, graph: Graph, fill: float, channels: int, dtype: str) -> Value:
        """One shared all-`fill` vector per size, so folded norms of one value become identical."""
        key = (fill, channels, dtype)
        if key not in self._constants:
            name = f"rescompile.fuse.{'ones' if fill else 'zeros'}_{channels}"
            array = np.full(channels, fill, dtype=dtype)
            self._constants[key] = graph.add_param(name, array, dtype=dtype, trainable=False)
        return self._constants[key]

    def _param(self, graph: Graph, role: str, array, dtype: str, *, trainable: bool = True) -> Value:
        name = f"rescompile.fuse.{next(self._names)}.{role.replace('/', '_').replace('.', '_')}"
        return graph.add_param(name, np.asarray(array, dtype=dtype), dtype=dtype, trainable=trainable)

    # ----- (b) input fusion -------------------------------------------------------------
    def _fuse(self, graph: Graph, x: Value, group: list[Node]) -> None:
        weights, biases = [], []
        for node in group:
            weight, bias, transposed = _linear_params(node)
            w = numpy_of(weight.payload)
            weights.append(w.T if transposed else w)
            biases.append(
                numpy_of(bias.payload) if bias is not None else np.zeros(weights[-1].shape[1], w.dtype)
            )
        first = group[0]
        dtype = _linear_params(first)[0].dtype
        fused = self._param(graph, f"{first.name}.weight", np.concatenate(weights, axis=1), dtype)
        y = insert_op(graph, "MatMul", [x, fused], before=first, pass_name=self.name, name=f"{first.name}/in")
        if any(_linear_params(n)[1] is not None for n in group):
            b = self._param(graph, f"{first.name}.bias", np.concatenate(biases), dtype)
            y = insert_op(graph, "Add", [y, b], before=first, pass_name=self.name, name=f"{first.name}/bias")
        start, pieces = 0, []
        for node, w in zip(group, weights):
            end = start + w.shape[1]
            bounds = [
                self._param(graph, k, [v], "int64", trainable=False)
                for k, v in (("start", start), ("end", end), ("axis", -1))
            ]
            pieces.append(
                insert_op(
                    graph, "Slice", [y, *bounds], before=first, pass_name=self.name, name=f"{node.name}/part"
                )
            )
            start = end
        for node, piece in zip(group, pieces):
            owned = _owned(node)
            node.outputs[0].replace_all_uses_with(piece)
            graph.remove(node)
            for value in owned:
                if not value.uses():
                    graph.remove_initializer(value)

    # ----- (c) output fusion ------------------------------------------------------------
    def _fuse_outputs(self, graph: Graph, root: Node, refused: list[str]) -> int:
        """Fuse the linear outputs summed by the add tree under `root`; how many were fused."""
        leaves, inner = _add_tree(root)
        self._inner.update(inner)
        terms, reasons = [], []
        for leaf in leaves:
            term = _term(leaf)
            if isinstance(term, str):
                reasons.append(term)
            elif term is not None:
                terms.append(term)
        groups: list[list[_Term]] = []
        for term in terms:
            group = next((g for g in groups if _compatible(g[0], term)), None)
            if group is None:
                groups.append([term])
            else:
                group.append(term)
        group = max(groups, key=len, default=[])
        if len(group) < 2:
            if len(terms) + len(reasons) >= 2:
                why = "; ".join(reasons) or "the summed outputs differ in width, dtype or reshapes"
                self._refuse(refused, root, why)
            elif len(terms) == 1:  # the usual case (a sequential layer): logged, not a refusal
                shared = _shared_partial_sum(root, leaves)
                if shared:
                    logger.info("fuse: %s: outputs left unfused: %s", root.name, shared)
            return 0
        others = [leaf for leaf in leaves if all(leaf is not t.leaf for t in group)]
        order = graph.node_order()
        moves = []  # checks of a removed partial sum's shape read a leaf of that shape instead
        for node in inner:
            for value in node.outputs:
                for use in value.uses():
                    if _data_use(use):
                        continue
                    keep = next((v for v in others if _before(v, use.node, order)), None)
                    if keep is None:
                        self._refuse(refused, root, f"{use.node.name} reads the partial sum {value.name!r}")
                        return 0
                    moves.append((use, keep))
        for use, keep in moves:
            use.node.replace_input_with(use.index, keep)
        fused = self._fused_output(graph, root, group)
        operands = others + [fused]
        total = operands[0]
        for i, operand in enumerate(operands[1:-1]):
            total = insert_op(
                graph, "Add", [total, operand], before=root, pass_name=self.name, name=f"{root.name}/sum{i}"
            )
        if len(operands) == 1:
            root.outputs[0].replace_all_uses_with(fused, replace_graph_outputs=True)
            inner = [*inner, root]
        else:
            root.replace_input_with(0, total)
            root.replace_input_with(1, fused)
        for node in reversed(inner):
            graph.remove(node)
        for term in group:
            term.remove(graph)
        return len(group)

    def _fused_output(self, graph: Graph, root: Node, group: list[_Term]) -> Value:
        """[d_1 | ... | d_n] [W_1; ...; W_n] + sum b_i, through the first term's reshapes,
        built just before `root` (where every d_i is defined)."""
        first = group[0]
        dtype = first.weight.dtype
        weight = np.concatenate([t.matrix() for t in group], axis=0)
        name = first.linear.name
        joined = insert_op(
            graph,
            "Concat",
            [t.data for t in group],
            before=root,
            pass_name=self.name,
            name=f"{name}/cat",
            attrs={"axis": -1},
        )
        w = self._param(graph, f"{name}.out_weight", weight, dtype)
        y = insert_op(graph, "MatMul", [joined, w], before=root, pass_name=self.name, name=f"{name}/out")
        biases = [b for t in group for b in t.biases]
        if biases:
            total = sum(numpy_of(b.payload).astype(np.float64).reshape(-1) for b in biases)
            b = self._param(graph, f"{name}.out_bias", total, dtype)
            y = insert_op(graph, "Add", [y, b], before=root, pass_name=self.name, name=f"{name}/out_bias")
        moved = first.wrappers
        for wrapper in reversed(moved):  # innermost first: move them after the new op
            wrapper.replace_input_with(_data_slot(wrapper), y)
            graph.remove(wrapper, safe=False)
            graph.insert_before(root, wrapper)
            y = wrapper.outputs[0]
        first.chain = [n for n in first.chain if n not in moved]
        return y

    def _refuse(self, refused: list[str], root: Node, why: str) -> None:
        refused.append(f"{root.name}: outputs left unfused: {why}")
        logger.info("fuse: %s: outputs left unfused: %s", root.name, why)


def _assign(graph: Graph, value: Value, array: np.ndarray) -> None:
    """Set a parameter to `array` in its own dtype and kind (numpy, or a torch tensor)."""
    payload = value.payload
    dtype = numpy_of(payload).dtype
    graph.set_payload(
        value, payload.new_tensor(array) if hasattr(payload, "new_tensor") else array.astype(dtype)
    )


def _affine(node: Node) -> tuple[Value | None, Value | None] | None:
    """(gain, shift) of a norm with parameters, or (gain, None) of a multiply by a constant
    per-channel vector (HF LLaMA's RMSNorm gain); None for anything else."""
    out = node.outputs[0] if len(node.outputs) == 1 else None
    if out is None or out.shape is None or not out.shape or not isinstance(out.shape[-1], int):
        return None
    channels = out.shape[-1]

    def vector(index):
        value = node.inputs[index] if index is not None and index < len(node.inputs) else None
        ok = value is not None and value.is_initializer and value.shape is not None
        return value if ok and tuple(d for d in value.shape if d != 1) == (channels,) else None

    if node.kind is OpKind.NORM and node.param_slots is not None and node.param_slots.gain is not None:
        gain, shift = vector(node.param_slots.gain), vector(node.param_slots.shift)
        return (gain, shift) if gain is not None else None
    if node.kind is OpKind.MUL and len(node.inputs) == 2:
        consts = [vector(i) for i in range(2)]
        live = [v for v in node.inputs if v is not None and not v.is_initializer]
        if sum(c is not None for c in consts) == 1 and len(live) == 1 and live[0].shape == out.shape:
            return next(c for c in consts if c is not None), None
    return None


def _linear_params(node: Node) -> tuple[Value, Value | None, bool] | None:
    """(weight, bias, transposed) of a linear layer whose data's last axis meets a 2-D weight
    parameter (transposed: stored [out, in]); None for anything else."""
    slots = node.param_slots
    if node.kind is not OpKind.WEIGHTED or slots is None or slots.weight is None:
        return None
    weight = node.inputs[slots.weight]
    if weight is None or not weight.is_initializer or weight.shape is None or len(weight.shape) != 2:
        return None
    call = call_of(node)
    for scalar in ("alpha", "beta"):  # Gemm's factors
        if call is not None and call.has(scalar) and call.arg(scalar) not in (None, 1, 1.0):
            return None
    bias = None
    if slots.bias is not None and slots.bias < len(node.inputs) and node.inputs[slots.bias] is not None:
        bias = node.inputs[slots.bias]
        if not bias.is_initializer or bias.shape is None or len(bias.shape) != 1:
            return None
    return weight, bias, slots.weight_out_axis % 2 == 0


def _separate_bias(node: Node) -> Value | None:
    """The bias of a linear layer without a bias input that the add reading its output alone
    adds (ONNX's MatMul + Add), when only that add reads it; None otherwise.

    NOTE: a shift folded into such a linear goes into that bias, as into torch's linear's own
    bias: a second bias add would hide the linear from output fusion in ONNX only, and the two
    frontends would refuse different sums."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output:
        return None
    add = uses[0].node
    index = _bias_of(add) if add.kind is OpKind.ADD and is_pure(add) else None
    if index is None or add.inputs[1 - index] is not out:
        return None
    bias = add.inputs[index]
    return bias if bias.consumers() == [add] and not bias.is_graph_output else None


def _data_index(node: Node) -> int | None:
    """The input whose last axis the linear layer contracts with its weight."""
    params = _linear_params(node)
    amap = axis_map(node)
    roles = input_roles(node) or ()
    if params is None or amap is None:
        return None
    w_in_axis = 1 if params[2] else 0
    for mix in amap.mixes:
        if not isinstance(mix, Contract) or mix.groups != 1 or len(mix.operands) != 2:
            continue
        (a, a_axis), (b, b_axis) = mix.operands
        if b == node.param_slots.weight and b_axis == w_in_axis:
            data = node.inputs[a]
            if roles[a] is Role.DATA and data is not None and data.shape and a_axis == len(data.shape) - 1:
                return a
    return None


def _owned(node: Node) -> list[Value]:
    weight, bias, _ = _linear_params(node)
    return [v for v in (weight, bias) if v is not None]


def _linear_readers(value: Value) -> list[Node] | str:
    """The linear layers reading `value` (through reshapes that keep its last axis), or why
    something else reads it."""
    readers, stack = [], [value]
    while stack:
        current = stack.pop()
        if current.is_graph_output:
            return f"{current.name!r} is a graph output"
        for use in current.uses():
            node = use.node
            if node.kind is OpKind.SHAPE:
                continue
            if _data_index(node) == use.index:
                readers.append(node)
                continue
            out = node.outputs[0] if len(node.outputs) == 1 else None
            roles = input_roles(node) or ()
            if (
                node.kind is OpKind.LAYOUT
                and out is not None
                and use.index < len(roles)
                and roles[use.index] is Role.DATA
                and out.shape
                and current.shape
                and out.shape[-1] == current.shape[-1]
                and _keeps_last_axis(node, use.index)
            ):
                stack.append(out)
                continue
            return f"read by {node.name} ({node.op_type}), which is not a linear layer"
    return readers or "read by no linear layer"


def _keeps_last_axis(node: Node, index: int) -> bool:
    """The output's last axis is input `index`'s last axis (a view merging leading axes)."""
    amap = axis_map(node)
    data = node.inputs[index]
    if amap is None or not amap.outputs or not amap.outputs[0] or not data.shape:
        return False
    last = len(data.shape) - 1
    return any(isinstance(s, Keep) and s.input == index and s.axis == last for s in amap.outputs[0][-1])


def _fusable_readers(value: Value) -> list[Node]:
    """Linear layers reading `value` whose parameters only they use, in graph order."""
    group = []
    for node in value.consumers():
        if node in group or _data_index(node) is None or node.inputs[_data_index(node)] is not value:
            continue
        if node.outputs[0].is_graph_output or any(v.consumers() != [node] for v in _owned(node)):
            continue
        group.append(node)
    dtypes = {_linear_params(n)[0].dtype for n in group}
    return group if len(dtypes) == 1 else []


def _merge_duplicates(graph: Graph) -> int:
    """Merge pure norms and reshapes that compute the same thing from the same inputs."""
    seen: dict = {}
    merged = 0
    for node in list(graph):
        if node.kind not in (OpKind.NORM, OpKind.LAYOUT) or len(node.outputs) != 1 or not is_pure(node):
            continue
        if node.outputs[0].is_graph_output:
            continue
        key = (node.domain, node.op_type, tuple(id(v) for v in node.inputs))
        twin = next((t for t in seen.get(key, ()) if _same_attrs(t, node)), None)
        if twin is None:
            seen.setdefault(key, []).append(node)
            continue
        node.outputs[0].replace_all_uses_with(twin.outputs[0])
        graph.remove(node)
        merged += 1
    return merged


def _same_attrs(a: Node, b: Node) -> bool:
    try:
        return bool(a.attrs == b.attrs)
    except Exception:  # attributes that do not compare (arrays): treat as different
        return False


# ----- (c) output fusion: the pieces ----------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Term:
    """One summed linear output: leaf = wrappers(linear(data) [+ bias])."""

    leaf: Value
    linear: Node
    data: Value
    weight: Value
    biases: list[Value]
    bias_add: Node | None
    chain: list[Node]  # the nodes between the linear layer and the leaf, from the leaf inwards

    @property
    def wrappers(self) -> list[Node]:
        return [n for n in self.chain if n is not self.bias_add]

    def matrix(self) -> np.ndarray:
        """The weight as [in, out]."""
        w = numpy_of(self.weight.payload)
        return w.T if _linear_params(self.linear)[2] else w

    def remove(self, graph: Graph) -> None:
        """Remove what computed the leaf (less the reshapes moved onto the fused output) and
        its parameters."""
        owned = [*_owned(self.linear), *self.biases]
        for node in [*self.chain, self.linear]:
            graph.remove(node)
        for value in owned:
            if value.graph is graph and not value.uses() and not value.is_graph_output:
                graph.remove_initializer(value)


def _data_slot(node: Node) -> int:
    return next(i for i, r in enumerate(input_roles(node)) if r is Role.DATA and node.inputs[i] is not None)


def _before(value: Value, node: Node, order: dict) -> bool:
    """`value` is defined before `node` (an input or initializer, or made by an earlier node)."""
    return value.producer is None or order[value.producer] < order[node]


def _is_sum(node: Node) -> bool:
    """x + y of two tensors of the output's shape (no broadcasting, no scale factor)."""
    if node.kind is not OpKind.ADD or len(node.outputs) != 1 or not is_pure(node):
        return False
    call = call_of(node)
    if call is not None and call.has("alpha") and call.arg("alpha") not in (None, 1, 1.0):
        return False
    data = [v for v in node.inputs if v is not None]
    out = node.outputs[0]
    return (
        len(data) == 2
        and out.shape is not None
        and all(not v.is_initializer and v.shape == out.shape and v.dtype == out.dtype for v in data)
    )


def _data_use(use) -> bool:
    """A use that reads the values, not only the shape or dtype (torch.export's metadata checks)."""
    if use.node.kind is OpKind.SHAPE:
        return False
    roles = input_roles(use.node) or ()
    return not (use.index < len(roles) and roles[use.index] is Role.LIKE)


def _only_reader(value: Value) -> Node | None:
    """The single node reading `value`'s data, if there is exactly one and it is no graph output."""
    readers = [u.node for u in value.uses() if _data_use(u)]
    return readers[0] if len(readers) == 1 and not value.is_graph_output else None


def _add_tree(root: Node) -> tuple[list[Value], list[Node]]:
    """The leaves of the sum under `root` and its inner nodes (adds and dtype-keeping casts whose
    results only the tree reads), inner nodes in graph order."""
    leaves, inner = [], []

    def expand(node: Node) -> None:
        for operand in node.inputs:
            links, value = [], operand
            while (
                value.producer is not None
                and value.producer.kind in (OpKind.CAST, OpKind.IDENTITY)
                and _only_reader(value) is not None
                and is_pure(value.producer)
                and len([v for v in value.producer.inputs if v is not None]) == 1
                and value.producer.inputs[0].dtype == value.dtype
            ):
                links.append(value.producer)
                value = value.producer.inputs[0]
            producer = value.producer
            if producer is not None and _is_sum(producer) and _only_reader(value) is not None:
                inner.extend([*links, producer])
                expand(producer)
            else:
                leaves.append(operand)

    expand(root)
    order = root.graph.node_order() if inner else {}
    return leaves, sorted(inner, key=order.__getitem__)


def _term(leaf: Value) -> _Term | str | None:
    """The linear output `leaf` is (through reshapes that keep the last axis, identities and one
    bias add), None when it is none, or why it cannot be fused."""
    chain, bias_add, biases, value = [], None, [], leaf
    while True:
        node = value.producer
        if node is None:
            return None
        if _linear_params(node) is not None and _data_index(node) is not None:
            break
        if node.kind is OpKind.ADD and bias_add is None and _bias_of(node) is not None:
            bias_add = node
            chain.append(node)
            biases.append(node.inputs[_bias_of(node)])
            value = node.inputs[1 - _bias_of(node)]
            continue
        roles = input_roles(node) or ()
        data = [i for i, r in enumerate(roles) if r is Role.DATA and node.inputs[i] is not None]
        if (
            node.kind in (OpKind.LAYOUT, OpKind.IDENTITY)
            and len(data) == 1
            and len(node.outputs) == 1
            and value.shape
            and node.inputs[data[0]].shape
            and value.shape[-1] == node.inputs[data[0]].shape[-1]
            and _keeps_last_axis(node, data[0])
        ):
            if not is_pure(node):
                return f"{leaf.name!r} passes through {node.name}, which is not pure (dropout in training?)"
            chain.append(node)
            value = node.inputs[data[0]]
            continue
        return None
    linear = node
    weight, bias, _ = _linear_params(linear)
    if bias is not None:
        biases.insert(0, bias)
    for v in [linear.outputs[0], *(n.outputs[0] for n in chain)]:
        if _only_reader(v) is None:
            return f"{v.name!r} (from {linear.name}) is also read elsewhere"
    for v in [weight, *biases]:
        if v.consumers() != [linear if v is weight or v is bias else bias_add] or v.is_graph_output:
            return f"{linear.name} shares {v.name!r} with another op"
    data = linear.inputs[_data_index(linear)]
    if data.shape is None or any(d is None for d in data.shape):
        return f"{linear.name} reads {data.name!r} of unknown shape"
    return _Term(leaf, linear, data, weight, biases, bias_add, chain)


def _bias_of(node: Node) -> int | None:
    """Which input of an add is a per-channel constant vector along the other's last axis."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    out = node.outputs[0]
    for i, v in enumerate(node.inputs):
        other = node.inputs[1 - i]
        if (
            v.is_initializer
            and not other.is_initializer
            and v.shape is not None
            and out.shape
            and other.shape == out.shape
            and tuple(d for d in v.shape if d != 1) == (out.shape[-1],)
            and v.shape[-1] == out.shape[-1]
        ):
            return i
    return None


def _compatible(a: _Term, b: _Term) -> bool:
    """The two outputs can share one MatMul: same width and dtype, data of the same leading
    shape, and the same reshapes between the MatMul and the sum."""
    wa, wb = a.matrix(), b.matrix()
    if wa.shape[1] != wb.shape[1] or a.weight.dtype != b.weight.dtype or a.data.dtype != b.data.dtype:
        return False
    if a.data.shape[:-1] != b.data.shape[:-1] or len(a.wrappers) != len(b.wrappers):
        return False
    for x, y in zip(a.wrappers, b.wrappers):  # a bias commutes with them: its place is free
        if (x.op_type, x.domain, x.kind) != (y.op_type, y.domain, y.kind) or not _same_attrs(x, y):
            return False
        ix, iy = _data_slot(x), _data_slot(y)
        if len(x.inputs) != len(y.inputs):
            return False
        for i, (u, v) in enumerate(zip(x.inputs, y.inputs)):
            if i == ix and i == iy:
                continue
            if u is v:
                continue
            same_const = (
                u is not None
                and v is not None
                and u.is_initializer
                and v.is_initializer
                and np.array_equal(numpy_of(u.payload), numpy_of(v.payload))
            )
            if not same_const:
                return False
    return True


def _shared_partial_sum(root: Node, leaves: list[Value]) -> str:
    """Why a sum with one linear output has no second one: a leaf is itself a sum with a linear
    output that something else also reads (the layer is sequential); "" when not so."""
    for leaf in leaves:
        base = through_casts(leaf)
        producer = base.producer
        if producer is None or not _is_sum(producer):
            continue
        if any(isinstance(_term(v), _Term) for v in producer.inputs):
            path = {root, *(v.producer for v in _cast_path(leaf, base))}
            readers = [u.node.name for u in base.uses() if _data_use(u) and u.node not in path]
            if readers:
                return (
                    f"the partial sum {leaf.name!r} is also read by {readers[0]} "
                    "(a sequential layer; apply parallel first)"
                )
    return ""


def _cast_path(leaf: Value, base: Value) -> list[Value]:
    """The values from `leaf` down to (not including) `base` through casts."""
    path = []
    while leaf is not base:
        path.append(leaf)
        leaf = leaf.producer.inputs[0]
    return path
