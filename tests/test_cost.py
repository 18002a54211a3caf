"""Parameter and MAC counts, checked against hand counts and published figures."""

from __future__ import annotations

import torch

from rescompile.analysis.cost import count_macs, count_params
from rescompile.pipeline import load
from tools.models import cached_onnx, gpt2


def test_gpt2_macs_equal_a_hand_count():
    graph = load(str(cached_onnx("gpt2")))  # 2 layers, width 32, 2 heads, batch 2 x 8 tokens
    tokens, width, heads, seq = 16, 32, 2, 8
    per_token = width * 3 * width + width * width + 2 * width * 4 * width  # qkv, out, fc, proj
    attention = 2 * (2 * heads * seq * seq * (width // heads))  # q @ k^T and p @ v, both items
    assert count_macs(graph) == 2 * (tokens * per_token + attention)


def test_both_frontends_count_alike():
    case = gpt2(layers=2)
    onnx_graph = load(str(cached_onnx("gpt2")))
    torch_graph = load(case.module, case.args, example_kwargs=case.kwargs, dynamic=False)
    assert count_macs(torch_graph) == count_macs(onnx_graph)
    # the ONNX exporter folds the static position lookup into a constant: params differ there
    assert count_params(torch_graph) == sum(p.numel() for p in case.module.parameters())


def test_resnet18_and_a_grouped_conv():
    import torchvision

    graph = load(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 224, 224),), dynamic=False)
    assert abs(count_macs(graph) / 1e9 - 1.814) < 0.01  # the published 1.8 GMACs at 224 x 224
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=4)
    graph = load(torch.nn.Sequential(conv).eval(), (torch.randn(1, 8, 5, 5),), dynamic=False)
    assert count_macs(graph) == 16 * 5 * 5 * (8 // 4) * 3 * 3
