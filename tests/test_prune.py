"""prune: the pruned model equals the original with every removed slice zeroed (both frontends),
both frontends choose the same slices, and bad options fail in one line."""

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import rescompile
from passes.prune import IMPORTANCE, PrunePass
from rescompile.infra import PassError, PassManager
from rescompile.pipeline import load
from rescompile.validation import (
    Tolerance,
    assert_close,
    assert_ok,
    compare_onnx,
)
from tools.models import build, export_onnx

EXACT = Tolerance(1e-5, 1e-4)


def removed_params(graph, spec: dict) -> dict[str, dict[int, list[int]]]:
    """initializer name -> {axis: removed indices} of the plan prune makes for `spec`."""
    plan = PrunePass(**spec).plan(graph)
    return {v.name: axes for v, axes in plan.removed_slices().items() if v.is_initializer}


def zero_slices(array, axes: dict[int, list[int]]):
    for axis, indices in axes.items():
        array[(slice(None),) * axis + (indices,)] = 0
    return array


def spec_string(spec: dict) -> str:
    return "prune:" + ",".join(f"{k}={v}" for k, v in spec.items())


def check_torch(case, spec: dict) -> dict:
    """Prune the module, zero the same slices in a copy of the original, compare outputs."""
    graph = load(case.module, case.args or None, example_kwargs=case.kwargs)
    cut = removed_params(graph, spec)
    assert cut, "the plan removes nothing"
    pruned = rescompile.apply(
        copy.deepcopy(case.module), [spec_string(spec)], case.args or None, example_kwargs=case.kwargs
    )
    zeroed = copy.deepcopy(case.module)
    state = dict(zeroed.named_parameters()) | dict(zeroed.named_buffers())
    with torch.no_grad():
        for name, axes in cut.items():
            zero_slices(state[name].data, axes)
        want, got = zeroed(*case.args, **case.kwargs), pruned(*case.args, **case.kwargs)
        original = case.module(*case.args, **case.kwargs)
    want = want[0] if isinstance(want, tuple) else getattr(want, "last_hidden_state", want)
    got = got[0] if isinstance(got, tuple) else getattr(got, "last_hidden_state", got)
    assert_close(got, want, EXACT)
    original = (
        original[0] if isinstance(original, tuple) else getattr(original, "last_hidden_state", original)
    )
    assert (got - original).abs().max() > 1e-3 * original.abs().max()  # the zeroed slices mattered
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in case.module.parameters())
    return cut


def check_onnx(path, spec: dict) -> dict:
    """Prune the ONNX model, zero the same initializer slices in the original, compare in ORT."""
    cut = removed_params(load(str(path)), spec)
    assert cut, "the plan removes nothing"
    pruned = rescompile.apply(str(path), [spec_string(spec)])
    onnx.checker.check_model(pruned)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in cut:
            init.CopyFrom(
                numpy_helper.from_array(
                    zero_slices(numpy_helper.to_array(init).copy(), cut[init.name]), init.name
                )
            )
    assert_ok(
        compare_onnx(model.SerializeToString(), pruned.SerializeToString(), atol=EXACT.atol, rtol=EXACT.rtol)
    )
    size = sum(np.prod(i.dims) for i in pruned.graph.initializer)
    assert size < sum(np.prod(i.dims) for i in model.graph.initializer)
    return cut


CASES = [
    ("residual_mlp", {"ratio": 0.3}),
    ("gpt2", {"ratio": 0.5, "uniform": True}),  # uniform: heads go too
    ("llama", {"ratio": 0.5, "uniform": True}),  # GQA: a key/value head with its two query heads
    ("bert", {"ratio": 0.3, "target": "heads"}),
    ("vit", {"ratio": 0.3}),
    ("tv_resnet18", {"ratio": 0.3}),
]


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_pruned_equals_zeroed_original_torch(name, spec):
    check_torch(build(name), spec)


