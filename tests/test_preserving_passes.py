"""Every function-preserving pass configuration, on real models, in both frontends:
outputs equal the original under the default tolerance (rescompile.validation.Tolerance);
ONNX passes the full checker; after
`fold` the ONNX graph has the original node count."""

import onnx
import pytest
import torch
from torch.utils import _pytree as pytree

import rescompile
from rescompile.api import build_passes, run_passes
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.validation import assert_close, assert_ok, compare_onnx
from tools.models import build

TOKEN_MODELS = ["gpt2", "llama", "vit", "bert"]
ALL_MODELS = TOKEN_MODELS + ["resnet50", "residual_cnn"]
PRE_NORM_EXACT = ["gpt2_eps0", "llama_eps0", "vit_eps0"]  # norm eps = 0: exactly scale-invariant

CASES = (
    [(m, ["rezero"]) for m in ALL_MODELS]
    + [(m, ["layerscale"]) for m in ALL_MODELS]
    + [(m, ["laurel:variant=rw"]) for m in ALL_MODELS]
    + [(m, ["laurel:variant=lr,rank=4"]) for m in TOKEN_MODELS]
    + [(m, ["laurel:variant=pa"]) for m in ALL_MODELS]
    + [(m, ["gate"]) for m in ALL_MODELS]
    + [(m, ["decay:compensate=true,alpha_min=0.3"]) for m in PRE_NORM_EXACT]
    + [("bert", ["deepnorm:compensate=true"])]
    + [(m, ["depthscale:compensate=true"]) for m in ALL_MODELS]
    + [(m, ["rezero", "fold"]) for m in ALL_MODELS]
    + [(m, ["layerscale", "fold"]) for m in ALL_MODELS]
    + [(m, ["depthscale:compensate=true", "fold"]) for m in ALL_MODELS]
)


def ids(case):
    return f"{case[0]}-{'+'.join(case[1])}"


@pytest.mark.parametrize("name,specs", CASES, ids=[ids(c) for c in CASES])
def test_onnx(onnx_model, tmp_path, name, specs):
    src = onnx_model(name)
    graph = load_onnx(src)
    before = len(graph)
    result = run_passes(graph, build_passes(specs))
    assert result.modified
    out = tmp_path / "out.onnx"
    save_onnx(graph, out)
    onnx.checker.check_model(str(out), full_check=True)
    assert_ok(compare_onnx(str(src), str(out)))
    if specs[-1] == "fold":
        assert len(graph) == before
        assert not any(k.startswith("rescompile.") for k in graph.initializers)


@pytest.mark.parametrize("name,specs", CASES, ids=[ids(c) for c in CASES])
def test_torch(name, specs):
    case = build(name)
    rewritten = rescompile.apply(case.module, specs, case.args, example_kwargs=case.kwargs)
    with torch.no_grad():
        want = pytree.tree_leaves(case.module(*case.args, **case.kwargs))
        got = pytree.tree_leaves(rewritten(*case.args, **case.kwargs))
    for a, b in zip(want, got, strict=True):
        assert_close(b, a)
    new = [k for k, _ in rewritten.named_parameters() if k.startswith("rescompile.")]
    if specs[-1] == "fold" or specs[0].startswith(("depthscale", "decay", "deepnorm")):
        assert new == []  # folded, or fixed (non-trainable) multipliers
    else:
        assert new  # learned gates are trainable parameters
