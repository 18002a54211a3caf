"""dense (DenseFormer DWA): identity init keeps the function; uniform weights equal a
hand-written running mean; dilation and period pick the documented terms."""

import pytest
import torch

import rescompile
from rescompile.api import build_passes, run_passes
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.validation import assert_close
from tools.models import ResidualMLP, build


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "preact_cnn"])
@pytest.mark.parametrize("spec", ["dense", "dense:dilation=2", "dense:period=2,block_size=1"])
def test_preserves_function_both_frontends(assert_preserves, name, spec):
    assert_preserves(name, spec)


def alphas(module):
    return {k: p for k, p in module.named_parameters() if k.startswith("rescompile.dense.")}


def test_uniform_weights_equal_a_running_mean():
    torch.manual_seed(0)
    base, x = ResidualMLP(blocks=4).eval(), torch.randn(2, 5, 16)
    module = rescompile.apply(base, ["dense:block_size=1"], (x,))
    with torch.no_grad():
        for name, p in alphas(module).items():
            block = int(name.split(".block")[1].split(".")[0])
            p.fill_(1.0 / (block + 2))  # mean over X_0 .. X_{i+1}
        outs = [x]
        h = x
        for norm, fc1, fc2 in zip(base.norms, base.fc1, base.fc2):
            outs.append(h + fc2(torch.relu(fc1(norm(h)))))  # raw block output
            h = torch.stack(outs).mean(0)  # the depth-weighted average
        want = base.head(h)
        got = module(x)
    assert not torch.allclose(got, base(x), atol=1e-3)
    assert_close(got, want)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("dense:block_size=1", {0: [0, 1], 1: [0, 1, 2], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3, 4]}),
        ("dense:block_size=1,dilation=2", {0: [1], 1: [0, 2], 2: [1, 3], 3: [0, 2, 4]}),
        ("dense:block_size=1,period=2", {1: [0, 1, 2], 3: [0, 1, 2, 3, 4]}),
    ],
)
def test_dilation_and_period_pick_terms(spec, expected):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    module = rescompile.apply(ResidualMLP(blocks=4).eval(), [spec], (x,))
    found: dict[int, list[int]] = {}
    for name in alphas(module):
        block, term = name.split(".block")[1].split(".alpha")
        found.setdefault(int(block), []).append(int(term))
    assert {b: sorted(t) for b, t in found.items()} == expected


def test_refusals():
    case = build("bert")
    with pytest.raises(rescompile.RescompileError, match="dense: site .* reads the stream through"):
        rescompile.apply(case.module, ["dense"], case.kwargs)
    with pytest.raises(rescompile.RescompileError, match="not a multiple of block_size=2"):
        rescompile.apply(ResidualMLP(blocks=3).eval(), ["dense"], (torch.randn(2, 5, 16),))


@pytest.mark.parametrize("spec", ["hyper:n=2,dynamic=true", "frac:m=2,dynamic=true", "dense:block_size=1"])
def test_stream_passes_check_in_onnx_and_train_in_torch(onnx_model, tmp_path, spec):
    import onnx

    graph = load_onnx(onnx_model("gpt2"))
    run_passes(graph, build_passes([spec.replace(",block_size=1", "")]))
    save_onnx(graph, tmp_path / "s.onnx")
    onnx.checker.check_model(str(tmp_path / "s.onnx"), full_check=True)
    torch.manual_seed(0)
    x, target = torch.randn(8, 5, 16), torch.randn(8, 5, 4)
    module = rescompile.apply(ResidualMLP().eval(), [spec], (x[:2],)).train()
    new = {k: p for k, p in module.named_parameters() if k.startswith("rescompile.")}
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(module(x), target)  # another batch size than captured
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in new.values())
        opt.step()
        losses.append(loss.item())
    assert new and losses[-1] < 0.9 * losses[0]
