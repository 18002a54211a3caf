"""prune's refit of conv readers, and its inputs from the pruned model, against plain torch.

- A conv stack whose pruned channels are exact linear combinations of the kept ones: least squares
  gives back the original function (torch and ONNX), through strides, dilations, asymmetric and
  'same' padding (ONNX's auto_pad=SAME_UPPER).
- On a trained-like CNN (ReLU, BatchNorm, a residual 1x1 conv, a classifier behind pooling), each
  reader's calibration error with its inputs from the refit model, computed with F.conv2d, is never
  above that of the kept weights on the same inputs.
- refit=bias after a conv without a bias: a new per-channel bias, the mean over every output
  position (borders included, zero padding as the conv has it) of what the removed channels gave.
- Both frontends give the same weights.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from passes._branch import numpy_of
from passes.prune import PrunePass, _conv_window
from rescompile.frontends.probe import probe
from rescompile.pipeline import compile_model, load
from rescompile.validation import Tolerance, assert_close, run_onnx

EXACT = Tolerance(1e-5, 1e-5)


class ConvStack(torch.nn.Module):
    """Three convs, no nonlinearity between: a channel that is a linear combination of others
    stays one in the next conv's window. (The ReLU after the last keeps its output off the model
    output, where refit=bias could not add a bias.)"""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2), dilation=(1, 2), bias=bias)
        self.conv3 = torch.nn.Conv2d(8, 4, 2, padding="same", bias=bias)

    def forward(self, x):
        return torch.relu(self.conv3(self.conv2(self.conv1(x))))


def redundant_stack() -> ConvStack:
    """Output channels 4..7 of conv1 and conv2 are small linear combinations of channels 0..3 (their
    weights and biases mixed alike), and the next conv reads them weakly, so l2 removes exactly
    them and the kept channels can say everything they said."""
    torch.manual_seed(0)
    model = ConvStack().eval()
    with torch.no_grad():
        for conv, reader in ((model.conv1, model.conv2), (model.conv2, model.conv3)):
            mix = 0.1 * torch.randn(4, 4)
            conv.weight[4:] = torch.einsum("jk,k...->j...", mix, conv.weight[:4])
            conv.bias[4:] = mix @ conv.bias[:4]
            reader.weight[:, 4:] *= 0.3
    return model


def images(count: int = 4, seed: int = 0, channels: int = 3, size: int = 12) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, channels, size, size, generator=gen),) for _ in range(count)]


def onnx_of(model: torch.nn.Module, example: torch.Tensor, path) -> str:
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=18, input_names=["x"])
    return str(path)


def same_upper(path: str) -> str:
    """The model with each Conv's asymmetric pads said as auto_pad=SAME_UPPER (the same padding
    for stride 1: the odd pixel after), so the refit must work the pads out from the input size."""
    model = onnx.load(path)
    for node in model.graph.node:
        pads = next((a for a in node.attribute if a.name == "pads"), None)
        if node.op_type == "Conv" and pads is not None and list(pads.ints[:2]) != list(pads.ints[2:]):
            node.attribute.remove(pads)
            node.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
    onnx.save(model, path)
    return path


def pruned(model, refit: str, calib, frontend: str, tmp_path, spec: str = "prune:ratio=0.5,uniform=true"):
    """The compiled result of `spec,refit=R` in the frontend, and a function of a fresh input."""
    spec = [f"{spec},refit={refit}"]
    if frontend == "torch":
        result = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
        return result, lambda x: result.output(x)
    path = same_upper(onnx_of(model, calib[0][0], tmp_path / f"{refit}.onnx"))
    result = compile_model(path, spec, calibration=[{"x": b.numpy()} for (b,) in calib])

    def run(x):
        (out,) = run_onnx(result.output.SerializeToString(), {"x": x.numpy()}).values()
        return torch.from_numpy(out)

    return result, run


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_least_squares_restores_a_redundant_conv_stack(frontend, tmp_path):
    model, calib = redundant_stack(), images()
    (x,) = images(count=1, seed=5)[0]  # fresh inputs, the calibration's shape
    with torch.no_grad():
        want = model(x)
        _, none = pruned(model, "none", calib, frontend, tmp_path)
        assert (none(x) - want).abs().max() > 1e-3  # pruning alone changes the function
        result, least_squares = pruned(model, "least_squares", calib, frontend, tmp_path)
        assert_close(least_squares(x), want, EXACT)
    stats = result.result.stats["0:prune"]
    assert stats["refit_rounds"] == 2 and "refit_refused" not in stats
    assert "none" not in stats["refit_chosen"]


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_im2col_patches_times_the_weight_are_the_conv(frontend, tmp_path):
    """The window read from each conv node (stride, dilation, asymmetric, 'same' and SAME_UPPER
    padding): its patches times the flattened weight, plus the bias, equal the conv's own output
    as the runtime computes it. (A refit that is exact on redundant channels cannot see a wrong
    window: the same wrong patches feed its inputs and its targets.)"""
    torch.manual_seed(0)
    model, calib = ConvStack().eval(), images(count=1)
    if frontend == "torch":
        graph = load(model, calib[0])
    else:
        graph = load(same_upper(onnx_of(model, calib[0][0], tmp_path / "stack.onnx")))
        calib = [{"x": b.numpy()} for (b,) in calib]
    convs = [n for n in graph if n.op_type.split("::")[-1].split(".")[0] in ("conv2d", "Conv")]
    assert len(convs) == 3
    arrays = next(probe(graph, calib, [v for n in convs for v in (n.inputs[0], n.outputs[0])]))
    for k, node in enumerate(convs):
        x, y = arrays[2 * k], arrays[2 * k + 1]
        w, b = (numpy_of(v.payload).astype(np.float64) for v in node.inputs[1:3])
        window = _conv_window(node, w.shape[2:])
        got = window.patches(x) @ w.reshape(len(w), -1).T + b
        want = np.moveaxis(y, 1, -1).reshape(-1, len(w))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=node.name)


class SmallCnn(torch.nn.Module):
    """The benchmark's kinds of reader: 3x3 convs (one with stride 2), the 1x1 conv closing a
    residual bottleneck, a linear classifier behind global average pooling."""

    def __init__(self, norm: bool = True):
        super().__init__()

        def conv(cin, cout, k, stride=1):
            layers = [torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=not norm)]
            return torch.nn.Sequential(*layers, *([torch.nn.BatchNorm2d(cout)] if norm else []))

        self.stem, self.down = conv(3, 8, 3), conv(8, 12, 3, stride=2)
        self.widen, self.back = conv(12, 16, 3), conv(16, 12, 1)
        self.head = conv(12, 16, 1)
        self.classifier = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.down(torch.relu(self.stem(x))))
        x = torch.relu(x + self.back(torch.relu(self.widen(x))))
        return self.classifier(torch.relu(self.head(x)).mean(dim=(2, 3)))


def small_cnn(norm: bool = True) -> SmallCnn:
    torch.manual_seed(0)
    model = SmallCnn(norm)
    if norm:  # statistics as after training, so that BatchNorm is not the identity
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def reader_output(module, reader, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reader's output without its bias, from the module's own layer (F.conv2d or a matmul)."""
    layer = module.get_submodule(reader.weight.value.name.removesuffix(".weight"))
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return x @ weight.T


