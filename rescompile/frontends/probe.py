"""Run an IR graph on calibration inputs and read values inside it.

Importance metrics (block influence, angular distance, activation scores) need the values a
model computes inside, on real or random inputs. The graph runs where it came from: ONNX
graphs in ONNX Runtime (a fresh model built from the IR, the probed values added as
outputs), torch graphs in torch (an fx Interpreter over the exported GraphModule that keeps
the probed nodes' results). The IR itself is never modified, so a pass can probe in the
middle of its transaction. `bypass` runs a variant of the graph where readers of a value
read another one instead (a residual branch switched off), without building it.

Calibration batches are a list of inputs, each a tuple (positional, in the graph's input
order) or a dict (by input name). Without user data, random batches are drawn from the
graph's input signature: integer inputs read by an embedding get ids within its rows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rescompile.errors import RescompileError
from rescompile.frontends import is_torch_graph
from rescompile.ir import Graph, Value

__all__ = [
    "Batch",
    "attention_mask",
    "calibration_batches",
    "gradients",
    "load_calibration",
    "prepare",
    "probe",
]

logger = logging.getLogger("rescompile")

Batch = tuple | dict
RANDOM_WARNING = "scores from random inputs are weak; pass calibration data (--calibration FILE)"


def load_calibration(path: str | os.PathLike) -> list[Batch]:
    """Read a calibration file: a `torch.save`d list of batches (tuples or dicts of tensors),
    or an `.npz` whose arrays are named after the model's inputs (one batch).

    Raises:
        RescompileError: the file is missing or holds something else.
    """
    path = Path(path)
    if not path.is_file():
        raise RescompileError(f"calibration file {path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return [{k: data[k] for k in data.files}]
        except Exception as exc:
            raise RescompileError(f"calibration file {path}: not a readable .npz ({exc})") from exc
    import torch

    try:
        batches = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RescompileError(f"calibration file {path}: cannot read it with torch.load ({first})") from exc
    if isinstance(batches, (tuple, dict)) or hasattr(batches, "shape"):
        batches = [batches]
    if not isinstance(batches, list) or not batches:
        raise RescompileError(
            f"calibration file {path}: expected a non-empty list of batches (tuples or dicts of "
            f"tensors), found {type(batches).__name__}"
        )
    return [b if isinstance(b, (tuple, dict)) else (b,) for b in batches]


def calibration_batches(
    graph: Graph, calibration: Sequence[Batch] | str | os.PathLike | None, *, count: int = 4, seed: int = 0
) -> list[Batch]:
    """The batches importance metrics run on: the user's (a list, or a file to load), else
    `count` random batches drawn from the graph's inputs, with one warning."""
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_calibration(calibration)
    if calibration is not None:
        batches = list(calibration)
        if not batches:
            raise RescompileError("the calibration data is empty")
        return batches
    logger.warning(RANDOM_WARNING)
    if is_torch_graph(graph):
        return _random_torch_batches(graph, count, seed)
    return [_random_onnx_batch(graph, seed + i) for i in range(count)]


