"""macaron: exact at the start, and with FFN_a switched on it is a hand-written Macaron layer."""

from __future__ import annotations

import copy

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
    case = build("gpt2")
    with torch.no_grad():
        want = _hidden(case.module(**case.kwargs)).clone()
    return case, rescompile.apply(case.module, ["macaron"], example_kwargs=case.kwargs), want


def test_macaron_keeps_the_function(gpt2):
    case, out, want = gpt2
    with torch.no_grad():
        assert_close(_hidden(out(**case.kwargs)), want)
        assert_close(_hidden(case.module(**case.kwargs)), want)  # the original is untouched


def test_ffn_a_with_weights_is_a_half_step_before_the_attention(gpt2):
    """Give FFN_a the MLP's own output layer: each layer then is x + 1/2 M(N2 x), then the
    original layer (whose 1/2 FFN_b equals M), computed here with the original HF modules."""
    case, out, _ = gpt2
    out = copy.deepcopy(out)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for i, block in enumerate(case.module.h):
            params[f"macaron_h.{i}.mlp.c_proj.weight"].copy_(block.mlp.c_proj.weight)
            params[f"macaron_h.{i}.mlp.c_proj.bias"].copy_(block.mlp.c_proj.bias)
    reference = copy.deepcopy(case.module)

    def half_ffn_first(block, args, kwargs):
        x = args[0]
        return (x + 0.5 * block.mlp(block.ln_2(x)), *args[1:]), kwargs

    for block in reference.h:
        block.register_forward_pre_hook(half_ffn_first, with_kwargs=True)
    with torch.no_grad():
        want = _hidden(reference(**case.kwargs))
        assert_close(_hidden(out(**case.kwargs)), want)
        assert not torch.allclose(want, _hidden(case.module(**case.kwargs)), atol=1e-3)


def test_new_ffn_gets_gradients_and_the_model_trains(gpt2):
    case, out, _ = gpt2
    out = copy.deepcopy(out).train()
    ffn_a = {k: p for k, p in out.named_parameters() if k.startswith("macaron_")}
    assert len(ffn_a) == 12  # ln, c_fc, c_proj (weight and bias) in 2 layers
    target = torch.randn_like(_hidden(out(**case.kwargs)))
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(_hidden(out(**case.kwargs)), target)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in ffn_a.values())
            assert all(ffn_a[f"macaron_h.{i}.mlp.c_proj.weight"].grad.abs().sum() > 0 for i in (0, 1))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_macaron_on_onnx_runs_in_ort_and_keeps_the_function(tmp_path):
    result = rescompile.pipeline.compile_model(
        str(cached_onnx("gpt2")), ["macaron"], output=tmp_path / "m.onnx", validate=True
    )
    assert result.result.stats["0:macaron"]["layers"] == 2
    assert result.validation.ok


def test_post_norm_layers_are_refused_with_a_reason():
    with pytest.raises(RescompileError, match=r"macaron: .*site .*pre-norm"):
        rescompile.apply(str(cached_onnx("bert")), ["macaron"])
