"""rezero: function-preserving with init=1; with init=0 equal to a hand-written
reference model implementing x + alpha * F(x)."""

import numpy as np
import onnx
import pytest
import torch

from rescompile.api import build_passes
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.infra import PassManager
from rescompile.validation import assert_close, assert_ok, compare_onnx, random_onnx_inputs, run_onnx
from tools.models import ResidualMLP, build, export_onnx


def rewrite(src, tmp_path, spec):
    graph = load_onnx(src)
    result = PassManager(build_passes([spec]))(graph)
    out = tmp_path / "out.onnx"
    save_onnx(graph, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, result


@pytest.mark.parametrize(
    "name,exporter",
    [("gpt2", "dynamo"), ("llama", "dynamo"), ("bert", "legacy"), ("vit", "dynamo"), ("resnet50", "dynamo")],
)
def test_rezero_init_one_preserves_function(onnx_model, tmp_path, name, exporter):
    case = build(name)
    out, result = rewrite(onnx_model(name, exporter), tmp_path, "rezero")
    assert result.modified and result.stats["0:rezero"]["sites"] == case.sites
    assert_ok(compare_onnx(onnx_model(name, exporter), out))
    params = [
        n
        for n in onnx.load(str(out), load_external_data=False).graph.initializer
        if n.name.startswith("rescompile.rezero.")
    ]
    assert len(params) == case.sites


class ReferenceReZeroMLP(torch.nn.Module):
    """Independent reference: ResidualMLP's blocks with x + alpha_l * F_l(x)."""

    def __init__(self, base: ResidualMLP, alphas):
        super().__init__()
        self.base, self.alphas = base, alphas

    def forward(self, x):
        b = self.base
        for alpha, norm, fc1, fc2 in zip(self.alphas, b.norms, b.fc1, b.fc2):
            x = x + alpha * fc2(torch.relu(fc1(norm(x))))
        return b.head(x)


@pytest.mark.parametrize(
    "spec,alphas",
    [
        ("rezero:init=0", [0.0, 0.0, 0.0]),
        ("rezero:init=0.5,sites=depth:1-", [1.0, 0.5, 0.5]),
        ("rezero:init=0,sites=depth:0-0", [0.0, 1.0, 1.0]),
    ],
)
def test_rezero_matches_reference(tmp_path, spec, alphas):
    torch.manual_seed(0)
    base = ResidualMLP().eval()
    case = build("residual_mlp")
    case.module = base
    src = export_onnx(case, tmp_path / "src" / "mlp.onnx")
    out, _ = rewrite(src, tmp_path, spec)
    feeds, _ = random_onnx_inputs(str(out), seed=3)
    (got,) = run_onnx(str(out), feeds).values()
    with torch.no_grad():
        want = ReferenceReZeroMLP(base, alphas)(torch.from_numpy(feeds["input_0"])).numpy()
        plain = base(torch.from_numpy(feeds["input_0"])).numpy()
    assert_close(got, want)
    assert not np.allclose(got, plain, atol=1e-3)  # the rewrite really changed the function


def test_rezero_preserves_flag_follows_init():
    (p,) = build_passes(["rezero:init=0"])
    (q,) = build_passes(["rezero"])
    assert not p.preserves_function and q.preserves_function


def test_rezero_on_model_without_residuals_is_unmodified(onnx_model, tmp_path):
    _, result = rewrite(onnx_model("plain_mlp", "legacy"), tmp_path, "rezero")
    assert not result.modified