def _random_torch_batches(graph: Graph, count: int, seed: int) -> list[Batch]:
    """The example inputs, then `count - 1` random draws like them (same shapes and dtypes;
    integer tensors within the example's range, 0/1 tensors such as masks kept as they are)."""
    import torch

    from rescompile.frontends.torch import example_inputs_of

    args, kwargs = example_inputs_of(graph)
    gen = torch.Generator().manual_seed(seed)

    def draw(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        if x.dtype == torch.bool or x.numel() == 0 or int(x.max()) <= 1:
            return x.clone()
        return torch.randint(int(x.min()), int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype)

    batches: list[Batch] = [(args, kwargs)]
    for _ in range(count - 1):
        batches.append((tuple(draw(a) for a in args), {k: draw(v) for k, v in kwargs.items()}))
    return [_TorchCall((a, k)) for a, k in batches]


class _TorchCall(tuple):
    """A torch batch with keyword inputs: (args, kwargs)."""


def _embedding_rows(graph: Graph, value: Value) -> int | None:
    """Rows of the embedding table an integer input indexes, if it feeds a Gather of one."""
    for node in value.consumers():
        if node.op_type == "Gather" and node.inputs[1] is value and node.inputs[0].shape:
            rows = node.inputs[0].shape[0]
            if isinstance(rows, int):
                return rows
    return None


def _random_onnx_batch(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for value in graph.inputs:
        shape = tuple(
            d if isinstance(d, int) else (8 if "seq" in str(d).lower() else 2) for d in value.shape or ()
        )
        dtype = np.dtype(value.dtype or "float32")
        if dtype == np.bool_:
            batch[value.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            rows = _embedding_rows(graph, value)
            if rows is None or "mask" in value.name.lower():
                batch[value.name] = np.ones(shape, dtype=dtype)
            else:
                batch[value.name] = rng.integers(0, rows, size=shape).astype(dtype)
        else:
            batch[value.name] = rng.standard_normal(shape).astype(dtype)
    return batch


def attention_mask(batch: Batch) -> np.ndarray | None:
    """The batch's `attention_mask` (a dict by name, or a torch (args, kwargs) call) as numpy, if
    it has one: passes leave padding tokens out of their per-token statistics."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict):
        batch = batch[1]  # torch (args, kwargs)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return None
    return np.asarray(mask.numpy() if hasattr(mask, "numpy") else mask)


def probe(
    graph: Graph,
    batches: Sequence[Batch],
    values: Sequence[Value],
    *,
    bypass: Mapping[Value, Value] | None = None,
) -> Iterator[list[np.ndarray]]:
    """For each batch, the arrays of `values` (float32 numpy), computed by running the graph.

    Args:
        bypass: value -> value: nodes that read a key read its value instead, and a key that
            is a model output takes the value (the key's own producer still runs).
    """
    yield from prepare(graph, values, bypass=bypass)(batches)


def prepare(
    graph: Graph, values: Sequence[Value], *, bypass: Mapping[Value, Value] | None = None
) -> Callable[[Sequence[Batch]], Iterator[list[np.ndarray]]]:
    """`probe` in two steps: the runnable is built now (the module exported, or the ONNX Runtime
    session made) from the graph as it is, and `run(batches)` runs it later. A pass can prepare
    the graph before a change and after it, and then run both on each batch side by side (prune
    fits a pruned layer's output to the original's on the same batch)."""
    bypass = dict(bypass or {})
    values = [bypass.get(v, v) for v in values]  # what the variant computes in their place
    if is_torch_graph(graph):
        return _prepare_torch(graph, values, bypass)
    return _prepare_onnx(graph, values, bypass)


def _prepare_torch(graph, values, bypass) -> Callable[[Sequence[Batch]], Iterator[list[np.ndarray]]]:
    """Export the module once, then edit its fx graph: a recording call after each probed node,
    and readers of a bypassed node re-pointed. The module is then called as the user would."""
    import torch

    from rescompile.frontends.torch import export_module, normalize_example_inputs

    module = export_module(graph).eval()
    nodes = {n.name: n for n in module.graph.nodes}

    def fx_node(value: Value):
        node = value.producer
        if node is None:  # a graph input: the placeholder of the same position
            name = graph.source.placeholders[list(graph.inputs).index(value)]
        else:
            name = value.name if node.attrs.get("returns_tuple") else node.name
        if name not in nodes:  # fx makes names identifiers: "prune/fc2/bias" -> "prune_fc2_bias"
            name = re.sub(r"[^0-9a-zA-Z_]+", "_", name)
            name = f"_{name}" if name[:1].isdigit() else name
        if name not in nodes:
            raise RescompileError(f"cannot probe {value.name!r}: the exported module does not compute it")
        return nodes[name]

    found: dict[int, Any] = {}

    def record(index: int, tensor: Any) -> None:
        found[index] = tensor

    for old, new in bypass.items():
        fx_node(old).replace_all_uses_with(fx_node(new))
    for index, value in enumerate(values):
        node = fx_node(value)
        with module.graph.inserting_after(node):
            module.graph.call_function(record, (index, node))
    module.recompile()

    def run(batches: Sequence[Batch]) -> Iterator[list[np.ndarray]]:
        # no_grad around the call only, never across a yield: a suspended generator would leave
        # grad mode off for its caller, and two run side by side restore it in the wrong order
        # (grad mode stayed off after prune's refit; the fuzzer's backward check found it).
        for batch in batches:
            args, kwargs = batch if isinstance(batch, _TorchCall) else normalize_example_inputs(batch, None)
            found.clear()
            with torch.no_grad():
                module(*args, **kwargs)
            yield [found[i].detach().float().numpy() for i in range(len(values))]

    return run


def _prepare_onnx(graph, values, bypass) -> Callable[[Sequence[Batch]], Iterator[list[np.ndarray]]]:
    """A fresh onnx-ir model of the graph (the input model is not touched), the probed values
    added as outputs and bypassed values re-pointed, run in ONNX Runtime."""
    import onnx_ir as ir

    from rescompile.frontends._onnx_common import OnnxSource
    from rescompile.frontends._onnx_export import _build
    from rescompile.validation import _session

    source = graph.source if isinstance(graph.source, OnnxSource) else None
    if source is None:
        source = OnnxSource(ir_version=10, opset_imports={"": 18}, producer_name="rescompile")
    model = _build(graph, source)
    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update(model.graph.initializers)
    for node in model.graph:
        by_name.update({out.name: out for out in node.outputs})
    for old, new in bypass.items():
        by_name[old.name].replace_all_uses_with(by_name[new.name])
    names = [v.name for v in model.graph.outputs]
    extra = [by_name[v.name] for v in values if v.name not in names]
    model.graph.outputs.extend(dict.fromkeys(extra))
    ir.external_data.load_to_model(model)
    session = _session(ir.serde.serialize_model(model).SerializeToString())
    wanted = [v.name for v in values]
    inputs = [v.name for v in graph.inputs]

    def run(batches: Sequence[Batch]) -> Iterator[list[np.ndarray]]:
        for batch in batches:
            feeds = dict(batch) if isinstance(batch, Mapping) else dict(zip(inputs, batch))
            feeds = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in feeds.items()}
            missing = [name for name in inputs if name not in feeds]
            if missing:
                raise RescompileError(f"the calibration batch lacks the model input {missing[0]!r}")
            arrays = session.run(wanted, {k: v for k, v in feeds.items() if k in inputs})
            yield [np.asarray(a, dtype=np.float32) for a in arrays]

    return run


def gradients(graph: Graph, batches: Sequence[Batch], names: Sequence[str]) -> dict[str, np.ndarray]:
    """dL/dw of the parameters `names`, summed over `batches` (float64 numpy). L is the model's own
    loss where its output has one (an HF model given `labels`), else the sum of squares of its
    float outputs. The model's tensors and their `.grad` are left as they were.

    Raises:
        RescompileError: the graph did not come from torch.
    """
    if not is_torch_graph(graph):
        raise RescompileError("gradients need the torch model; an ONNX graph has none here")
    import torch
    from torch.utils._pytree import tree_leaves

    from rescompile.frontends.torch import export_module, normalize_example_inputs

    module = export_module(graph).eval()
    params = dict(module.named_parameters())
    tensors = [params[name] for name in names]
    frozen = [t for t in tensors if not t.requires_grad]
    total = [torch.zeros(t.shape, dtype=torch.float64) for t in tensors]
    try:
        for t in frozen:
            t.requires_grad_(True)
        # Callers often run passes under torch.no_grad() (inference code): gradients need it on.
        with torch.enable_grad():
            for batch in batches:
                torch_call = isinstance(batch, _TorchCall)
                args, kwargs = batch if torch_call else normalize_example_inputs(batch, None)
                out = module(*args, **kwargs)
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    leaves = [
                        x for x in tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()
                    ]
                    loss = sum((x.float() ** 2).sum() for x in leaves)
                for acc, grad in zip(total, torch.autograd.grad(loss, tensors, allow_unused=True)):
                    if grad is not None:
                        acc += grad.detach().double()
    finally:
        for t in frozen:
            t.requires_grad_(False)
    return {name: acc.numpy() for name, acc in zip(names, total)}
