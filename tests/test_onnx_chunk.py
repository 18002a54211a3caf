"""A GLU whose gate and up come from one linear split with `chunk`, exported by the legacy ONNX
exporter: each half is a Slice whose bounds the graph computes from the tensor's shape
(Shape -> Gather -> Add -> Div -> Mul). With static sizes those bounds are known ints, so the
hidden units prune as they do from torch (aten.chunk); with a symbolic size they stay unknown."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import rescompile
from passes.prune import PrunePass
from rescompile.ir.ops import axis_map, call_of
from rescompile.ir.shapes import static_ints
from rescompile.pipeline import load
from rescompile.validation import Tolerance, assert_close, run_onnx

HIDDEN = 4
QUIET = 2  # the unit whose gate and up rows are scaled down, so that l2 removes it
EXACT = Tolerance(1e-5, 0.0)


class ChunkGLU(torch.nn.Module):
    def __init__(self, width: int = 4, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.gu = torch.nn.Linear(width, 2 * hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        g, u = self.gu(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(torch.relu(g) * u)


def glu() -> ChunkGLU:
    torch.manual_seed(0)
    module = ChunkGLU().eval()
    with torch.no_grad():
        module.norm.weight.normal_(1, 0.1)
        module.norm.bias.normal_(0, 0.1)
        rows = [QUIET, HIDDEN + QUIET]
        module.gu.weight[rows] *= 0.3
        module.gu.bias[rows] = torch.tensor([0.4, 0.5])  # relu(g) * u stays well away from 0
    return module


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))


def export(module: torch.nn.Module, path, dynamic_axes: dict | None = None) -> str:
    torch.onnx.export(
        module,
        (inputs(),),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=dynamic_axes,
    )
    return str(path)


def removed_units(graph) -> list[int]:
    """The hidden units the plan removes, read from what it cuts of the split linear's bias
    (named gu.bias in both frontends): gate k and up k are columns k and HIDDEN + k."""
    plan = PrunePass(ratio=0.25).plan(graph)
    cut = {v.name: axes for v, axes in plan.removed_slices().items() if v.is_initializer}
    columns = cut["gu.bias"][0]
    units = [c for c in columns if c < HIDDEN]
    assert sorted(columns) == sorted(units + [HIDDEN + k for k in units])  # a unit's gate and up go together
    return units


def zeroed(module: ChunkGLU, units: list[int]) -> ChunkGLU:
    """The module with the units' gate and up rows (weights and biases) zeroed: relu(0) * 0 = 0,
    so those units add nothing, as once they are pruned."""
    out = copy.deepcopy(module)
    rows = units + [HIDDEN + k for k in units]
    with torch.no_grad():
        out.gu.weight[rows] = 0
        out.gu.bias[rows] = 0
    return out


def slices(graph) -> list:
    return [n for n in graph if n.op_type == "Slice"]


def test_slice_bounds_computed_from_a_static_shape_are_known(tmp_path):
    graph = load(export(glu(), tmp_path / "glu.onnx"))
    first, second = slices(graph)
    assert first.inputs[2].producer is not None and first.inputs[2].producer.op_type == "Mul"  # computed
    assert call_of(second).ints("starts") == [HIDDEN]  # (8 + 1) // 2 * 1
    assert call_of(second).ints("ends") == [2 * HIDDEN]
    assert static_ints(second.inputs[1]) == [HIDDEN]
    assert axis_map(second) is not None and axis_map(first) is not None
    assert [out.shape for s in (first, second) for out in s.outputs] == [(2, 3, HIDDEN)] * 2


def test_slice_bounds_of_a_symbolic_size_stay_unknown(tmp_path):
    class Halves(torch.nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return a * b

    graph = load(export(Halves(), tmp_path / "halves.onnx", {"x": {1: "t"}}))
    for node in slices(graph):
        call = call_of(node)
        assert call.ints("ends") is None  # (t + 1) // 2: never guessed
        assert static_ints(node.inputs[2]) is None
    assert axis_map(slices(graph)[1]) is None  # its start is unknown too


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
def test_pruned_onnx_equals_the_zeroed_original(tmp_path, dynamic):
    module = glu()
    path = export(module, tmp_path / "glu.onnx", {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
    units = removed_units(load(path))
    assert units == [QUIET]
    pruned = rescompile.apply(path, ["prune:ratio=0.25"])
    onnx.checker.check_model(pruned, full_check=True)
    widths = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert widths["gu.bias"] == [2 * (HIDDEN - 1)]
    # the replaced bounds' Shape -> Gather -> Add -> Div -> Mul chains are gone, not left unread
    assert not [n.op_type for n in pruned.graph.node if n.op_type in ("Shape", "Gather", "Div")]
    x = inputs()
    got = run_onnx(pruned.SerializeToString(), {"x": x.numpy()})["y"]
    with torch.no_grad():
        want, original = zeroed(module, units)(x), module(x)
    assert_close(got, want, EXACT)
    assert (want - original).abs().max() > 1e-3  # the zeroed unit mattered: the check can fail
    if dynamic:  # another batch size runs too: no size was frozen into a constant
        x5 = torch.randn(5, 3, 4)
        got5 = run_onnx(pruned.SerializeToString(), {"x": x5.numpy()})["y"]
        with torch.no_grad():
            assert_close(got5, zeroed(module, units)(x5), EXACT)


def test_both_frontends_remove_the_same_units(tmp_path):
    module = glu()
    from_onnx = removed_units(load(export(module, tmp_path / "glu.onnx")))
    from_torch = removed_units(load(module, (inputs(),), dynamic=False))
    assert from_onnx == from_torch == [QUIET]


def test_pruned_onnx_slices_read_the_new_halves(tmp_path):
    """Independent of the op table: after pruning, each Slice's output is half of the narrowed
    linear's output, gate first, read off the saved model by ONNX Runtime."""
    pruned = rescompile.apply(export(glu(), tmp_path / "glu.onnx"), ["prune:ratio=0.25"])
    graph = pruned.graph
    slice_outs = [n.output[0] for n in graph.node if n.op_type == "Slice"]
    split_in = next(n.input[0] for n in graph.node if n.op_type == "Slice")
    for name in [*slice_outs, split_in]:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = run_onnx(pruned.SerializeToString(), {"x": inputs().numpy()})
    whole = out[split_in]
    assert whole.shape[-1] == 2 * (HIDDEN - 1)
    np.testing.assert_array_equal(out[slice_outs[0]], whole[..., : HIDDEN - 1])
    np.testing.assert_array_equal(out[slice_outs[1]], whole[..., HIDDEN - 1 :])
