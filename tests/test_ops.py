"""The op table: entries, roles, purity and axis maps per op family.

Axis maps are checked against reality where practical: run the op (ONNX's reference evaluator, or
the torch call itself), perturb one index of one input axis, and compare the output indices that
change along each output axis with those the map predicts.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, reference
from torch import fx, nn

from rescompile.frontends._torch_kinds import kind_of_torch_target, torch_param_slots
from rescompile.frontends.torch import import_graph_module, import_module
from rescompile.ir import CONST, Graph, Node, OpKind, Role, Value, axis_map, input_roles, is_pure, op_info
from rescompile.ir.ops import (
    Contract,
    Group,
    Keep,
    Lookup,
    Merge,
    New,
    Normalize,
    Offset,
    Reduce,
    Slice,
    Split,
    Window,
    onnx_param_slots,
)

RNG = np.random.default_rng(0)


# ----- the reality check ---------------------------------------------------------------------------
def _changed_along(before: np.ndarray, after: np.ndarray, axis: int) -> set[int]:
    diff = np.moveaxis(before != after, axis, 0).reshape(before.shape[axis], -1)
    return {int(k) for k in np.flatnonzero(diff.any(axis=1))}


def _expected(source, in_axis: int, index: int, in_shape: tuple, out_size: int) -> set[int] | None:
    """Output indices the source says change when input index `index` of `in_axis` changes."""
    if isinstance(source, Keep):  # a shorter output (a split's first piece) holds the first indices only
        return {index} if index < out_size else set()
    if isinstance(source, Offset):  # indices moved past the end (padding cropped there) are not in it
        return {source.offset + index} if source.offset + index < out_size else set()
    if isinstance(source, Slice):
        k, rest = divmod(index - source.start, source.step)
        return {k} if rest == 0 and 0 <= k < out_size else set()
    if isinstance(source, Merge):
        position = source.axes.index(in_axis)
        return {k for k in range(out_size) if np.unravel_index(k, source.sizes)[position] == index}
    if isinstance(source, Split):
        flat_sizes = [in_shape[a] for a in source.axes]
        coords = [0] * len(source.axes)
        coords[source.axes.index(in_axis)] = index
        others = [range(s) if a != in_axis else [index] for a, s in zip(source.axes, flat_sizes)]
        flats = {
            int(np.ravel_multi_index(c, flat_sizes))
            for c in np.array(np.meshgrid(*others)).reshape(len(source.axes), -1).T
        }
        return {int(np.unravel_index(f, source.sizes)[source.part]) for f in flats}
    if isinstance(source, Group):
        block_in, block_out = in_shape[in_axis] // source.groups, out_size // source.groups
        group = index // block_in
        return set(range(group * block_out, (group + 1) * block_out))
    return None


def _axes_of(source) -> tuple[int, ...]:
    return source.axes if isinstance(source, (Merge, Split)) else (source.axis,)


def check_against_reality(amap, inputs: list, run, *, skip_inputs=()) -> int:
    """Perturb every input axis a source names and compare; returns how many checks ran."""
    assert amap is not None
    base = run(inputs)
    normalized = {(m.input, m.axis) for m in amap.mixes if isinstance(m, Normalize)}
    checks = 0
    for o, out_axes in enumerate(amap.outputs):
        assert base[o].ndim == len(out_axes), (o, base[o].shape, out_axes)
        for b, sources in enumerate(out_axes):
            for source in sources:
                if isinstance(source, (New, Window)) or source.input in skip_inputs:
                    continue
                array = inputs[source.input]
                if not np.issubdtype(array.dtype, np.floating):
                    continue
                for in_axis in _axes_of(source):
                    if (source.input, in_axis) in normalized:
                        continue
                    index = array.shape[in_axis] - 1
                    perturbed = list(inputs)
                    bumped = np.array(array, copy=True)
                    np.moveaxis(bumped, in_axis, 0)[index] += 0.5 + RNG.random(
                        bumped.shape[:in_axis] + bumped.shape[in_axis + 1 :]
                    ).astype(bumped.dtype)
                    perturbed[source.input] = bumped
                    after = run(perturbed)[o]
                    expected = _expected(source, in_axis, index, array.shape, base[o].shape[b])
                    assert _changed_along(base[o], after, b) == expected, (o, b, source, in_axis)
                    checks += 1
    return checks


# ----- ONNX nodes built by hand ------------------------------------------------------------------
def onnx_node(op_type, shapes, out_shapes=None, consts=None, num_outputs=1, **attrs):
    """A one-node graph: inputs of `shapes` (None: an omitted input), constant inputs by position."""
    graph = Graph()
    consts = consts or {}
    inputs = []
    for k, shape in enumerate(shapes):
        if k in consts:
            array = np.asarray(consts[k])
            inputs.append(
                graph.add_initializer(
                    Value(f"c{k}", shape=array.shape, payload=array, role=CONST, dtype=str(array.dtype))
                )
            )
        elif shape is None:
            inputs.append(None)
        else:
            inputs.append(graph.add_input(Value(f"x{k}", shape=shape)))
    node = graph.append(Node(op_type, inputs, attrs=attrs, num_outputs=num_outputs))
    for out, shape in zip(node.outputs, out_shapes or ()):
        out.shape = shape
    return node


def onnx_arrays(node):
    return [
        v.payload
        if v is not None and v.payload is not None
        else (None if v is None else RNG.standard_normal(v.shape).astype(np.float32))
        for v in node.inputs
    ]


def onnx_runner(node):
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(node.inputs)]
    proto = helper.make_node(node.op_type, names, [f"o{k}" for k in range(len(node.outputs))], **node.attrs)
    session = reference.ReferenceEvaluator(proto)
    return lambda arrays: [
        np.asarray(a) for a in session.run(None, {n: a for n, a in zip(names, arrays) if n})
    ]


def check_onnx(node) -> int:
    return check_against_reality(axis_map(node), onnx_arrays(node), onnx_runner(node))


# ----- torch nodes from a captured module ----------------------------------------------------------
def torch_graph(module, *args, fx_trace=False, functionalize=None):
    """The module's IR through torch.export (static shapes), or through torch.fx."""
    if fx_trace:
        from rescompile.frontends.torch import _propagate_shapes

        gm = fx.symbolic_trace(module)
        if functionalize is not None:
            functionalize(gm)
        _propagate_shapes(gm, args, {})
        return import_graph_module(gm), gm
    return import_module(module, args, dynamic=False), None