def mobilenet_v3():
    """Depthwise convs, squeeze-excite (a pooled channel vector scaling the channels), hardswish."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=10, width_mult=0.25).eval()
    return dataclasses.replace(build("tv_resnet18"), name="mobilenet_v3", module=model)


def test_mobilenet_v3_depthwise_and_squeeze_excite():
    cut = check_torch(mobilenet_v3(), {"ratio": 0.3})
    depthwise = [n for n, axes in cut.items() if n.endswith("block.1.0.weight")]
    assert depthwise and all(list(cut[n]) == [0] for n in depthwise)  # depthwise: out channels only


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_pruned_equals_zeroed_original_onnx(onnx_model, tmp_path, name, spec):
    check_onnx(onnx_model(name) if name != "bert" else bert_with_distinct_biases(tmp_path), spec)


def bert_with_distinct_biases(tmp_path):
    """BERT's biases start at zero, and both ONNX exporters then store one zero tensor for every
    bias and norm shift: a shared tensor couples the heads with the stream. Random biases keep
    them apart."""
    case = build("bert")
    with torch.no_grad():
        for name, param in case.module.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return export_onnx(case, tmp_path / "bert.onnx")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_both_frontends_choose_the_same_units(onnx_model, name):
    """Same groups, and the same units removed: compared by their l2 scores, since the ONNX export
    renames and transposes weights. (A CNN export folds BatchNorm into the convs: other weights.)"""
    case = build(name)

    def chosen(graph):
        plan = PrunePass(ratio=0.5, uniform=True).plan(graph)
        rng = np.random.default_rng(0)
        return sorted(
            (
                g.kind,
                g.size,
                tuple(np.round(np.sort(IMPORTANCE["l2"](g, rng)[sorted(plan.removed[g.index])]), 5)),
            )
            for g in plan.analysis.groups
            if g.index in plan.removed
        )

    from_torch = chosen(load(case.module, case.args or None, example_kwargs=case.kwargs))
    assert from_torch == chosen(load(str(onnx_model(name))))
    assert {kind for kind, _, _ in from_torch} == {"mlp", "heads"}


def test_uniform_round_to_and_floor():
    graph = load(build("residual_mlp").module, torch.randn(2, 16))
    plan = PrunePass(ratio=0.5, uniform=True, round_to=8).plan(graph)
    removed = {g.index: len(plan.removed.get(g.index, ())) for g in plan.analysis.groups if g.prunable}
    assert set(removed.values()) == {16}  # 32 hidden units: half go, 16 kept is a multiple of 8
    plan = PrunePass(ratio=0.99, min_keep=3).plan(graph)
    assert all(g.size - len(plan.removed.get(g.index, ())) >= 3 for g in plan.analysis.groups if g.prunable)


def test_global_ratio_counts_parameters():
    graph = load(build("llama").module, None, example_kwargs=build("llama").kwargs)
    plan = PrunePass(ratio=0.3).plan(graph)
    total = sum(g.params for g in plan.analysis.groups if g.prunable and g.kind != "stream")
    assert (
        0.3 * total
        <= plan.params_removed
        < 0.3 * total + max(max(g.params_per_unit) for g in plan.analysis.groups)
    )


def test_random_importance_depends_on_seed():
    graph = load(build("residual_mlp").module, torch.randn(2, 16))
    a = PrunePass(importance="random", seed=1).plan(graph).removed
    b = PrunePass(importance="random", seed=2).plan(graph).removed
    assert a != b


def test_stream_target_prunes_the_stream():
    """Stream width through LayerNorm is not zero-equivalent; compare with the model pruned by hand."""
    torch.manual_seed(0)
    model = StreamModel().eval()
    x = torch.randn(3, 5, 4)
    graph = load(model, x)
    (stream,) = [g for g in PrunePass(target="stream").plan(graph).analysis.groups if g.kind == "stream"]
    assert stream.prunable and stream.size == 8
    pruned = rescompile.apply(copy.deepcopy(model), ["prune:ratio=0.25,target=stream"], x)
    kept = [
        k
        for k in range(8)
        if k not in removed_params(graph, {"ratio": 0.25, "target": "stream"})["inp.weight"][0]
    ]
    by_hand = StreamModel(width=len(kept)).eval()
    with torch.no_grad():
        by_hand.inp.weight.copy_(model.inp.weight[kept]), by_hand.inp.bias.copy_(model.inp.bias[kept])
        by_hand.norm.weight.copy_(model.norm.weight[kept]), by_hand.norm.bias.copy_(model.norm.bias[kept])
        by_hand.fc1.weight.copy_(model.fc1.weight[:, kept]), by_hand.fc1.bias.copy_(model.fc1.bias)
        by_hand.fc2.weight.copy_(model.fc2.weight[kept]), by_hand.fc2.bias.copy_(model.fc2.bias[kept])
        by_hand.out.weight.copy_(model.out.weight[:, kept]), by_hand.out.bias.copy_(model.out.bias)
        assert_close(pruned(x), by_hand(x), EXACT)
    assert pruned.norm.weight.shape == (6,) and pruned.inp.weight.shape == (6, 4)


class StreamModel(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp, self.norm = torch.nn.Linear(4, width), torch.nn.LayerNorm(width)
        self.fc1, self.fc2 = torch.nn.Linear(width, 16), torch.nn.Linear(16, width)
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.out(h)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("prune:ratio=0", "ratio must be in (0, 1)"),
        ("prune:ratio=1.5", "ratio must be in (0, 1)"),
        ("prune:target=blocks", "unknown target blocks"),
        ("prune:importance=fisher", "importance must be one of l2, l1, random"),
        ("prune:round_to=0", "round_to and min_keep must be >= 1"),
    ],
)
def test_bad_options_fail_in_one_line(spec, message):
    with pytest.raises(PassError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        rescompile.apply(build("residual_mlp").module, [spec], torch.randn(2, 16))
    assert "\n" not in str(info.value)


def test_target_the_model_lacks_fails_and_leaves_the_graph():
    graph = load(build("residual_mlp").module, torch.randn(2, 16))
    shapes = {v.name: v.shape for v in graph.values()}
    with pytest.raises(
        PassError, match=r"target=heads matches no prunable group; the model has prunable mlp"
    ) as info:
        PassManager([PrunePass(target="heads")])(graph)
    assert "\n" not in str(info.value)
    assert {v.name: v.shape for v in graph.values()} == shapes
