"""prune on Hugging Face models and across architectures; the reference is always the original
model with every slice the plan removes zeroed.

- Uniform pruning of an HF model gives the model's own class with a narrowed config (GPT-2's
  Conv1D and n_inner, BERT, LLaMA's heads under GQA with head_dim kept); save_pretrained then
  from_pretrained reloads it with the same outputs.
- Widths no config says (GPT-2 and BERT heads: their head_dim is hidden / heads) and non-uniform
  pruning give a GraphModule.
- CNNs, vision transformers, MLP-Mixer and T5: the pruned model runs, is smaller, and equals the
  zeroed original.
"""

from __future__ import annotations

import copy
import logging

import onnx
import pytest
import torch
from onnx import numpy_helper

import rescompile
from passes.prune import PrunePass
from rescompile.pipeline import load
from rescompile.validation import Tolerance, assert_close, assert_ok, compare_onnx
from tools.models import ModelCase, bert, build, export_onnx, gpt2, llama

EXACT = Tolerance(1e-5, 1e-4)


def first(out) -> torch.Tensor:
    """The main output: a tensor, the first of a tuple, or an HF output's last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def zeroed_original(module, graph, spec: dict) -> torch.nn.Module:
    """A copy of `module` with every parameter and buffer slice that `prune` removes set to zero."""
    plan = PrunePass(**spec).plan(graph)
    cut = {v.name: axes for v, axes in plan.removed_slices().items() if v.is_initializer}
    assert cut, "the plan removes nothing"
    zeroed = copy.deepcopy(module)
    state = dict(zeroed.named_parameters()) | dict(zeroed.named_buffers())
    with torch.no_grad():
        for name, axes in cut.items():
            for axis, indices in axes.items():
                state[name].data[(slice(None),) * axis + (indices,)] = 0
    return zeroed


def assert_pruned_equals_zeroed(module, args, kwargs, spec: dict, *, from_module: bool = False):
    """Prune, and compare with the zeroed original. `from_module`: hand `rescompile.apply` the module
    (so that an HF model may come back as its class), else the graph already captured (faster)."""
    graph = load(module, args or None, example_kwargs=kwargs, dynamic=False)
    zeroed = zeroed_original(module, graph, spec)
    text = "prune:" + ",".join(f"{k}={str(v).lower()}" for k, v in spec.items())
    source = copy.deepcopy(module) if from_module else graph
    pruned = rescompile.apply(source, [text], args or None, example_kwargs=kwargs, dynamic=False)
    with torch.no_grad():
        got, want, original = (first(m(*args, **kwargs)) for m in (pruned, zeroed, module))
    assert_close(got, want, EXACT)
    assert (got - original).abs().max() > 1e-3 * original.abs().max()  # the zeroed slices mattered
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in module.parameters())
    return pruned


# ----- Hugging Face output ------------------------------------------------------------------------
HF = {
    # name: (builder, spec, config after pruning)
    "gpt2": (gpt2, {"ratio": 0.3, "uniform": True}, {"n_inner": 90, "n_head": 2}),  # Conv1D MLP
    "bert": (bert, {"ratio": 0.3, "uniform": True}, {"intermediate_size": 45, "num_attention_heads": 2}),
    "llama": (  # a key/value head with its two query heads, head_dim kept
        llama,
        {"ratio": 0.5, "uniform": True},
        {"intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
    ),
}


@pytest.mark.parametrize("name", list(HF))
def test_uniform_prune_gives_the_hf_class_and_round_trips(name, tmp_path):
    builder, spec, config = HF[name]
    case = builder()
    pruned = assert_pruned_equals_zeroed(case.module, case.args, case.kwargs, spec, from_module=True)
    assert type(pruned) is type(case.module)
    assert {k: getattr(pruned.config, k) for k in config} == config
    pruned.save_pretrained(tmp_path)
    init = {"add_pooling_layer": False} if name == "bert" else {}  # as tools.models builds it
    reloaded = type(case.module).from_pretrained(tmp_path, **init).eval()
    assert {k: getattr(reloaded.config, k) for k in config} == config
    with torch.no_grad():
        assert_close(first(reloaded(**case.kwargs)), first(pruned(**case.kwargs)), EXACT)


@pytest.mark.parametrize(("name", "param"), [("gpt2", "h.0.attn.c_attn.weight"), ("bert", "query.weight")])
def test_heads_no_config_can_say_give_a_graph_module(name, param):
    """GPT2Config and BertConfig derive head_dim = hidden / heads: fewer heads of the same size
    is no config of theirs, so the pruned model comes back as a GraphModule, with the reason."""
    case = HF[name][0]()
    warnings = Recorded()
    logging.getLogger("rescompile").addHandler(warnings)
    try:
        spec = {"ratio": 0.5, "uniform": True}
        pruned = assert_pruned_equals_zeroed(case.module, case.args, case.kwargs, spec, from_module=True)
    finally:
        logging.getLogger("rescompile").removeHandler(warnings)
    assert isinstance(pruned, torch.fx.GraphModule)
    assert any("returning a GraphModule" in m and param in m for m in warnings.messages), warnings.messages


class Recorded(logging.Handler):
    """The warnings the pipeline logs (the suite runs with pytest's logging plugin off)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_non_uniform_prune_gives_a_graph_module():
    case = llama()
    pruned = assert_pruned_equals_zeroed(
        case.module, case.args, case.kwargs, {"ratio": 0.3}, from_module=True
    )
    assert isinstance(pruned, torch.fx.GraphModule)


# ----- architectures ------------------------------------------------------------------------------
def architecture(name: str):
    """(module, args, kwargs): tiny random-weight models from torchvision, timm and transformers."""
    torch.manual_seed(0)
    image = (torch.randn(1, 3, 32, 32),)
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        blocks = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]
        return ConvNeXt(blocks, num_classes=10).eval(), image, {}
    if name == "densenet":
        from torchvision.models import DenseNet

        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
        return model.eval(), image, {}
    if name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        model = MlpMixer(num_classes=10, img_size=32, patch_size=8, embed_dim=32, num_blocks=2)
        return model.eval(), image, {}
    if name == "t5":
        import transformers as T

        cfg = T.T5Config(
            vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False
        )
        ids = torch.randint(0, 101, (2, 8))
        return T.T5Model(cfg).eval(), (), {"input_ids": ids, "decoder_input_ids": ids}
    case = build(name)
    return case.module, case.args, case.kwargs