def torch_nodes(graph, name):
    return [
        n
        for n in graph
        if n.op_type.split("::")[-1].split(".")[0] == name
        or getattr(n.attrs.get("target"), "__name__", None) == name
    ]


def _fill(template, tensors, attrs):
    """The call's arguments: tensors for input slots, attribute values for lifted arguments."""
    from rescompile.ir.ops import _is_attribute_ref, _is_slot

    if _is_slot(template):
        return tensors[template.index]
    if _is_attribute_ref(template):
        return _fill(attrs[template.name], tensors, attrs)
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, tensors, attrs) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, tensors, attrs) for k, v in template.items()}
    return template


def _call(attrs, tensors):
    """Run a torch IR node's call on `tensors` in place of its inputs."""
    args, kwargs = _fill(attrs["args"], tensors, attrs), _fill(attrs["kwargs"], tensors, attrs)
    with torch.no_grad():
        if attrs["fx_op"] == "call_method":
            return getattr(args[0], attrs["target"])(*args[1:], **kwargs)
        if attrs["fx_op"] == "call_module":
            return attrs["module"](*args, **kwargs)
        return attrs["target"](*args, **kwargs)


def torch_runner(node):
    def run(arrays):
        out = _call(node.attrs, [torch.from_numpy(np.array(a)) for a in arrays])
        return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    return run


def torch_values(graph, args):
    """The value each IR value holds when the graph runs on `args`."""
    values = {value: value.payload for value in graph.initializers.values()}
    values.update(zip(graph.inputs, args))
    for node in graph:
        out = _call(node.attrs, [values.get(v) for v in node.inputs])
        values.update(zip(node.outputs, out) if len(node.outputs) > 1 else [(node.output, out)])
    return values


def real_ops(graph):
    """The graph's nodes less torch.export's input guard (an opaque call)."""
    return [n for n in graph if n.name != "_guards_fn"]


def check_torch_graph(graph, args, unmapped=()) -> int:
    """Check the axis map of every node of a captured graph on the values it really sees; every node
    whose inputs are tensors has one, except ops named in `unmapped`. Returns the perturbations run."""
    values = torch_values(graph, args)
    checks = 0
    for node in real_ops(graph):
        ins = [values[v] for v in node.inputs]
        if not all(isinstance(t, torch.Tensor) for t in ins):
            continue
        amap = axis_map(node)
        if amap is None:
            assert node.op_type in unmapped, node
            continue
        checks += check_against_reality(amap, [t.detach().numpy() for t in ins], torch_runner(node))
    return checks


