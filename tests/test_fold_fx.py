"""`fold` on a batch-norm CNN captured through the torch.fx fallback.

The fx fallback calls `F.batch_norm(input, running_mean, running_var, weight, bias, ...)`, whose argument
order is not aten's `batch_norm(input, weight, bias, running_mean, running_var, ...)`; folding a gate
must scale the affine weight and bias, never the running statistics.
"""

import pytest
import torch
from torch import nn

from rescompile.api import build_passes, run_passes
from rescompile.frontends.torch import export_module, import_module


class BatchNormCNN(nn.Module):
    """Two residual blocks whose branches end in BatchNorm2d: `x + bn(conv(relu(bn(conv(x)))))`."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            for _ in range(2)
        )

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def _trained_cnn() -> BatchNormCNN:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    torch.manual_seed(0)
    model = BatchNormCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6) * 2 + 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _capture_with_fx(model, x, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.export disabled to test the fx fallback")

    monkeypatch.setattr(torch.export, "export", refuse)
    graph = import_module(model, (x,))
    assert graph.source.method == "torch.fx"
    return graph


def test_fold_through_fx_fallback_scales_batch_norm_affine_not_running_stats(monkeypatch):
    model = _trained_cnn()
    x = torch.randn(2, 3, 6, 6)
    graph = _capture_with_fx(model, x, monkeypatch)
    result = run_passes(graph, build_passes(["layerscale:init=0.5", "fold"]))
    assert result.stats["1:fold"]["folded"] == 2
    folded = export_module(graph).eval()

    with torch.no_grad():
        expected = model.stem(x)
        for block in model.blocks:
            expected = expected + 0.5 * block(expected)
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=0)

    original = dict(model.named_buffers()) | dict(model.named_parameters())
    rewritten = dict(folded.named_buffers()) | dict(folded.named_parameters())
    for block in ("blocks.0.4", "blocks.1.4"):
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(
                rewritten[f"{block}.{stat}"], original[f"{block}.{stat}"], atol=0, rtol=0
            )
        for affine in ("weight", "bias"):
            torch.testing.assert_close(rewritten[f"{block}.{affine}"], 0.5 * original[f"{block}.{affine}"])


class HalfScaledBranch(nn.Module):
    """`x + (tanh(lin(x)) * 0.5) * gamma` with a per-channel gamma: the branch's last multiply is
    by a Python number, which cannot hold gamma (the ONNX form holds 0.5 as a constant)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, width))

    def forward(self, x):
        return x + (torch.tanh(self.lin(x)) * 0.5) * self.gamma


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_fold_scales_a_number_multiply_by_a_per_channel_factor(capture, monkeypatch):
    torch.manual_seed(0)
    model = HalfScaledBranch().eval()
    x = torch.randn(2, 3, 6)
    graph = _capture_with_fx(model, x, monkeypatch) if capture == "fx" else import_module(model, (x,))
    result = run_passes(graph, build_passes(["fold"]))
    assert result.stats["0:fold"]["folded"] == 1  # gamma; then the vector is refused (tanh)
    assert len(result.stats["0:fold"]["refused"]) == 1
    folded = export_module(graph)
    assert "gamma" not in dict(folded.named_parameters())
    with torch.no_grad():
        want = x + torch.tanh(model.lin(x)) * (0.5 * model.gamma)
        torch.testing.assert_close(folded(x), want, atol=1e-6, rtol=0)
    # It still trains: every parameter gets a gradient and one SGD step lowers the loss.
    folded.train()
    target = torch.randn_like(want)
    loss = torch.nn.functional.mse_loss(folded(x), target)
    loss.backward()
    params = [p for p in folded.parameters() if p.requires_grad]
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
        assert torch.nn.functional.mse_loss(folded(x), target) < loss