ARCHITECTURES = {
    # name: prune options (global ratio unless a known limit of the groups needs otherwise)
    "resnet50": {"ratio": 0.3},  # HF ResNet with ResNet-50's bottleneck layout
    "tv_regnet": {"ratio": 0.3},  # grouped convs, squeeze-excite
    "convnext": {"ratio": 0.3},  # depthwise 7x7, layer scale
    "densenet": {"ratio": 0.3, "importance": "random"},  # concatenation (l2: see below)
    "tv_swin": {"ratio": 0.3},  # shifted windows
    "mixer": {"ratio": 0.3},  # token- and channel-mixing MLPs
    "cait": {"ratio": 0.3},  # class attention, talking heads
    "t5": {"ratio": 0.3, "target": "mlp"},  # relative position bias
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_pruned_architecture_equals_zeroed_original(name):
    module, args, kwargs = architecture(name)
    assert_pruned_equals_zeroed(wake(module), args, kwargs, ARCHITECTURES[name])


def wake(module: torch.nn.Module) -> torch.nn.Module:
    """Random values for parameters an init leaves (near) zero: MLP-Mixer's zero head, ConvNeXt's and
    CaiT's layer scales of 1e-6 and 1e-5. Else the pruned slices hardly move the output, and the
    comparison with the zeroed original could not fail."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().max() < 1e-3:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return module


@pytest.mark.parametrize("name", ["tv_regnet", "convnext", "densenet", "mixer"])
def test_pruned_onnx_architecture_equals_zeroed_original(name, tmp_path):
    """The ONNX path on the same models (the legacy exporter: a second or less each)."""
    module, args, kwargs = architecture(name)
    path = export_onnx(
        ModelCase(name, wake(module), args, kwargs, sites=0), tmp_path / "m.onnx", exporter="legacy"
    )
    spec = ARCHITECTURES[name]
    graph = load(str(path))
    plan = PrunePass(**spec).plan(graph)
    cut = {v.name: axes for v, axes in plan.removed_slices().items() if v.is_initializer}
    assert cut, "the plan removes nothing"
    pruned = rescompile.apply(graph, ["prune:" + ",".join(f"{k}={v}" for k, v in spec.items())])
    onnx.checker.check_model(pruned)
    zeroed = onnx.load(str(path))
    for init in zeroed.graph.initializer:
        if init.name in cut:
            array = numpy_helper.to_array(init).copy()
            for axis, indices in cut[init.name].items():
                array[(slice(None),) * axis + (indices,)] = 0
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    pruned_bytes = pruned.SerializeToString()
    assert_ok(compare_onnx(zeroed.SerializeToString(), pruned_bytes, atol=EXACT.atol, rtol=EXACT.rtol))
    assert not compare_onnx(str(path), pruned_bytes, atol=EXACT.atol, rtol=EXACT.rtol).ok
    size = sum(init.ByteSize() for init in pruned.graph.initializer)
    assert size < sum(init.ByteSize() for init in zeroed.graph.initializer)


FORMER_LIMITS = {
    # the floor (min_keep) once held per group, not per member: with l2 the last dense layer's 8
    # channels score lowest in the concatenated group (fewest readers) and all went, leaving a conv
    # with 0 output channels. Each member now keeps min_keep of its own units.
    "densenet": {"ratio": 0.3},
    # scaled_dot_product_attention once mapped no axis of attn_mask, so T5's relative position bias
    # [1, heads, L, S] was not joined with the heads it is added to. Its axes are mapped now.
    "t5": {"ratio": 0.3, "target": "heads"},
}


@pytest.mark.parametrize("name", list(FORMER_LIMITS))
def test_former_limits_are_exact(name):
    module, args, kwargs = architecture(name)
    assert_pruned_equals_zeroed(module, args, kwargs, FORMER_LIMITS[name])
