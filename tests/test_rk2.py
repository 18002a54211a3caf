"""rk2: Heun equals (x + L(L(x)))/2 calling the original layer twice; (a, b) = (1, 0) is the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.examples import TinyTransformer
from rescompile.validation import assert_close
from tools.models import ModelCase, ResidualMLP, build, export_onnx

IDS = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def tiny() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(width=16, heads=2, layers=2).eval()


def heun_layers(model: TinyTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Each layer L replaced by (x + L(L(x)))/2, L the original block called twice."""
    x = model.tok(ids) + model.pos[:, : ids.shape[1]]
    for block in model.blocks:
        x = (x + block(block(x))) / 2
    return model.head(model.norm(x))


def mlp() -> ResidualMLP:
    torch.manual_seed(0)
    return ResidualMLP().eval()


def stepped(model: ResidualMLP, x: torch.Tensor, step) -> torch.Tensor:
    """Each branch F_l replaced by step(x, F_l), F_l called from the model's own modules."""
    for norm, fc1, fc2 in zip(model.norms, model.fc1, model.fc2):
        x = step(x, lambda z, n=norm, f1=fc1, f2=fc2: f2(torch.relu(f1(n(z)))))
    return model.head(x)


def heun(x, f):
    layer = lambda z: z + f(z)  # noqa: E731
    return (x + layer(layer(x))) / 2


def midpoint(x, f):
    return x + f(x + f(x) / 2)


def ort_run(proto, feed: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0]


def test_heun_layer_scope_torch_and_onnx(tmp_path):
    model = tiny()
    out = rescompile.apply(model, ["rk2:method=heun,scope=layer"], (IDS,), dynamic=False)
    src = export_onnx(ModelCase("tiny", model, (IDS,), {}, sites=4), tmp_path / "src" / "t.onnx")
    proto = rescompile.apply(str(src), ["rk2:method=heun,scope=layer"])
    with torch.no_grad():
        want = heun_layers(model, IDS).numpy()
        assert_close(out(IDS).numpy(), want)
        assert_close(ort_run(proto, IDS), want)
        assert not np.allclose(want, model(IDS).numpy(), atol=1e-3)


@pytest.mark.parametrize("method,step", [("heun", heun), ("midpoint", midpoint)])
def test_branch_scope_torch_and_onnx(tmp_path, method, step):
    model = mlp()
    out = rescompile.apply(model, [f"rk2:method={method}"], (X,), dynamic=False)
    src = export_onnx(
        ModelCase("mlp", model, (X,), {}, sites=3), tmp_path / "src" / "m.onnx", exporter="legacy"
    )
    proto = rescompile.apply(str(src), [f"rk2:method={method}"])
    with torch.no_grad():
        want = stepped(model, X, step).numpy()
        assert_close(out(X).numpy(), want)
        assert_close(ort_run(proto, X), want)
        assert not np.allclose(want, model(X).numpy(), atol=1e-3)


@pytest.mark.parametrize("scope", ["branch", "layer"])
def test_default_coefficients_keep_the_function_and_learnable_heun_trains(scope):
    model = tiny()
    out = rescompile.apply(model, [f"rk2:learnable=true,scope={scope}"], (IDS,), dynamic=False)
    with torch.no_grad():
        assert_close(out(IDS).numpy(), model(IDS).numpy())
    heun_out = rescompile.apply(
        model, [f"rk2:method=heun,learnable=true,scope={scope}"], (IDS,), dynamic=False
    )
    params = {n: p for n, p in heun_out.named_parameters() if n.startswith("rescompile.rk2")}
    assert len(params) == 3 * (4 if scope == "branch" else 2)
    heun_out.train()
    opt = torch.optim.SGD(heun_out.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        logits = heun_out(IDS)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), IDS[:, 1:].reshape(-1))
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs() > 0 for p in params.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_projection_shortcuts_are_refused_and_identity_sites_selectable():
    case = build("residual_cnn")
    with pytest.raises(RescompileError, match="projection shortcut") as info:
        rescompile.apply(case.module, ["rk2:method=heun"], case.args, dynamic=False)
    assert "\n" not in str(info.value)
    out = rescompile.apply(case.module, ["rk2:method=heun,sites=kind:identity"], case.args, dynamic=False)
    with torch.no_grad():
        assert out(*case.args).shape == case.module(*case.args).shape


@pytest.mark.parametrize(
    "spec,match", [("rk2:method=heun,a=0.3", "either method"), ("rk2:a=0,b=0", "removes the update")]
)
def test_bad_options_are_refused(spec, match):
    with pytest.raises(RescompileError, match=match):
        rescompile.apply(mlp(), [spec], (X,), dynamic=False)
