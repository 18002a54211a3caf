"""hyper: function-preserving on pure residual streams (token and NCHW), exact for
n=1, refused with the site named elsewhere, trainable, and equal to the
independent `hyper-connections` package (PyPI) with the same parameter values."""

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import rescompile
from rescompile.api import build_passes, run_passes
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.validation import Tolerance, assert_close, assert_ok, compare_onnx
from tools.models import build

MODELS = ["gpt2", "llama", "vit", "preact_cnn", "residual_mlp"]
SPECS = ["hyper:n=1", "hyper", "hyper:dynamic=true", "hyper:n=2,dynamic=true"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spec", SPECS)
def test_preserves_function_onnx(onnx_model, tmp_path, name, spec):
    import onnx

    src = onnx_model(name)
    graph = load_onnx(src)
    result = run_passes(graph, build_passes([spec]))
    assert result.stats["0:hyper"]["sites"] == build(name).sites
    save_onnx(graph, tmp_path / "h.onnx")
    onnx.checker.check_model(str(tmp_path / "h.onnx"), full_check=True)
    assert_ok(compare_onnx(str(src), str(tmp_path / "h.onnx")))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spec", SPECS)
def test_preserves_function_torch(name, spec):
    case = build(name)
    module = rescompile.apply(case.module, [spec], case.args, example_kwargs=case.kwargs)
    with torch.no_grad():
        want = pytree.tree_leaves(case.module(*case.args, **case.kwargs))[0]
        got = pytree.tree_leaves(module(*case.args, **case.kwargs))[0]
    if spec == "hyper:n=1" and name != "preact_cnn":
        assert torch.equal(got, want)  # n = 1 is the plain residual network
    assert_close(got, want)


@pytest.mark.parametrize("name,reason", [("bert", "post-norm"), ("residual_cnn", "post-activation")])
def test_refuses_impure_streams_naming_the_site(name, reason):
    case = build(name)
    with pytest.raises(
        rescompile.RescompileError, match=f"hyper: site .* reads the stream through .*{reason}"
    ):
        rescompile.apply(case.module, ["hyper"], case.args, example_kwargs=case.kwargs)


def test_trains():
    case = build("residual_mlp")
    module = rescompile.apply(case.module, ["hyper:n=3,dynamic=true"], case.args).train()
    x, target = torch.randn(8, 5, 16), torch.randn(8, 5, 4)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.mse_loss(module(x), target)
        opt.zero_grad()
        loss.backward()
        new = {k: p for k, p in module.named_parameters() if k.startswith("rescompile.hyper.")}
        assert new and all(p.grad is not None for p in new.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# ----- cross-check with the PyPI package -------------------------------------------------
D, N, LAYERS = 16, 3, 4


class Plain(nn.Module):
    """x -> [x + branch_k(x)] for k < LAYERS -> LayerNorm -> head; branch = LN, Linear, GELU, Linear."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
            for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        for branch in self.branches:
            x = x + branch(x)
        return self.head(self.norm(x))


class WithPackage(nn.Module):
    """The same network written by hand with hyper_connections.HyperConnections."""

    def __init__(self, plain: Plain):
        super().__init__()
        from hyper_connections import HyperConnections

        self.plain = plain
        self.hcs = nn.ModuleList(
            HyperConnections(N, dim=D, branch=b, layer_index=k) for k, b in enumerate(plain.branches)
        )

    def forward(self, x):
        b = x.shape[0]
        # The package's expand: 'b ... -> (b s) ...' (each sample's streams adjacent in the batch).
        h = x.unsqueeze(1).expand(b, N, *x.shape[1:]).reshape(b * N, *x.shape[1:])
        for hc in self.hcs:
            h = hc(h)
        h = h.reshape(b, N, *x.shape[1:]).sum(1)  # the package's reduce: sum over streams
        return self.plain.head(self.plain.norm(h))


def _perturb(module: nn.Module, dynamic: bool):
    torch.manual_seed(7)
    with torch.no_grad():
        for hc in module.hcs:
            hc.static_alpha.add_(0.2 * torch.randn_like(hc.static_alpha))
            hc.static_beta.add_(0.2 * torch.randn_like(hc.static_beta))
            if dynamic:
                for p in (hc.dynamic_alpha_fn, hc.dynamic_beta_fn, hc.norm.gamma):
                    p.copy_(0.3 * torch.randn_like(p))
                hc.dynamic_alpha_scale.fill_(0.5)
                hc.dynamic_beta_scale.fill_(0.4)


def _copy_into_ours(ours: nn.Module, package: WithPackage, dynamic: bool):
    """Map the package's parametrisation onto ours, site by site (site k = layer_index k).

    Ours uses the package's layouts except for vectors made [.., 1] columns:
      static_alpha [n, 1 + n] = [A_m | A_r] (row s = source stream)  -> ours static_alpha, as is
      static_beta [n]                                                 -> ours static_beta [n, 1]
      dynamic_alpha_fn [d, 1 + n]                                     -> ours dynamic_alpha, as is
      dynamic_beta_fn [d]                                             -> ours dynamic_beta [d, 1]
      norm.gamma, dynamic_*_scale                                     -> ours norm_gain, dynamic_*_scale
    """
    params = dict(ours.named_parameters())
    sites = sorted(
        {k.split(".")[2] for k in params if k.startswith("rescompile.hyper.") and k.endswith("static_alpha")},
        key=lambda s: int(s.split("_")[-1]) if s[-1].isdigit() else 0,
    )
    assert len(sites) == LAYERS
    with torch.no_grad():
        for site, hc in zip(sites, package.hcs):
            p = lambda role, site=site: params[f"rescompile.hyper.{site}.{role}"]  # noqa: E731
            p("static_alpha").copy_(hc.static_alpha)
            p("static_beta").copy_(hc.static_beta[:, None])
            if dynamic:
                p("dynamic_alpha").copy_(hc.dynamic_alpha_fn)
                p("dynamic_beta").copy_(hc.dynamic_beta_fn[:, None])
                p("norm_gain").copy_(hc.norm.gamma)
                p("dynamic_alpha_scale").copy_(hc.dynamic_alpha_scale)
                p("dynamic_beta_scale").copy_(hc.dynamic_beta_scale)


@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_the_hyper_connections_package(dynamic):
    torch.manual_seed(0)
    plain = Plain().eval()
    package = WithPackage(plain).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():  # the package's init is function-preserving with sum-reduce up to the final norm
        # looser: the package's init equals plain only up to its final-norm epsilon
        assert_close(package(x), plain(x), Tolerance(1e-4, 1e-4))
    _perturb(package, dynamic)
    ours = rescompile.apply(plain, [f"hyper:n={N},dynamic={str(dynamic).lower()},reduce=sum"], (x,))
    _copy_into_ours(ours, package, dynamic)
    with torch.no_grad():
        want, got, base = package(x), ours(x), plain(x)
    assert not torch.allclose(want, base, atol=1e-3)  # the perturbed connections matter
    assert_close(got, want)


@pytest.mark.parametrize("name", ["gpt2", "preact_cnn", "residual_mlp"])
@pytest.mark.parametrize("spec", ["frac:m=1", "frac", "frac:m=2,dynamic=true"])
def test_frac_preserves_function(assert_preserves, name, spec):
    assert_preserves(name, spec)


def test_frac_matches_hand_written_formula():
    """Perturbed static connections against H_new = B^T split(T(merge(Gamma^T H))) + A^T H."""
    from tools.models import ResidualMLP

    torch.manual_seed(0)
    base, m = ResidualMLP().eval(), 2
    x = torch.randn(2, 5, 16)
    module = rescompile.apply(base, [f"frac:m={m}"], (x,))
    params = dict(module.named_parameters())
    sites = sorted(
        {k.split(".")[2] for k in params if k.startswith("rescompile.frac.")},
        key=lambda s: int(s.split("_")[-1]) if s[-1].isdigit() else 0,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for site in sites:
            for role in ("static_alpha", "static_beta"):
                params[f"rescompile.frac.{site}.{role}"].add_(
                    0.3 * torch.randn(params[f"rescompile.frac.{site}.{role}"].shape)
                )
        h = x.reshape(2, 5, m, 16 // m)
        for site, norm, fc1, fc2 in zip(sites, base.norms, base.fc1, base.fc2):
            alpha = params[f"rescompile.frac.{site}.static_alpha"]  # [Gamma | A], rows = source fraction
            gamma_t, a_t = alpha[:, :m].T, alpha[:, m:].T
            beta = params[f"rescompile.frac.{site}.static_beta"]  # B, [m, 1]
            h_in = (gamma_t @ h).reshape(2, 5, 16)
            t = fc2(torch.relu(fc1(norm(h_in))))
            h = beta * t.reshape(2, 5, m, 16 // m) + a_t @ h
        want = base.head(h.reshape(2, 5, 16))
        got = module(x)
    assert not torch.allclose(got, base(x), atol=1e-3)
    assert_close(got, want)