def test_refit_never_increases_a_conv_readers_calibration_error():
    """Per reader: ||f(X, W) + b - (f(Z, W') + b')||^2 over the calibration batches, X its input in
    the original model, Z in the refit model, W', b' the refit model's; compared with the kept
    weights W_K, b_K on the same Z (what the reader does before its refit)."""
    model, calib = small_cnn(), images(count=4, size=16)
    graph = load(model, calib[0])
    pass_ = PrunePass(ratio=0.4)
    pass_.calibration = calib
    plan = pass_.plan(graph)
    found = plan.pruned_readers()
    assert {r.weight.value.name for r, _ in found} >= {"down.0.weight", "back.0.weight", "classifier.weight"}
    original = list(probe(graph, calib, [r.data.value for r, _ in found]))
    cut = plan.removed_slices()
    params = {v.name: torch.from_numpy(numpy_of(v.payload)).double() for v in graph.initializers.values()}
    totals = {}
    for refit in ("none", "bias", "least_squares"):
        spec = [f"prune:ratio=0.4,refit={refit}"]
        result = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
        assert "refit_refused" not in result.result.stats["0:prune"]
        new = {
            v.name: torch.from_numpy(numpy_of(v.payload)).double() for v in result.graph.initializers.values()
        }
        values = {out.name: out for node in result.graph for out in node.outputs}
        inputs = list(probe(result.graph, calib, [values[r.data.value.name] for r, _ in found]))
        totals[refit] = 0.0
        for k, (reader, gone) in enumerate(found):
            name = reader.weight.value.name
            bias = name.removesuffix("weight") + "bias"
            kept = [i for i, u in enumerate(reader.data.units) if u not in gone]
            outputs = sorted(set(range(len(params[name]))) - set(cut.get(reader.weight.value, {}).get(0, ())))
            w, b = params[name], params.get(bias, torch.zeros(len(params[name]), dtype=torch.float64))
            thetas = {"refit": (new[name], new.get(bias, 0.0)), "kept": (w[outputs][:, kept], b[outputs])}
            errors = dict.fromkeys(thetas, 0.0)
            for before, after in zip(original, inputs):
                x, z = torch.from_numpy(before[k]).double(), torch.from_numpy(after[k]).double()
                want = (reader_output(model, reader, w, x) + _channel(b, x.ndim))[:, outputs]
                for key, (weight, shift) in thetas.items():
                    got = reader_output(model, reader, weight, z) + _channel(torch.as_tensor(shift), z.ndim)
                    errors[key] += float(((want - got) ** 2).sum())
            assert errors["refit"] <= errors["kept"] * (1 + 1e-9), (refit, name, errors)
            totals[refit] += errors["refit"]
    assert totals["least_squares"] < 0.9 * totals["none"], totals