# ----- elementwise and broadcasting ---------------------------------------------------------------
def test_elementwise_broadcast_lists_every_operand_not_of_size_one():
    node = onnx_node("Add", [(2, 3, 4), (3, 1)])
    amap = axis_map(node)
    assert amap.outputs == (((Keep(0, 0),), (Keep(0, 1), Keep(1, 0)), (Keep(0, 2),)),)
    assert op_info(node).kind is OpKind.ADD and input_roles(node) == (Role.DATA, Role.DATA)
    assert check_onnx(node) == 4


def test_unary_and_where():
    assert axis_map(onnx_node("Relu", [(2, 5)])).outputs == (((Keep(0, 0),), (Keep(0, 1),)),)
    where = onnx_node("Where", [(1, 4), (3, 4), (4,)])  # the condition broadcasts like the data
    assert axis_map(where).outputs[0][1] == (Keep(0, 1), Keep(1, 1), Keep(2, 0))
    assert input_roles(where) == (Role.MASK, Role.DATA, Role.DATA)


# ----- weighted ops -------------------------------------------------------------------------------
def test_matmul_contracts_last_with_second_to_last_and_broadcasts_batch():
    node = onnx_node("MatMul", [(2, 5, 8), (8, 6)])
    amap = axis_map(node)
    assert amap.outputs == (((Keep(0, 0),), (Keep(0, 1),), (Keep(1, 1),)),)
    assert amap.mixes == (Contract(((0, 2), (1, 0))),)
    assert check_onnx(node) == 3
    batched = onnx_node("MatMul", [(3, 1, 5, 8), (4, 8, 6)])
    assert axis_map(batched).outputs[0][:2] == ((Keep(0, 0),), (Keep(1, 0),))
    assert check_onnx(batched) == 4


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias(trans_b):
    node = onnx_node("Gemm", [(4, 8), (6, 8) if trans_b else (8, 6), (6,)], transB=trans_b)
    amap = axis_map(node)
    assert amap.outputs == (((Keep(0, 0),), (Keep(1, 0 if trans_b else 1), Keep(2, 0))),)
    assert amap.mixes == (Contract(((0, 1), (1, 1 if trans_b else 0))),)
    assert onnx_param_slots("Gemm", node.attrs).weight_out_axis == (0 if trans_b else 1)
    assert check_onnx(node) == 3


def test_torch_linear_addmm_and_matmul_against_the_calls():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.w = nn.Parameter(torch.randn(6, 5))

        def forward(self, x):
            return self.fc(x) @ self.w

    module, x = Mlp(), torch.randn(3, 4, 8)
    graph, _ = torch_graph(module, x)
    (linear,) = torch_nodes(graph, "linear")
    amap = axis_map(linear)
    assert amap.outputs[0][-1] == (Keep(1, 0), Keep(2, 0))
    assert amap.mixes == (Contract(((0, 2), (1, 1))),)
    assert input_roles(linear) == (Role.DATA, Role.WEIGHT, Role.BIAS)
    assert check_torch_graph(graph, (x,)) >= 6


