"""shallow: exact against a hand-written x + sum_l F_l(x), second order against the sequential model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.validation import assert_close
from tools.models import ModelCase, PostNormMLP, ResidualMLP, cached_onnx, export_onnx

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def mlp(blocks: int = 2, scale: float = 1.0) -> ResidualMLP:
    torch.manual_seed(0)
    model = ResidualMLP(blocks=blocks).eval()
    with torch.no_grad():
        for fc2 in model.fc2:  # F_l = scale * (W2 relu(W1 LN(x)) + b2)
            fc2.weight.mul_(scale)
            fc2.bias.mul_(scale)
    return model


def branch(model: ResidualMLP, layer: int, x: torch.Tensor) -> torch.Tensor:
    return model.fc2[layer](torch.relu(model.fc1[layer](model.norms[layer](x))))


def reference(model: ResidualMLP, x: torch.Tensor, runs: list[list[int]]) -> torch.Tensor:
    """x + sum_l F_l(x) over each run of layers, written from the model's own modules."""
    for run in runs:
        x = x + sum(branch(model, layer, x) for layer in run)
    return model.head(x)


def test_error_against_the_sequential_model_is_second_order():
    errors = []
    for scale in (0.2, 0.1, 0.05):
        model = mlp(scale=scale)
        out = rescompile.apply(model, ["shallow"], (X,), dynamic=False)
        with torch.no_grad():
            errors.append((out(X) - model(X)).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.0 < r < 5.0 for r in ratios), (errors, ratios)


def test_k3_on_torch_equals_the_hand_written_sum():
    model = mlp(blocks=3)
    out = rescompile.apply(model, ["shallow:k=3"], (X,), dynamic=False)
    with torch.no_grad():
        assert_close(out(X).numpy(), reference(model, X, [[0, 1, 2]]).numpy())
        assert not np.allclose(out(X).numpy(), model(X).numpy(), atol=1e-3)


def test_onnx_pairs_equal_the_hand_written_sum_and_the_odd_site_stays(tmp_path):
    model = mlp(blocks=3)
    src = export_onnx(
        ModelCase("mlp3", model, (X,), {}, sites=3), tmp_path / "src" / "mlp3.onnx", exporter="legacy"
    )
    proto = rescompile.apply(str(src), ["shallow"])
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        assert_close(got, reference(model, X, [[0, 1], [2]]).numpy())


def test_rewritten_module_trains():
    model = mlp()
    out = rescompile.apply(model, ["shallow"], (X,), dynamic=False)
    out.train()
    target = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(out.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (out(X) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gpt2_onnx_runs_in_ort(tmp_path):
    result = rescompile.pipeline.compile_model(
        str(cached_onnx("gpt2")), ["shallow"], output=tmp_path / "s.onnx"
    )
    assert result.result.stats["0:shallow"]["runs"] == 2
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((2, 8), dtype=np.int64) for i in session.get_inputs()}
    assert all(np.isfinite(o).all() for o in session.run(None, feeds))


class Tapped(torch.nn.Module):
    """Two pre-norm blocks whose intermediate stream value is also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.base = mlp()

    def forward(self, x):
        x1 = x + branch(self.base, 0, x)
        return x1 + branch(self.base, 1, x1), x1 * 2


@pytest.mark.parametrize(
    "model,spec,match",
    [
        (PostNormMLP(), "shallow", "pre-norm"),
        (Tapped(), "shallow", "also read by"),
        (mlp(), "shallow:k=3", "no run of 3"),
        (mlp(blocks=3), "shallow:sites=depth:2-", "starts no run of 2"),
    ],
)
def test_refusals_name_the_reason(model, spec, match):
    with pytest.raises(RescompileError, match=match) as info:
        rescompile.apply(copy.deepcopy(model).eval(), [spec], (X,), dynamic=False)
    assert "\n" not in str(info.value)
