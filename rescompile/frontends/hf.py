"""Hugging Face models out: the rewritten graph as the input's own model class, when it still is one.

Some rewrites leave a model its class describes with a different config: whole layers removed
(`drop` with unit=block), every layer narrowed alike (`prune` with uniform=true) or weights changed
in place. Then users want a `PreTrainedModel` that `save_pretrained` writes and `from_pretrained`
reloads, not a GraphModule. `rebuild` makes one: it reads which numbered layers of each
`nn.ModuleList` the graph still has and updates the layer count (and any per-layer config lists);
where parameter shapes shrank it finds the width keys that say the new shapes (`_widths`), builds
the class from that config and loads the graph's weights under renumbered names. The caller checks
that it computes what the graph does; anything the graph changed beyond that (new parameters,
shapes no config of the class gives) is refused with a reason.
"""

from __future__ import annotations

import copy
import sys
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from rescompile.errors import RescompileError
from rescompile.ir import Graph

__all__ = ["is_hf_model", "rebuild", "NotSameClass"]


class NotSameClass(RescompileError):
    """The rewritten graph is no longer the input's model class with another config."""


def is_hf_model(model: Any) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _graph_tensors(graph: Graph) -> dict[str, Any]:
    return {name: value.payload for name, value in graph.initializers.items()}


def _layer_lists(model: nn.Module, names: set[str]) -> dict[str, list[int]]:
    """For each ModuleList of numbered layers: the indices the graph still has weights of."""
    kept = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        indices = []
        for i, layer in enumerate(module):
            prefix = f"{path}.{i}."
            own = [prefix + n for n, _ in layer.named_parameters()]
            present = [n for n in own if n in names]
            if present and len(present) != len(own):
                missing = next(n for n in own if n not in names)
                raise NotSameClass(f"layer {path}.{i} lost some weights ({missing}) but not all")
            if present or not own:
                indices.append(i)
        if len(indices) != len(module):
            kept[path] = indices
    return kept


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def rebuild(model: nn.Module, graph: Graph) -> nn.Module:
    """A copy of `model` holding the graph's weights, with removed layers gone (from the layer
    list, the config and the layers' `layer_idx`) and narrowed widths in its config.

    A copy rather than `type(model)(config)`: constructor arguments outside the config
    (`add_pooling_layer=False`) must survive. Where widths changed, the copy's top-level
    submodules holding a changed parameter are replaced by those of the class built from the
    new config (their constructor arguments come from the class's own code).

    Raises:
        NotSameClass: the graph has parameters the class does not (a pass added some),
            shapes no config of the class gives, or removed part of a layer.
    """
    tensors = _graph_tensors(graph)
    state = model.state_dict()
    names = set(tensors)
    extra = sorted(n for n in names if n not in state and graph.initializers[n].role == "param")
    if extra:
        raise NotSameClass(f"the rewrite added parameters the model class lacks ({extra[0]})")
    kept = _layer_lists(model, names)
    if len(kept) > 1:
        raise NotSameClass(f"layers were removed from {len(kept)} layer lists ({', '.join(kept)})")
    rebuilt = copy.deepcopy(model)
    renumber: dict[str, str] = {}
    if kept:
        ((path, indices),) = kept.items()
        layers = rebuilt.get_submodule(path)
        _update_config(rebuilt.config, len(layers), indices)
        parent, _, attr = path.rpartition(".")
        setattr(
            rebuilt.get_submodule(parent) if parent else rebuilt,
            attr,
            nn.ModuleList(layers[i] for i in indices),
        )
        for new, old in enumerate(indices):
            renumber[f"{path}.{new}."] = f"{path}.{old}."
            for sub in layers[old].modules():
                if isinstance(getattr(sub, "layer_idx", None), int):  # KV-cache slot of the layer
                    sub.layer_idx = new

    def source_name(key: str) -> str:
        return next((o + key[len(n) :] for n, o in renumber.items() if key.startswith(n)), key)

    shapes = {
        key: tuple(tensors[source_name(key)].shape)
        for key in rebuilt.state_dict()
        if source_name(key) in tensors
    }
    if any(shapes[k] != tuple(t.shape) for k, t in rebuilt.state_dict().items() if k in shapes):
        _resize(rebuilt, shapes)
    with torch.no_grad():
        entries = rebuilt.state_dict()
        # The original's values first (buffers and tied or unused weights the graph lacks, also in
        # replaced submodules), then the graph's: a tied weight gets the graph's value.
        for key, tensor in entries.items():
            source = state.get(source_name(key))
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
        for key, tensor in entries.items():
            source = tensors.get(source_name(key))
            if source is None:
                continue  # tied weights and buffers the graph keeps once or as constants
            source = source if isinstance(source, torch.Tensor) else torch.as_tensor(_numpy(source))
            if tuple(source.shape) != tuple(tensor.shape):
                raise NotSameClass(
                    f"{source_name(key)} has shape {tuple(source.shape)}, the model {tuple(tensor.shape)}"
                )
            tensor.copy_(source)
    return rebuilt