def _channel(bias: torch.Tensor, ndim: int) -> torch.Tensor:
    return bias.reshape(-1, 1, 1) if ndim == 4 and bias.ndim else bias


def test_bias_refit_adds_a_per_channel_bias_after_a_conv():
    """FLAP's compensation on a conv without a bias: conv3 reads conv2's channels; the new bias is
    the mean over every output position (the zero-padded borders included) of F.conv2d of the
    removed channels alone."""
    torch.manual_seed(0)
    model, calib = ConvStack(bias=False).eval(), images()
    spec = ["prune:ratio=0.5,uniform=true,target=channels,refit=bias"]
    graph = load(model, calib[0])
    plan = PrunePass(ratio=0.5, uniform=True).plan(graph)
    cut = {v.name: axes for v, axes in plan.removed_slices().items() if v.is_initializer}
    gone1, gone2 = cut["conv1.weight"][0], cut["conv2.weight"][0]
    result = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
    assert result.result.stats["0:prune"]["refit_chosen"] == {"bias": 2}
    keep1 = [c for c in range(8) if c not in gone1]
    keep2 = [c for c in range(8) if c not in gone2]
    w2, w3 = model.conv2.weight.double(), model.conv3.weight.double()

    def conv2(x, w):
        return F.conv2d(x, w, None, 2, (1, 2), (1, 2))

    def conv3(x, w):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), w)  # 'same' with a 2x2 kernel pads after

    with torch.no_grad():
        h1 = torch.cat([model.conv1(x) for (x,) in calib]).double()
        shift2 = conv2(h1[:, gone1], w2[:, gone1]).mean(dim=(0, 2, 3))
        h2 = conv2(h1[:, keep1], w2[:, keep1])[:, keep2] + shift2[keep2, None, None]
        original = conv2(h1, w2)
        shift3 = (conv3(original, w3) - conv3(h2, w3[:, keep2])).mean(dim=(0, 2, 3))
        (x,) = images(count=1, seed=5)[0]
        h = model.conv1(x).double()
        h = conv2(h[:, keep1], w2[:, keep1])[:, keep2] + shift2[keep2, None, None]
        want = torch.relu(conv3(h, w3[:, keep2]) + shift3[:, None, None])
        assert_close(result.output(x).double(), want, Tolerance(1e-5, 1e-5))
    # with the input of conv3 unpruned upstream, its shift would be FLAP's mean(x_R) W_R
    flap = conv3(original[:, gone2], w3[:, gone2]).mean(dim=(0, 2, 3))
    assert not torch.allclose(flap, shift3, atol=1e-4)


def test_both_frontends_refit_convs_alike(tmp_path):
    """No BatchNorm: an ONNX export folds it into the convs, and the weights would differ."""
    model, calib = small_cnn(norm=False), images(count=4, size=16)
    spec = ["prune:ratio=0.4,refit=least_squares"]
    a = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
    path = onnx_of(model, calib[0][0], tmp_path / "cnn.onnx")
    b = compile_model(path, spec, calibration=[{"x": t.numpy()} for (t,) in calib])
    stats = a.result.stats["0:prune"], b.result.stats["0:prune"]
    assert stats[0]["refit_chosen"] == stats[1]["refit_chosen"]
    assert "none" not in stats[0]["refit_chosen"] and "refit_refused" not in stats[0]
    onnx_weights = {v.name: v for v in b.graph.initializers.values()}
    names = ("down.0.weight", "down.0.bias", "back.0.weight", "back.0.bias", "classifier.weight")
    for name in names:
        mine = numpy_of(a.graph.initializers[name].payload)
        np.testing.assert_allclose(mine, numpy_of(onnx_weights[name].payload), rtol=1e-3, atol=1e-5)
    original = model.state_dict()["down.0.weight"].numpy()
    assert numpy_of(a.graph.initializers["down.0.weight"].payload).shape[1] < original.shape[1]
    onnx.checker.check_model(b.output)


