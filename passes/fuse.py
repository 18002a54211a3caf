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

Output fusion (A_out + M_out = [a | h] [W_o; W_down]) is not done: OLMo found it did not help,
and after `parallel` the two outputs reach the stream through two adds. Sites that cannot be
folded (a norm also read by something other than a linear layer, shared weights) are left as
they are and reported.
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

__all__ = ["FusePass"]

logger = logging.getLogger("rescompile.fuse")


class FusePass(PassBase):
    """Fold norm gains and shifts into the linear layers that read them; fuse linear layers that
    read one tensor into one MatMul. Exact up to float rounding."""

    name = "fuse"
    summary = "fold norm affines into the linears reading them; concatenate linears that read one tensor"

    @dataclasses.dataclass
    class Options:
        norms: bool = dataclasses.field(
            default=True, metadata={"help": "fold each norm's gain and shift into the linears reading it"}
        )
        inputs: bool = dataclasses.field(
            default=True, metadata={"help": "concatenate linears that read the same tensor into one"}
        )

    def call(self, graph: Graph) -> PassResult:
        self._names = itertools.count()
        stats: dict = {"norms_folded": 0, "merged": 0, "groups_fused": 0, "linears_fused": 0}
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
        if refused:
            stats["refused"] = refused
        modified = any(stats[k] for k in ("norms_folded", "merged", "groups_fused"))
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
            if bias is not None:
                _assign(graph, bias, numpy_of(bias.payload).astype(np.float64) + extra)
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