# Config keys that set a width, MLP first: where another key's default derives from one
# (GPT-2's n_inner=None is 4 * n_embd) it is set first, so the later keys no longer move it.
# head_dim is not among them: where the config keeps it, it stays.
_WIDTH_KEYS = (
    "intermediate_size",
    "n_inner",
    "d_ff",
    "num_attention_heads",
    "n_head",
    "num_heads",
    "num_key_value_heads",
    "hidden_size",
    "n_embd",
    "d_model",
)


def _resize(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Set the width keys of `model.config` (in place) that give the parameters `shapes`, and
    replace the top-level submodules whose parameters changed by those of the class built so."""
    config = model.config
    for key, value in _widths(type(model), config, shapes).items():
        setattr(config, key, value)
    if hasattr(config, "validate"):  # strict configs (transformers 5) refuse to reload otherwise
        try:
            config.validate()
        except Exception as exc:  # huggingface_hub's StrictDataclassError and plain ValueErrors
            reason = str(exc).splitlines()[-1].strip()
            raise NotSameClass(f"the narrowed config is invalid: {reason}") from exc
    fresh = type(model)(config)
    for name, child in list(model.named_children()):
        own = child.state_dict(prefix=f"{name}.")
        if all(shapes.get(k, tuple(t.shape)) == tuple(t.shape) for k, t in own.items()):
            continue
        new = getattr(fresh, name, None)
        if not isinstance(new, nn.Module):
            raise NotSameClass(f"{type(model).__name__} built from its config has no {name}")
        like = next(child.parameters())
        setattr(model, name, new.to(like.device, like.dtype).train(child.training))


def _widths(cls: type, config: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The width keys' values under which `cls` has the parameter `shapes`.

    Which axes a key sets, and how, is read off the class: it is built on the meta device with the
    key at two values; an axis that differs is linear in the key, so the shape the graph has gives
    the key's value. A key is set when every axis it moves agrees on one value.
    """
    updates: dict[str, int] = {}
    for key in _WIDTH_KEYS:
        if key not in vars(config):
            continue
        value = getattr(config, key)
        if value is None:
            points = (1, 2)  # derived from another key until set
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            points = (value, 2 * value)
        else:
            continue
        low, high = (_meta_shapes(cls, config, {**updates, key: p}) for p in points)
        if low is None or high is None:
            continue
        found = set()
        for name, a in low.items():
            b = high.get(name)
            if name not in shapes or b is None or len(a) != len(b) or len(a) != len(shapes[name]):
                continue
            for x, y, want in zip(a, b, shapes[name]):
                if x != y:
                    found.add(points[0] + Fraction((want - x) * (points[1] - points[0]), y - x))
        if len(found) == 1 and (solved := found.pop()).denominator == 1 and solved > 0 and solved != value:
            updates[key] = int(solved)
    built = _meta_shapes(cls, config, updates) or {}
    for name, want in shapes.items():
        if name in built and built[name] != want:
            raise NotSameClass(
                f"no {type(config).__name__} gives {name} the shape {want} "
                f"(with {updates or 'its widths'} it has {built[name]})"
            )
    return updates


def _meta_shapes(cls: type, config: Any, updates: dict[str, int]) -> dict[str, tuple[int, ...]] | None:
    """Parameter and buffer shapes of `cls` built from `config` with `updates`, on the meta device
    (no memory, no initialisation); None where the class refuses those values."""
    probe = copy.deepcopy(config)
    for key, value in updates.items():
        setattr(probe, key, value)
    try:
        with torch.device("meta"):
            return {k: tuple(t.shape) for k, t in cls(probe).state_dict().items()}
    except Exception:  # a class refuses widths with any error (ValueError, AssertionError, ...)
        return None


def _update_config(config: Any, before: int, after: list[int]) -> None:
    """Set the layer count (and any per-layer lists such as `layer_types`) in place: the
    model's modules may hold the same config object."""
    keys = [k for k in _LAYER_COUNT_KEYS if getattr(config, k, None) == before]
    if not keys:
        raise NotSameClass(f"the config has no layer count equal to {before} to update")
    for key in keys:
        setattr(config, key, len(after))
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == before and key != "architectures":
            setattr(config, key, [value[i] for i in after])


def _numpy(payload: Any):
    import numpy as np

    return np.array(payload.numpy() if hasattr(payload, "numpy") else payload)
