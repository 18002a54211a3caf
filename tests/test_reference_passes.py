"""Pass configurations that change the function, checked against independent,
hand-written reference models implementing each paper's formula, in both
frontends (torch module out; ONNX out run in ONNX Runtime)."""

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import rescompile
from rescompile.validation import assert_close, assert_ok, run_onnx
from tools.models import ActivationBranchMLP, ModelCase, PostNormMLP, ResidualMLP, export_onnx

torch.manual_seed(0)
X = torch.randn(2, 5, 16)


def branches(base):
    """F_l of the pre-norm ResidualMLP, written out by hand."""
    return [
        lambda x, n=n, a=a, b=b: b(torch.relu(a(n(x)))) for n, a, b in zip(base.norms, base.fc1, base.fc2)
    ]


def run_both(base, specs, tmp_path, mutate=None):
    """Outputs of the rewritten model from the torch and the ONNX frontend on X.

    mutate(name, array) may return new values for the new parameters (by name)."""
    module = rescompile.apply(base, specs, (X,))
    if mutate:
        with torch.no_grad():
            for name, p in module.named_parameters():
                new = mutate(name, p.detach().numpy())
                if new is not None:
                    p.copy_(torch.as_tensor(new))
    with torch.no_grad():
        torch_out = module(X).numpy()
    src = export_onnx(ModelCase("m", base, (X,), {}, sites=0), tmp_path / "src" / "m.onnx")
    proto = rescompile.apply(str(src), specs)
    if mutate:
        for init in proto.graph.initializer:
            new = mutate(init.name, numpy_helper.to_array(init))
            if new is not None:
                init.CopyFrom(numpy_helper.from_array(np.asarray(new, dtype=np.float32), init.name))
    onnx.checker.check_model(proto)
    (onnx_out,) = run_onnx(proto.SerializeToString(), {"input_0": X.numpy()}).values()
    return torch_out, onnx_out


def check(base, specs, reference, tmp_path, mutate=None):
    with torch.no_grad():
        want = reference().numpy()
        plain = base(X).numpy()
    for got in run_both(base, specs, tmp_path, mutate):
        assert_close(got, want)
    assert not np.allclose(want, plain, atol=1e-4), "the configuration must change the function"


def pre_norm_reference(base, skip_w, branch_w, extra=None):
    def run():
        x, history = X, []
        for l, f in enumerate(branches(base)):
            new = skip_w[l] * x + branch_w[l] * f(x)
            if extra is not None:
                new = new + extra(l, x, history)
            history.append(x)
            x = new
        return base.head(x)

    return run


@pytest.fixture
def base():
    torch.manual_seed(1)
    return ResidualMLP().eval()


def test_decay_schedule(base, tmp_path):
    alphas = [1 - 0.6 * (l + 1) / 3 for l in range(3)]  # 0.8, 0.6, 0.4: linear to alpha_min
    check(base, ["decay:alpha_min=0.4"], pre_norm_reference(base, alphas, [1, 1, 1]), tmp_path)


def test_decay_on_selected_sites(base, tmp_path):
    check(
        base,
        ["decay:alpha_min=0.4,sites=depth:2-"],
        pre_norm_reference(base, [1, 1, 0.4], [1, 1, 1]),
        tmp_path,
    )


@pytest.mark.parametrize("mode,factor", [("sqrt", 1 / math.sqrt(3)), ("linear", 1 / 3)])
def test_depthscale(base, tmp_path, mode, factor):
    check(base, [f"depthscale:mode={mode}"], pre_norm_reference(base, [1] * 3, [factor] * 3), tmp_path)


def test_layerscale_constant_and_cait(base, tmp_path):
    check(base, ["layerscale:init=0.25"], pre_norm_reference(base, [1] * 3, [0.25] * 3), tmp_path)
    # CaiT: a 3-site token stream is 1 layer (<= 18): eps = 0.1
    check(base, ["layerscale:init=cait"], pre_norm_reference(base, [1] * 3, [0.1] * 3), tmp_path)


def test_layerscale_one_hot_keeps_one_channel(base, tmp_path):
    onehot = np.zeros(16, np.float32)
    onehot[3] = 1.0
    check(
        base,
        ["layerscale:sites=depth:0-0"],
        pre_norm_reference(base, [1] * 3, [torch.from_numpy(onehot), 1, 1]),
        tmp_path,
        mutate=lambda name, a: onehot if name.endswith(".gamma") else None,
    )


def test_laurel_rw(base, tmp_path):
    check(
        base, ["laurel:variant=rw,alpha=0.5,beta=2"], pre_norm_reference(base, [2] * 3, [0.5] * 3), tmp_path
    )


def test_laurel_lr_with_identity_factors_adds_c_times_skip(base, tmp_path):
    c = 0.3  # r = d, A = I, B = c I: x_{l+1} = F(x_l) + (1 + c) x_l

    def mutate(name, array):
        if name.endswith(".A"):
            return np.eye(16, dtype=np.float32)
        if name.endswith(".B"):
            return c * np.eye(16, dtype=np.float32)
        return None

    check(
        base, ["laurel:variant=lr,rank=16"], pre_norm_reference(base, [1 + c] * 3, [1] * 3), tmp_path, mutate
    )


