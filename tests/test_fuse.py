"""fuse: equals the unfused model (norm gains and shifts randomised so folding them matters)."""

from __future__ import annotations

import pytest
import torch

import rescompile
from rescompile.validation import assert_close
from tests.test_parallel import neox
from tools.models import build, export_onnx


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _randomised(name: str):
    """A test model whose norm gains and shifts and linear biases are not 1 and 0."""
    case = build(name)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in case.module.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return case


@pytest.mark.parametrize(
    "name,folded,fused",
    [("gpt2", 4, 0), ("llama", 4, 10), ("bert", 0, 6), ("vit", 4, 6)],
)
def test_fuse_keeps_the_function_in_torch(name, folded, fused):
    case = _randomised(name)
    result = rescompile.pipeline.compile_model(case.module, ["fuse"], example_kwargs=case.kwargs)
    stats = result.result.stats["0:fuse"]
    assert (stats["norms_folded"], stats["linears_fused"]) == (folded, fused)
    with torch.no_grad():
        assert_close(_hidden(result.output(**case.kwargs)), _hidden(case.module(**case.kwargs)))


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_fuse_keeps_the_function_in_onnx(tmp_path, name):
    source = export_onnx(_randomised(name), tmp_path / "in.onnx")
    result = rescompile.pipeline.compile_model(
        str(source), ["fuse"], output=tmp_path / "f.onnx", validate=True
    )
    stats = result.result.stats["0:fuse"]
    assert stats["norms_folded"] == 4 and stats["linears_fused"] >= 6
    assert result.validation.ok


def test_after_shared_norm_parallel_the_two_input_projections_become_one():
    model = neox(parallel=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    ids = {"input_ids": torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))}
    parallel = rescompile.apply(model, ["parallel:shared_norm=true"], example_kwargs=ids)
    result = rescompile.pipeline.compile_model(
        model, ["parallel:shared_norm=true", "fuse"], example_kwargs=ids
    )
    assert result.result.stats["1:fuse"]["linears_fused"] == 4  # QKV + MLP input, in each of 2 layers
    fused = result.output
    with torch.no_grad():
        assert_close(_hidden(fused(**ids)), _hidden(parallel(**ids)))
    fused.train()
    target = torch.randn_like(_hidden(fused(**ids)))
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(_hidden(fused(**ids)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_options_switch_each_rewrite_off_and_nothing_to_do_is_reported():
    case = _randomised("llama")
    only_fold = rescompile.pipeline.compile_model(
        case.module, ["fuse:inputs=false"], example_kwargs=case.kwargs
    )
    assert only_fold.result.stats["0:fuse"]["linears_fused"] == 0
    assert only_fold.result.stats["0:fuse"]["norms_folded"] == 4
    plain = build("residual_mlp")
    nothing = rescompile.pipeline.compile_model(plain.module, ["fuse:norms=false"], example_inputs=plain.args)
    assert not nothing.result.modified
