"""loop: exact at the start; with scales 1 it is the original blocks called again (by hand)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.validation import assert_close
from tools.models import build, cached_onnx


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


def test_exact_start_keeps_the_function(gpt2):
    out = rescompile.apply(gpt2.module, ["loop:n=3"], example_kwargs=gpt2.kwargs)
    with torch.no_grad():
        assert_close(_hidden(out(**gpt2.kwargs)), _hidden(gpt2.module(**gpt2.kwargs)))
    scales = {k: p.item() for k, p in out.named_parameters() if k.startswith("rescompile.loop.")}
    assert sorted(scales.values()) == [0.0, 0.0, 1.0]


def _called_again(model, layers: list[int]):
    """A copy of the HF model whose forward runs its blocks `layers` in that order."""
    reference = copy.deepcopy(model)
    reference.h = torch.nn.ModuleList([reference.h[i] for i in layers])
    return reference


@pytest.mark.parametrize(
    "spec,layers",
    [("loop:init=1", [0, 1, 0, 1]), ("loop:sites=depth:2-3,n=3,init=1", [0, 1, 1, 1])],
)
def test_scale_one_equals_calling_the_blocks_again_and_trains(gpt2, spec, layers):
    out = rescompile.apply(gpt2.module, [spec], example_kwargs=gpt2.kwargs)
    with torch.no_grad():
        want = _hidden(_called_again(gpt2.module, layers)(**gpt2.kwargs))
        assert_close(_hidden(out(**gpt2.kwargs)), want)
        assert not torch.allclose(want, _hidden(gpt2.module(**gpt2.kwargs)), atol=1e-3)
    out.train()
    scales = [p for k, p in out.named_parameters() if k.startswith("rescompile.loop.")]
    target = torch.randn_like(want)
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(_hidden(out(**gpt2.kwargs)), target)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(s.grad is not None and s.grad.abs() > 0 for s in scales)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_loop_on_onnx_runs_in_ort_and_keeps_the_function(tmp_path):
    result = rescompile.pipeline.compile_model(
        str(cached_onnx("gpt2")), ["loop:n=3"], output=tmp_path / "l.onnx", validate=True
    )
    assert result.result.stats["0:loop"] == {"blocks": 2, "loops": 3}
    assert result.validation.ok


@pytest.mark.parametrize(
    "spec,reason",
    [
        ("loop:sites=stream:1", r"site \S+: the run maps shape .* to .*same shape"),
        ("loop:sites=kind:identity", r"selects blocks of streams \[0, 1\]"),
        ("loop:n=1", "n must be at least 2"),
    ],
)
def test_refusals_name_the_site_and_reason(spec, reason):
    with pytest.raises(RescompileError, match=reason):
        rescompile.apply(str(cached_onnx("residual_cnn")), [spec])


class _PostNormThenScale(torch.nn.Module):
    """One post-norm MLP block (x + mlp(x), then RMSNorm) and a scaling of the stream after it."""

    def __init__(self, d: int, scale: float | None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(d, d, generator=gen) / d**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(d, d, generator=gen) / d**0.5)
        self.gain = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=gen))
        self.scale = scale

    def block(self, x):
        out = x + torch.tanh(x @ self.w1.T) @ self.w2.T
        return torch.nn.functional.rms_norm(out, (out.shape[-1],), self.gain, eps=1e-6)

    def forward(self, x):
        y = self.block(x)
        return y if self.scale is None else y * self.scale


def _written_out_onnx(module: _PostNormThenScale):
    """The same model in ONNX with the RMSNorm written out (Mul, ReduceMean, Add, Sqrt, Div, gain)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.asarray(array).dtype), name)

    d = module.gain.shape[0]
    inits = [
        const("w1t", module.w1.detach().numpy().T.copy()),
        const("w2t", module.w2.detach().numpy().T.copy()),
        const("gain", module.gain.detach().numpy()),
        const("axes", np.array([-1], dtype=np.int64)),
        const("eps", np.float32(1e-6)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1t"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2t"], ["m"]),
        helper.make_node("Add", ["m", "x"], ["r"]),
        helper.make_node("Mul", ["r", "r"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["r", "rms"], ["normed"]),
        helper.make_node("Mul", ["normed", "gain"], ["y"]),
    ]
    last = "y"
    if module.scale is not None:
        inits.append(const("c", np.float32(module.scale)))
        nodes.append(helper.make_node("Mul", ["y", "c"], ["z"]))
        last = "z"
    nodes.append(helper.make_node("Identity", [last], ["out"]))
    graph = helper.make_graph(
        nodes,
        "post_norm_then_scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, d])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("scale", [0.5, None])
def test_post_norm_block_ends_after_its_norm_in_both_frontends(scale):
    """Fuzz finding (loop:init=0.5 parity): ONNX's written-out RMSNorm took the scaling after the
    block (a second multiply by a scalar) for part of its affine, so the ONNX loop scaled the
    stream on every loop and torch's once. Both must compute the hand-written Loop-Residual."""
    from rescompile.validation import run_onnx

    module = _PostNormThenScale(4, scale)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x1 = module.block(x)
        x2 = x1 + 0.5 * (module.block(x1) - x1)
        want = x2 if scale is None else x2 * scale
        got_torch = rescompile.apply(module, ["loop:init=0.5"], example_inputs=(x,))(x)
    assert_close(got_torch, want)
    onnx_model = rescompile.apply(_written_out_onnx(module), ["loop:init=0.5"])
    got_onnx = run_onnx(onnx_model.SerializeToString(), {"x": x.numpy()})
    assert_close(torch.from_numpy(next(iter(got_onnx.values()))), want)