def test_laurel_pa_adds_earlier_stream_values(base, tmp_path):
    g = 0.3
    ref = pre_norm_reference(base, [1] * 3, [1] * 3, extra=lambda l, x, hist: g * sum(hist) if hist else 0)
    check(
        base,
        ["laurel:variant=pa"],
        ref,
        tmp_path,
        mutate=lambda n, a: np.full_like(a, g) if ".gamma" in n else None,
    )


def test_gate_with_bias_and_weights(base, tmp_path):
    b, w = 0.7, 0.05
    check(base, [f"gate:bias={b}"], pre_norm_reference(base, [1] * 3, [2 / (1 + math.exp(-b))] * 3), tmp_path)

    def run():
        x = X
        for f in branches(base):
            gate = 2 * torch.sigmoid((x * w).sum(-1, keepdim=True) + b)
            x = x + gate * f(x)
        return base.head(x)

    check(
        base,
        [f"gate:bias={b}"],
        run,
        tmp_path,
        mutate=lambda n, a: (
            np.full_like(a, w) if n.endswith(".weight") and n.startswith("rescompile.gate") else None
        ),
    )


def test_deepnorm_post_norm_stack(tmp_path):
    torch.manual_seed(2)
    base = PostNormMLP().eval()
    alpha = 12**0.25  # encoder-only, N = 6: (2N)^(1/4) ~ 1.861

    def run():
        x = X
        for fc1, fc2, norm in zip(base.fc1, base.fc2, base.norms):
            x = norm(alpha * x + fc2(torch.relu(fc1(x))))
        return x

    check(base, ["deepnorm:layers=6"], run, tmp_path)
    assert abs(alpha - 1.861) < 1e-3


def test_deepnorm_refuses_pre_norm(base):
    with pytest.raises(rescompile.RescompileError, match="pre-norm; DeepNorm applies to post-norm"):
        rescompile.apply(base, ["deepnorm"], (X,))


def test_fold_reports_unfoldable_site_and_keeps_function(tmp_path):
    torch.manual_seed(3)
    base = ActivationBranchMLP().eval()
    from rescompile.api import build_passes, load, run_passes

    graph = load(base, (X,))
    result = run_passes(graph, build_passes(["rezero:init=0.5", "fold"]))
    (refused,) = result.stats["1:fold"]["refused"]
    assert "relu" in refused.lower() and "no parameter to scale" in refused
    assert result.stats["1:fold"]["folded"] == 0
    module = rescompile.apply(base, ["rezero:init=0.5", "fold"], (X,))
    with torch.no_grad():
        assert_close(module(X), X + 0.5 * torch.relu(base.fc(X)))


def test_new_gate_parameters_get_gradients():
    torch.manual_seed(4)
    base = ResidualMLP().eval()
    for specs in (
        ["layerscale"],
        ["laurel:variant=rw"],
        ["laurel:variant=lr"],
        ["laurel:variant=pa"],
        ["gate"],
    ):
        module = rescompile.apply(base, specs, (X,)).train()
        module(torch.randn(3, 5, 16)).square().mean().backward()
        new = {k: p for k, p in module.named_parameters() if k.startswith("rescompile.")}
        assert new, specs
        # With B = 0 (lr) only B's gradient is non-zero at init, as for any zero-init factor pair.
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in new.values()), specs


def test_deepnorm_constants_match_torchscale():
    from rescompile.passes.deepnorm import deepnorm_alpha

    assert deepnorm_alpha("encoder", 6, 0, "encoder") == pytest.approx((2 * 6) ** 0.25)
    assert deepnorm_alpha("decoder", 0, 6, "decoder") == pytest.approx((2 * 6) ** 0.25)
    assert deepnorm_alpha("encoder-decoder", 6, 6, "encoder") == pytest.approx(0.81 * (6**4 * 6) ** (1 / 16))
    assert deepnorm_alpha("encoder-decoder", 6, 6, "decoder") == pytest.approx((3 * 6) ** 0.25)


def test_fold_through_a_channel_keeping_transpose(tmp_path):
    """nn.MultiheadAttention's branch ends in a transpose [T,B,d] -> [B,T,d]; a per-channel
    factor still folds into out_proj, in both frontends, with a non-trivial factor."""
    from rescompile.examples import TinyTransformer, example_inputs

    torch.manual_seed(0)
    model, x = TinyTransformer(layers=2).eval(), example_inputs()
    unfolded = rescompile.apply(model, ["layerscale:init=0.5"], x)
    folded = rescompile.apply(model, ["layerscale:init=0.5", "fold"], x)
    assert not [k for k, _ in folded.named_parameters() if k.startswith("rescompile.")]
    assert_ok(rescompile.validate(unfolded, folded, x))
    assert not rescompile.validate(model, folded, x, atol=1e-3).ok
    src = export_onnx(ModelCase("t", model, x, {}, sites=4), tmp_path / "src" / "t.onnx")
    plain, proto = (
        rescompile.apply(str(src), ["layerscale:init=0.5"]),
        rescompile.apply(str(src), ["layerscale:init=0.5", "fold"]),
    )
    assert len(proto.graph.node) == len(onnx.load(str(src), load_external_data=False).graph.node)
    assert_ok(rescompile.validate(plain, proto))