# ----- convolutions -------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, out_channels", [(1, 6), (2, 6), (4, 4), (4, 8)])
def test_conv_channels_and_groups(groups, out_channels):
    node = onnx_node(
        "Conv",
        [(2, 4, 5, 5), (out_channels, 4 // groups, 3, 3), (out_channels,)],
        out_shapes=[(2, out_channels, 3, 3)],
        group=groups,
    )
    amap = axis_map(node)
    channel = amap.outputs[0][1]
    assert channel[:2] == (Keep(1, 0), Keep(2, 0))
    depthwise = groups == 4 and out_channels == 4
    assert channel[2:] == (() if groups == 1 else (Keep(0, 1),) if depthwise else (Group(0, 1, groups),))
    assert amap.outputs[0][2:] == ((Window(0, 2),), (Window(0, 3),))
    assert amap.mixes == (Contract(((0, 1), (1, 1)), groups),)
    assert check_onnx(node) >= 3


def test_conv_transpose_weight_axis_and_torch_convolution():
    node = onnx_node("ConvTranspose", [(1, 4, 3, 3), (4, 6, 2, 2), (6,)], out_shapes=[(1, 6, 4, 4)])
    assert axis_map(node).outputs[0][1] == (Keep(1, 1), Keep(2, 0))
    assert onnx_param_slots("ConvTranspose", {}).weight_out_axis == 1
    assert onnx_param_slots("ConvTranspose", {"group": 2}) is None
    assert check_onnx(node) == 3

    conv = torch.ops.aten.convolution.default
    args = (object(),) * 3 + ([1], [0], [1], True, [0], 1)
    assert torch_param_slots(conv, args, lambda a: not isinstance(a, (list, bool, int))).weight_out_axis == 1
    args = (object(),) * 3 + ([1], [0], [1], False, [0], 1)
    assert torch_param_slots(conv, args, lambda a: not isinstance(a, (list, bool, int))).weight_out_axis == 0


def test_torch_cnn_with_depthwise_conv_against_the_calls():
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 4, 1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    graph, _ = torch_graph(module, x)
    assert check_torch_graph(graph, (x,)) >= 15


# ----- norms --------------------------------------------------------------------------------------
def test_layer_norm_normalizes_last_axes_and_scale_follows_them():
    node = onnx_node("LayerNormalization", [(2, 5, 8), (8,), (8,)], axis=-1)
    amap = axis_map(node)
    assert amap.outputs[0][2] == (Keep(0, 2), Keep(1, 0), Keep(2, 0))
    assert amap.mixes == (Normalize(0, 2),)
    assert input_roles(node) == (Role.DATA, Role.SCALE, Role.SHIFT)
    assert check_onnx(node) >= 4


def test_batch_group_and_instance_norm_channel_axis():
    bn = onnx_node(
        "BatchNormalization",
        [(2, 4, 3, 3), (4,), (4,), (4,), (4,)],
        consts={3: np.zeros(4, np.float32), 4: np.ones(4, np.float32)},
    )
    amap = axis_map(bn)
    assert amap.outputs[0][1] == (Keep(0, 1), Keep(1, 0), Keep(2, 0), Keep(3, 0), Keep(4, 0))
    assert amap.mixes == ()  # inference: running statistics, nothing is normalised across the batch
    assert input_roles(bn)[3:] == (Role.RUNNING_MEAN, Role.RUNNING_VAR)
    assert check_onnx(bn) >= 4
    gn = onnx_node("GroupNormalization", [(2, 4, 3, 3), (4,), (4,)], num_groups=2)
    assert {m.axis for m in axis_map(gn).mixes} == {1, 2, 3}
    inorm = onnx_node("InstanceNormalization", [(2, 4, 3, 3), (4,), (4,)])
    assert axis_map(inorm).mixes == (Normalize(0, 2), Normalize(0, 3))
    assert check_onnx(inorm) >= 3


def test_torch_norm_roles_follow_aten_and_functional_signatures():
    aten_bn = torch.ops.aten.batch_norm.default
    slots = torch_param_slots(
        aten_bn, (object(),) * 5 + (False, 0.1, 1e-5, True), lambda a: type(a) is object
    )
    assert (slots.gain, slots.shift) == (1, 2)
    slots = torch_param_slots(F.batch_norm, (object(),) * 5 + (False, 0.1, 1e-5), lambda a: type(a) is object)
    assert (slots.gain, slots.shift) == (3, 4)
    # affine=False: no weight or bias tensors, so no gain
    slots = torch_param_slots(
        F.batch_norm,
        (object(), object(), object(), None, None, False, 0.1, 1e-5),
        lambda a: type(a) is object,
    )
    assert (slots.gain, slots.shift) == (None, None)
    assert kind_of_torch_target(F.batch_norm) is kind_of_torch_target(aten_bn) is OpKind.NORM


def test_fx_batch_norm_node_roles():
    """The fx fallback's functional batch norm: running statistics before the affine parameters."""
    from rescompile.frontends.torch import _functionalize_leaf_modules

    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 4, 4)
    graph, _ = torch_graph(module, x, fx_trace=True, functionalize=_functionalize_leaf_modules)
    bn = next(n for n in graph if n.attrs.get("target") is F.batch_norm)
    assert input_roles(bn) == (Role.DATA, Role.RUNNING_MEAN, Role.RUNNING_VAR, Role.SCALE, Role.SHIFT)
    assert (bn.param_slots.gain, bn.param_slots.shift) == (3, 4)
    assert is_pure(bn)
    assert check_torch_graph(graph, (x,)) >= 8


# ----- reshape, flatten, transpose ----------------------------------------------------------------
def test_reshape_splits_hidden_into_heads_and_merges_back():
    split = onnx_node("Reshape", [(2, 5, 12), (4,)], consts={1: np.array([2, 5, 3, 4])})
    amap = axis_map(split)
    assert amap.outputs == (
        ((Keep(0, 0),), (Keep(0, 1),), (Split(0, (2,), (3, 4), 0),), (Split(0, (2,), (3, 4), 1),)),
    )
    assert check_onnx(split) == 4
    merge = onnx_node("Reshape", [(2, 4, 3, 3), (2,)], consts={1: np.array([0, -1])})
    assert axis_map(merge).outputs == (((Keep(0, 0),), (Merge(0, (1, 2, 3), (4, 3, 3)),)),)
    assert check_onnx(merge) == 4
    regroup = onnx_node("Reshape", [(6, 4), (2,)], consts={1: np.array([4, 6])})
    assert axis_map(regroup).outputs[0] == ((Split(0, (0, 1), (4, 6), 0),), (Split(0, (0, 1), (4, 6), 1),))
    assert check_onnx(regroup) == 4


def test_reshape_keeps_symbolic_leading_and_trailing_axes():
    node = onnx_node(
        "Reshape",
        [("batch", "seq", 12), (4,)],
        out_shapes=[("batch", "seq", 3, 4)],
        consts={1: np.array([0, 0, 3, 4])},
    )
    assert axis_map(node).outputs[0][:2] == ((Keep(0, 0),), (Keep(0, 1),))
    merged = onnx_node(
        "Reshape",
        [("batch", "seq", 12), (2,)],
        out_shapes=[("batch*seq", 12)],
        consts={1: np.array([-1, 12])},
    )
    assert axis_map(merged).outputs[0] == ((Merge(0, (0, 1), ("batch", "seq")),), (Keep(0, 2),))


def test_reshape_with_symbolic_products():
    """torch.export with dynamic dims: MultiheadAttention's (L, N, E) -> (L, N * heads, head_dim)."""
    heads = onnx_node(
        "Reshape", [("s0", "s1", 32), (3,)], out_shapes=[("s0", "4*s1", 8)], consts={1: np.array([0, -1, 8])}
    )
    assert axis_map(heads).outputs[0][1:] == (
        (Split(0, (1, 2), ("4*s1", 8), 0),),
        (Split(0, (1, 2), ("4*s1", 8), 1),),
    )
    back = onnx_node(
        "Reshape", [("s0", "s1", 4, 8), (2,)], out_shapes=[("s0*s1", 32)], consts={1: np.array([-1, 32])}
    )
    assert axis_map(back).outputs[0] == ((Merge(0, (0, 1), ("s0", "s1")),), (Merge(0, (2, 3), (4, 8)),))
    unknown = onnx_node(
        "Reshape", [("s0", 32), (2,)], out_shapes=[("s0//2", 64)], consts={1: np.array([-1, 64])}
    )
    assert axis_map(unknown) is None


def test_flatten_and_transpose():
    flat = onnx_node("Flatten", [(2, 4, 3, 3)], axis=1)
    assert axis_map(flat).outputs[0] == ((Keep(0, 0),), (Merge(0, (1, 2, 3), (4, 3, 3)),))
    assert check_onnx(flat) == 4
    node = onnx_node("Transpose", [(2, 3, 4)], perm=[0, 2, 1])
    assert axis_map(node).outputs[0] == ((Keep(0, 0),), (Keep(0, 2),), (Keep(0, 1),))
    assert check_onnx(node) == 3
    assert axis_map(onnx_node("Transpose", [(2, 3)])).outputs[0] == ((Keep(0, 1),), (Keep(0, 0),))
    squeeze = onnx_node("Unsqueeze", [(2, 3), (2,)], consts={1: np.array([0, -1])})
    assert axis_map(squeeze).outputs[0] == ((New(),), (Keep(0, 0),), (Keep(0, 1),), (New(),))


def test_torch_attention_heads_reshape_and_permute_against_the_calls():
    class Heads(nn.Module):
        def forward(self, x):
            b, t, c = x.shape
            h = x.view(b, t, 2, c // 2).permute(0, 2, 1, 3)
            h = h.softmax(-1).transpose(1, 2).reshape(b, t, c)
            return torch.flatten(h, 1)

    module, x = Heads(), torch.randn(2, 3, 8)
    graph, _ = torch_graph(module, x)
    (view,) = torch_nodes(graph, "view")
    assert axis_map(view).outputs[0][2:] == ((Split(0, (2,), (2, 4), 0),), (Split(0, (2,), (2, 4), 1),))
    assert check_torch_graph(graph, (x,)) >= 12


def test_torch_flatten_and_unflatten_read_size_1_axes_as_reshape_does():
    """One head of width 2: (.., 2) -> (.., 1, 2) and back. The heads axis has size 1 and carries
    no channel: it comes and goes, as in ONNX's Reshape, instead of being a split part (fuzz
    defect #26: torch blocked it as an inner factor, and with it the QKV group it joined)."""

    class OneHead(nn.Module):
        def forward(self, x):
            return x.unflatten(-1, (1, 2)).softmax(-1).flatten(2)

    module, x = OneHead(), torch.randn(2, 3, 2)
    graph, _ = torch_graph(module, x)
    (unflatten,) = torch_nodes(graph, "unflatten")
    (flatten,) = torch_nodes(graph, "flatten")
    reshape = onnx_node("Reshape", [(2, 3, 2), (4,)], consts={1: np.array([2, 3, 1, 2])})
    assert axis_map(unflatten).outputs == axis_map(reshape).outputs
    assert axis_map(unflatten).outputs[0][2:] == ((New(),), (Keep(0, 2),))
    back = onnx_node("Reshape", [(2, 3, 1, 2), (3,)], consts={1: np.array([2, 3, 2])})
    assert (
        axis_map(flatten).outputs
        == axis_map(back).outputs
        == (((Keep(0, 0),), (Keep(0, 1),), (Keep(0, 3),)),)
    )
    assert check_torch_graph(graph, (x,)) >= 3


def test_fx_traced_methods_and_functions_against_the_calls():
    """The fx fallback's graph: tensor methods with variadic sizes, functional leaf modules."""
    from rescompile.frontends.torch import _functionalize_leaf_modules

    class Methods(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.conv = nn.LayerNorm(8), nn.Linear(8, 8), nn.Conv2d(2, 4, 1)

        def forward(self, x):
            h = self.fc(self.ln(x)).view(2, 3, 2, 4).permute(0, 2, 1, 3)
            h = self.conv(h).flatten(2).transpose(1, 2)
            return h.softmax(-1).mean(dim=-1, keepdim=True) + x.reshape(2, 24)[:, :12, None]

    module, x = Methods(), torch.randn(2, 3, 8)
    graph, _ = torch_graph(module, x, fx_trace=True, functionalize=_functionalize_leaf_modules)
    assert {n.attrs["fx_op"] for n in graph} == {"call_function", "call_method"}
    assert check_torch_graph(graph, (x,)) >= 20


# ----- concat, split, slice, gather ---------------------------------------------------------------
def test_concat_offsets_and_split_slices():
    cat = onnx_node("Concat", [(2, 3), (2, 5)], axis=1)
    assert axis_map(cat).outputs[0] == ((Keep(0, 0), Keep(1, 0)), (Offset(0, 1, 0), Offset(1, 1, 3)))
    assert check_onnx(cat) == 4
    split = onnx_node("Split", [(2, 8), (2,)], consts={1: np.array([3, 5])}, num_outputs=2, axis=1)
    assert [out[1] for out in axis_map(split).outputs] == [(Keep(0, 1),), (Slice(0, 1, 3),)]
    assert check_onnx(split) == 4


def test_pad_offsets_and_crops():
    node = onnx_node("Pad", [(2, 5), (4,)], consts={1: np.array([0, 2, 0, 1])})
    assert axis_map(node).outputs[0] == ((Keep(0, 0),), (Offset(0, 1, 2),))
    assert check_onnx(node) == 2
    crop = onnx_node("Pad", [(2, 5), (2,), None, (1,)], consts={1: np.array([-2, 1]), 3: np.array([1])})
    assert axis_map(crop).outputs[0] == ((Keep(0, 0),), (Slice(0, 1, 2),))  # checked on torch's pad below
    assert (
        axis_map(onnx_node("Pad", [(2, 5), (4,)], consts={1: np.array([0, 2, 0, 1])}, mode="reflect")) is None
    )


def test_slice_and_gather():
    node = onnx_node(
        "Slice",
        [(4, 10), (1,), (1,), (1,), (1,)],
        consts={1: np.array([1]), 2: np.array([9]), 3: np.array([1]), 4: np.array([2])},
    )
    assert axis_map(node).outputs[0] == ((Keep(0, 0),), (Slice(0, 1, 1, 2),))
    assert check_onnx(node) == 2
    gather = onnx_node("Gather", [(5, 6), (2, 3)], consts={1: np.array([[0, 4, 1], [2, 2, 3]])}, axis=0)
    amap = axis_map(gather)
    assert amap.outputs[0] == ((Keep(1, 0),), (Keep(1, 1),), (Keep(0, 1),))
    assert amap.mixes == (Lookup(0, 0, 1),)
    assert check_onnx(gather) == 1


def test_torch_splits_selects_and_getitem_against_the_calls():
    class Pieces(nn.Module):
        def forward(self, x):
            a, b = x.split([3, 5], dim=-1)
            c = torch.cat([b, a], dim=-1)[:, 1:, ::2]
            d = F.pad(x.select(1, -1)[:, None, :4], (2, -2))
            return c + x[:, 0, None, 1:5].sum(-1, keepdim=True) + x.narrow(1, 1, 3)[..., 4:] + d

    module, x = Pieces(), torch.randn(2, 4, 8)
    graph, _ = torch_graph(module, x)
    (split,) = torch_nodes(graph, "split_with_sizes") or torch_nodes(graph, "split")
    assert [out[2] for out in axis_map(split).outputs] == [(Keep(0, 2),), (Slice(0, 2, 3),)]
    assert check_torch_graph(graph, (x,)) >= 15


def test_torch_repeat_interleave_groups_each_index_with_its_repeats():
    class Repeat(nn.Module):  # GQA: each key/value head read by two query heads
        def forward(self, x):
            return x.repeat_interleave(2, dim=1) * 2

    module, x = Repeat(), torch.randn(2, 3, 4, 5)
    graph, _ = torch_graph(module, x)
    (node,) = torch_nodes(graph, "repeat_interleave")
    assert axis_map(node).outputs[0][1] == (Group(0, 1, 3),)
    assert check_torch_graph(graph, (x,)) >= 4


# ----- reductions, softmax, embedding -------------------------------------------------------------
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean(keepdims):
    node = onnx_node("ReduceMean", [(2, 3, 4), (1,)], consts={1: np.array([1])}, keepdims=keepdims)
    amap = axis_map(node)
    assert amap.outputs[0] == ((Keep(0, 0),),) + (((New(),),) if keepdims else ()) + ((Keep(0, 2),),)
    assert amap.mixes == (Reduce(0, 1),)
    assert check_onnx(node) == 2


def test_softmax_normalizes_its_axis():
    node = onnx_node("Softmax", [(2, 3, 4)])
    amap = axis_map(node)
    assert amap.mixes == (Normalize(0, 2),) and amap.outputs[0][2] == (Keep(0, 2),)
    assert check_onnx(node) == 2
    assert axis_map(onnx_node("Softmax", [(2, 3, 4)], axis=1)).mixes == (Normalize(0, 1),)


def test_embedding_rows_are_looked_up_and_columns_are_the_last_axis():
    module = nn.Embedding(10, 6)
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    graph, _ = torch_graph(module, ids)
    (embedding,) = torch_nodes(graph, "embedding")
    amap = axis_map(embedding)
    weight, indices = input_roles(embedding).index(Role.WEIGHT), input_roles(embedding).index(Role.INDICES)
    assert amap.outputs[0] == ((Keep(indices, 0),), (Keep(indices, 1),), (Keep(weight, 1),))
    assert amap.mixes == (Lookup(weight, 0, indices),)
    values = torch_values(graph, (ids,))
    arrays = [values[v].detach().numpy() for v in embedding.inputs]
    assert check_against_reality(amap, arrays, torch_runner(embedding)) == 1
    # torch.nn.functional.embedding takes (input, weight), aten.embedding (weight, indices)
    slots = torch_param_slots(F.embedding, (object(), object()), lambda a: type(a) is object)
    assert (slots.weight, slots.weight_out_axis) == (1, 1)
    slots = torch_param_slots(
        torch.ops.aten.embedding.default, (object(), object()), lambda a: type(a) is object
    )
    assert (slots.weight, slots.weight_out_axis) == (0, 1)


def test_einsum_equation():
    node = onnx_node("Einsum", [(2, 3, 4), (2, 4, 5)], equation="bij,bjk->bik")
    amap = axis_map(node)
    assert amap.outputs[0] == ((Keep(0, 0), Keep(1, 0)), (Keep(0, 1),), (Keep(1, 2),))
    assert amap.mixes == (Contract(((0, 2), (1, 1))),)
    assert check_onnx(node) == 4


def test_tiny_transformer_axis_maps_against_the_calls():
    from rescompile.examples import TinyTransformer, example_inputs

    torch.manual_seed(0)
    module = TinyTransformer(layers=1).eval()
    args = example_inputs(seq=8)
    graph, _ = torch_graph(module, *args)
    assert check_torch_graph(graph, args) > 40


# ----- purity -------------------------------------------------------------------------------------
def _torch_node(fx_op, target, args, kwargs=None, module=None, num_inputs=1):
    graph = Graph()
    inputs = [graph.add_input(Value(f"x{k}", shape=(2, 3))) for k in range(num_inputs)]
    attrs = {"fx_op": fx_op, "target": target, "args": args, "kwargs": kwargs or {}}
    if module is not None:
        attrs["module"] = module
    return graph.append(Node(str(target), inputs, domain="torch", attrs=attrs))


def _slot(i):
    from rescompile.ir.ops import InputSlot

    return InputSlot(i)


def test_purity_of_mutating_random_and_training_ops():
    aten = torch.ops.aten
    assert is_pure(_torch_node("call_function", aten.add.Tensor, (_slot(0), _slot(1)), num_inputs=2))
    assert not is_pure(_torch_node("call_function", aten.add_.Tensor, (_slot(0), _slot(1)), num_inputs=2))
    assert not is_pure(_torch_node("call_function", aten.copy_.default, (_slot(0), _slot(1)), num_inputs=2))
    assert not is_pure(_torch_node("call_method", "add_", (_slot(0), 1.0)))
    assert not is_pure(
        _torch_node("call_function", aten.index_put_.default, (_slot(0), [_slot(1)], _slot(2)), num_inputs=3)
    )
    assert not is_pure(_torch_node("call_function", aten.bernoulli.p, (_slot(0), 0.5)))
    assert not is_pure(_torch_node("call_function", aten.dropout.default, (_slot(0), 0.1, True)))
    assert is_pure(_torch_node("call_function", aten.dropout.default, (_slot(0), 0.1, False)))
    assert not is_pure(_torch_node("call_function", F.dropout, (_slot(0),)))  # training defaults to True
    assert is_pure(_torch_node("call_function", F.dropout, (_slot(0),), {"p": 0.1, "training": False}))
    assert not is_pure(_torch_node("call_function", F.relu, (_slot(0),), {"inplace": True}))
    assert not is_pure(_torch_node("call_module", "drop", (_slot(0),), module=nn.Dropout().train()))
    assert is_pure(_torch_node("call_module", "drop", (_slot(0),), module=nn.Dropout().eval()))
    assert not is_pure(_torch_node("call_module", "bn", (_slot(0),), module=nn.BatchNorm1d(3).train()))
    bn_args = (_slot(0), None, None, None, None, True, 0.1, 1e-5, False)
    assert not is_pure(_torch_node("call_function", aten.batch_norm.default, bn_args))
    dropout = onnx_node("Dropout", [(2, 3), (), ()], consts={1: np.array(0.1, np.float32), 2: np.array(True)})
    assert not is_pure(dropout)
    assert is_pure(onnx_node("Dropout", [(2, 3)]))
    assert not is_pure(onnx_node("RandomNormalLike", [(2, 3)]))


def test_opaque_ops_have_no_entry_and_are_impure():
    node = onnx_node("NoSuchOp", [(2, 3)])
    assert op_info(node) is None and axis_map(node) is None and input_roles(node) is None
    assert not is_pure(node)
    custom = _torch_node("call_function", math.hypot, (_slot(0), 1.0))
    assert op_info(custom) is None and not is_pure(custom)
    assert op_info(onnx_node("DepthToSpace", [(1, 8, 2, 2)], blocksize=2)).kind is OpKind.LAYOUT
    assert axis_map(onnx_node("DepthToSpace", [(1, 8, 2, 2)], blocksize=2)) is None  # known op, no axis map
    assert axis_map(onnx_node("Add", [None, (2,)])) is not None


def test_remove_dead_keeps_impure_and_unknown_nodes():
    graph = Graph()
    x = graph.add_input(Value("x", shape=(2, 3)))
    buffer = graph.add_initializer(Value("buf", shape=(2, 3), payload=np.zeros((2, 3)), role=CONST))
    dead = graph.append(Node("Relu", [x], name="dead"))
    unknown = graph.append(Node("MyCustomOp", [x], domain="custom", name="unknown"))
    copy = graph.append(
        Node(
            "copy_",
            [buffer, x],
            domain="torch",
            name="copy",
            attrs={
                "fx_op": "call_function",
                "target": torch.ops.aten.copy_.default,
                "args": (_slot(0), _slot(1)),
                "kwargs": {},
            },
        )
    )
    out = graph.append(Node("Neg", [x], name="out"))
    graph.set_outputs([out.output])
    assert graph.remove_dead() == 1
    assert [n.name for n in graph] == ["unknown", "copy", "out"]
    assert dead.graph is None and unknown.graph is graph and copy.graph is graph
