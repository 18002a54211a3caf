"""Residual detection on real architectures, in both frontends (ONNX via the dynamo exporter, torch via
`rescompile.inspect`): Swin's shifted windows, CaiT's class attention, and the streams of CNNs with
downsampling stages. Small configs with random weights; torchvision and timm models skip without them."""

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import rescompile
from rescompile.analysis.residuals import find_residuals
from rescompile.frontends.onnx import load_onnx
from tools.models import build

NEEDS = {
    "tv_swin": "torchvision",
    "tv_resnet18": "torchvision",
    "tv_resnet50": "torchvision",
    "tv_regnet": "torchvision",
    "cait": "timm",
    "hf_swin": "transformers",
    "cropped_tokens": None,
}
MODELS = list(NEEDS)


def _case(name):
    if NEEDS[name]:
        pytest.importorskip(NEEDS[name])
    return build(name)


def _check(analysis, case):
    sites = analysis.sites
    assert len(sites) == case.sites
    assert [s.kind for s in sites].count("projection") == case.projection
    assert tuple(len(s.sites) for s in analysis.streams) == case.stream_lengths
    if case.norm:
        assert {s.norm for s in sites} == {case.norm}
    for stream in analysis.streams:
        assert [s.depth for s in stream.sites] == list(range(len(stream.sites)))
        assert all(s.stream == stream.index for s in stream.sites)
        # A projection shortcut changes the stream's width or resolution: only a stream's first site.
        assert all(s.kind == "identity" for s in stream.sites[1:])
    assert all(s.weighted and s.branch_params > 0 for s in sites)


@pytest.mark.parametrize("name", MODELS)
def test_onnx(onnx_model, name):
    case = _case(name)
    _check(find_residuals(load_onnx(onnx_model(name))), case)


@pytest.mark.parametrize("name", MODELS)
def test_torch(name, tmp_path):
    """Modules with dynamic dims go through torch.export and a .pt2 file with just those dims dynamic
    (all dims dynamic spends a minute solving Swin's shapes); the others are captured static."""
    case = _case(name)
    if case.dynamic_shapes is None:
        report = rescompile.inspect(case.module, case.args, example_kwargs=case.kwargs, dynamic=False)
    else:
        program = torch.export.export(
            case.module, case.args, case.kwargs, dynamic_shapes=case.dynamic_shapes, strict=False
        )
        torch.export.save(program, tmp_path / "model.pt2")
        report = rescompile.inspect(tmp_path / "model.pt2")
    _check(report.analysis, case)


def test_cait_streams_are_patch_tokens_then_class_token(onnx_model):
    """The class-attention branch reads cat(x_cls, x): x_cls is the skip, and the patch tokens meet it
    only inside the branch, so they do not continue into the class token's stream."""
    _case("cait")
    patches, cls = find_residuals(load_onnx(onnx_model("cait"))).streams
    assert {s.skip.shape for s in patches.sites} == {(1, 16, 32)}  # 32x32 image, 8x8 patches
    assert {s.skip.shape for s in cls.sites} == {(1, 1, 32)}
    attention = cls.sites[0]
    assert any(n.op_type == "Concat" for n in attention.nodes)  # the branch reads cat(x_cls, x)
    # Each class site's skip is the previous class site's output.
    for prev, site in zip(cls.sites, cls.sites[1:]):
        assert site.skip is prev.output


def test_resnet_projection_sites_start_the_streams(onnx_model):
    pytest.importorskip("torchvision")
    analysis = find_residuals(load_onnx(onnx_model("tv_resnet50")))
    assert [s.depth for s in analysis.sites if s.kind == "projection"] == [0, 0, 0, 0]
    assert [s.stream for s in analysis.sites if s.kind == "projection"] == [0, 1, 2, 3]


def _close(got, want):
    scale = float(np.abs(want).max())
    return float(np.abs(got - want).max()) <= 1e-5 * scale


def test_swin_layerscale_on_every_site_onnx(onnx_model, tmp_path):
    import onnxruntime as ort

    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.onnx import save_onnx

    case = _case("tv_swin")
    src = onnx_model("tv_swin")
    graph = load_onnx(src)
    result = run_passes(graph, build_passes(["layerscale"]))
    assert result.stats["0:layerscale"] == {"sites": case.sites}
    assert len(find_residuals(graph).sites) == case.sites  # still visible after the rewrite
    save_onnx(graph, tmp_path / "ls.onnx")
    feeds = {"input_0": case.args[0].numpy()}
    want = ort.InferenceSession(str(src)).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "ls.onnx")).run(None, feeds)[0]
    assert _close(got, want)


def test_swin_layerscale_on_every_site_torch():
    case = _case("tv_swin")
    module = rescompile.apply(case.module, ["layerscale"], case.args, dynamic=False)
    gammas = [n for n, _ in module.named_parameters() if n.startswith("rescompile.layerscale.")]
    assert len(gammas) == case.sites
    with torch.no_grad():
        want = pytree.tree_leaves(case.module(*case.args))[0].numpy()
        got = pytree.tree_leaves(module(*case.args))[0].numpy()
    assert _close(got, want)


def test_swin_layerscale_gamma_is_per_channel():
    """Swin's stream is [B, H, W, C]: the gamma must have C entries, found through the op table
    (the last linear's output channels), not H from a rank-4 guess."""
    case = _case("tv_swin")
    module = rescompile.apply(case.module, ["layerscale"], case.args, dynamic=False)
    shapes = {tuple(p.shape) for n, p in module.named_parameters() if n.startswith("rescompile.layerscale.")}
    assert shapes <= {(16,), (32,)}
