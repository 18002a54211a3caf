"""loop: exact at the start; with scales 1 it is the original blocks called again (by hand)."""

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
