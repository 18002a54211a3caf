"""Hugging Face models out: the rewritten graph as the input's own model class, when it still is one.

Some rewrites leave a model its class describes with a different config: whole layers removed
(`drop` with unit=block) or weights changed in place. Then users want a `PreTrainedModel` that
`save_pretrained` writes and `from_pretrained` reloads, not a GraphModule. `rebuild` makes one:
it reads which numbered layers of each `nn.ModuleList` the graph still has, builds the class
from the config with the layer count (and any per-layer config lists) updated, and loads the
graph's weights under renumbered names. The caller checks that it computes what the graph does;
anything the graph changed beyond that (new parameters, other shapes) is refused with a reason.
"""

from __future__ import annotations

import copy
import sys
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
    list, the config and the layers' `layer_idx`).

    A copy rather than `type(model)(config)`: constructor arguments outside the config
    (`add_pooling_layer=False`) must survive.

    Raises:
        NotSameClass: the graph has parameters the class does not (a pass added some),
            changed a shape, or removed part of a layer.
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
    with torch.no_grad():
        for key, tensor in rebuilt.state_dict().items():
            old = next((o + key[len(n) :] for n, o in renumber.items() if key.startswith(n)), key)
            source = tensors.get(old)
            if source is None:
                continue  # tied weights and buffers the graph keeps once or as constants
            source = source if isinstance(source, torch.Tensor) else torch.as_tensor(_numpy(source))
            if tuple(source.shape) != tuple(tensor.shape):
                raise NotSameClass(f"{old} has shape {tuple(source.shape)}, the model {tuple(tensor.shape)}")
            tensor.copy_(source)
    return rebuilt


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