def test_refit_leaves_grad_mode_as_it_was():
    """The refit runs the original and the pruned module side by side on each batch; torch.no_grad
    held across the probe's yields restored grad mode in the wrong order and left it off, so the
    user's next backward failed (a fuzz finding: 'element 0 of tensors does not require grad')."""
    model, calib = small_cnn(), images(count=4, size=16)
    assert torch.is_grad_enabled()
    result = compile_model(
        model, ["prune:ratio=0.4,refit=least_squares"], example_inputs=calib[0], calibration=calib
    )
    assert torch.is_grad_enabled()
    loss = result.output(*calib[0]).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in result.output.parameters())


def test_near_equal_held_out_errors_choose_the_simplest_refit():
    """Errors equal up to float noise (ONNX Runtime and torch sum differently) choose alike: the
    simplest within 1e-4 of the best, or within 1e-10 of ||Y||^2 (no refit, then bias, then the
    strongest ridge); a clear win still wins, an exact fit too."""
    from passes.prune import _simplest_within_noise

    assert _simplest_within_noise({"none": 1.0, "ridge 0.3": 1.0 - 1e-7, "ridge 1e-06": 2.0}, 5.0) == "none"
    assert (
        _simplest_within_noise({"none": 1.0, "ridge 0.3": 1.0 - 1e-7, "ridge 30": 1.0 - 2e-7}, 5.0) == "none"
    )
    assert _simplest_within_noise({"none": 1.0, "ridge 0.3": 0.5, "ridge 30": 0.5 + 1e-6}, 5.0) == "ridge 30"
    assert _simplest_within_noise({"none": 1.0, "bias": 0.9, "ridge 0.3": 0.5}, 5.0) == "ridge 0.3"
    assert (
        _simplest_within_noise({"none": 1e-3, "ridge 1e-06": 1e-17, "ridge 30": 1e-5}, 5.0) == "ridge 1e-06"
    )
    # The fuzz finding (one pre-norm GLU, its pruned unit silent on the calibration rows): every
    # error is 0 up to rounding, and the two frontends' minima were ridge 1 (ORT), ridge 10 (torch).
    ort = {
        "none": 1.1e-16,
        "ridge 1e-06": -5.6e-17,
        "ridge 1": -5.6e-17,
        "ridge 10": 1.7e-16,
        "ridge 30": 1.7e-16,
    }
    eager = {
        "none": 5.4e-15,
        "ridge 1e-06": 7.8e-15,
        "ridge 1": 6.7e-15,
        "ridge 10": 5.2e-15,
        "ridge 30": 5.4e-15,
    }
    assert _simplest_within_noise(ort, 1.1127) == _simplest_within_noise(eager, 1.1127) == "none"


class SilentUnitGLU(torch.nn.Module):
    """x + W2 (relu(G LN x) * U LN x) with unit 0's gate and up rows zero: it gives 0 on every row,
    so prune removes it and every refit's error is 0 up to rounding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.down = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
        self.gate, self.up = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        with torch.no_grad():
            for linear in (self.gate, self.up):
                linear.weight[0] = 0.0
                linear.bias[0] = 0.0

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.relu(self.gate(h)) * self.up(h))


def test_a_silent_unit_is_pruned_without_a_refit_in_both_frontends(tmp_path):
    model, spec = SilentUnitGLU().eval(), ["prune:ratio=0.25,refit=least_squares"]
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 3, 4, generator=gen),) for _ in range(4)]
    a = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
    path = tmp_path / "glu.onnx"
    with torch.no_grad():
        torch.onnx.export(model, calib[0], str(path), dynamo=False, opset_version=18, input_names=["x"])
    b = compile_model(str(path), spec, calibration=[{"x": t.numpy()} for (t,) in calib])
    for result in (a, b):
        assert result.result.stats["0:prune"]["refit_chosen"] == {"none": 1}
    (x,) = calib[0]
    assert_close(a.output(x), model(x).detach(), EXACT)  # the unit said nothing: same function
