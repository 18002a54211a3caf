"""The Python API: inspect, apply, validate, on ONNX models and on nn.Modules.

`apply` returns the kind of object it was given: an nn.Module for an
nn.Module (a trainable GraphModule keeping the original parameter names), an
`onnx.ModelProto` for an ONNX path, ModelProto or onnx_ir.Model. torch is
imported only when a torch model is involved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rescompile.analysis.residuals import ResidualAnalysis, ResidualSite, ResidualStream, find_residuals
from rescompile.errors import RescompileError
from rescompile.frontends.hf_folder import is_hf_folder
from rescompile.infra import PassBase, PassManager, PassResult
from rescompile.ir import PARAM, Graph
from rescompile.pipeline import build_passes, compile_model, is_torch_module, load, must_exist
from rescompile.validation import DEFAULT_ATOL, DEFAULT_RTOL

__all__ = [
    "InspectReport",
    "load",
    "inspect",
    "apply",
    "validate",
    "build_passes",
    "run_passes",
    "is_torch_module",
]


@dataclasses.dataclass(frozen=True)
class InspectReport:
    """What `inspect` found: residual sites and streams, plus graph size."""

    analysis: ResidualAnalysis
    nodes: int
    params: int
    importance: tuple | None = None  # UnitScore per depth unit, with `inspect(importance=...)`
    metric: str | None = None
    groups: Any = None  # GroupAnalysis (channel groups for pruning), with `inspect(groups=True)`

    @property
    def residuals(self) -> tuple[ResidualSite, ...]:
        return self.analysis.sites

    @property
    def streams(self) -> tuple[ResidualStream, ...]:
        return self.analysis.streams

    def to_json(self) -> dict:
        data = {**self.analysis.to_json(), "nodes": self.nodes, "params": self.params}
        if self.groups is not None:
            data.update(self.groups.to_json())
        if self.importance is not None:
            data["importance"] = {"metric": self.metric, "units": [s.to_json() for s in self.importance]}
        return data


def _numel(payload: Any) -> int:
    numel = getattr(payload, "numel", None)
    if callable(numel):  # torch.Tensor (its .size is a method)
        return int(numel())
    return int(getattr(payload, "size", 0) or 0)  # numpy array, onnx-ir tensor


def _param_count(graph: Graph) -> int:
    return sum(_numel(v.payload) for v in graph.initializers.values() if v.role == PARAM)


def inspect(
    model: Any,
    example_inputs: Any = None,
    *,
    importance: str | None = None,
    unit: str = "block",
    calibration: Any = None,
    groups: bool = False,
    **kw: Any,
) -> InspectReport:
    """Find the residual connections of `model`.

    Args:
        model: see `load`.
        example_inputs: needed for nn.Modules (tensor, tuple or dict of inputs).
        importance: also score every depth unit with this `drop` metric (bi, angular,
            greedy, norm; lower = removing it changes less) on `calibration` inputs.
        unit: "block" (a layer) or "branch", for `importance`.
        calibration: see `rescompile.pipeline.compile_model`; random inputs by default.
        groups: also list the channel groups `prune` works on (kind, size, unit, members,
            whether each is prunable and why not).
        **kw: `example_kwargs`, `trust_pickle`, `dynamic` (see `load`).

    Returns:
        An `InspectReport` with `.residuals`, `.streams`, `.importance` and `.to_json()`.
    """
    graph = load(model, example_inputs, **kw)
    analysis = find_residuals(graph)
    scores = None
    if importance is not None:
        from rescompile.analysis.importance import depth_units
        from rescompile.passes.drop import DropPass, unit_scores

        scorer = DropPass(unit=unit, metric=importance)
        scorer.calibration = calibration
        units = depth_units(analysis, unit)
        scores = tuple(unit_scores(units, importance, scorer.probe(graph), graph=graph)) if units else ()
    found = None
    if groups:
        from rescompile.analysis.groups import find_groups

        found = find_groups(graph)
    return InspectReport(
        analysis,
        nodes=len(graph),
        params=_param_count(graph),
        importance=scores,
        metric=importance,
        groups=found,
    )


def run_passes(graph: Graph, passes: Sequence[PassBase], *, check: bool = True) -> PassResult:
    return PassManager(passes, check=check)(graph)


def apply(model: Any, passes: Iterable[str | PassBase] | str, example_inputs: Any = None, **kw: Any):
    """Rewrite `model` with `passes` (applied in order).

    Args:
        model: see `load`.
        passes: spec strings ("rezero", "rezero:init=0,sites=depth:2-") or pass objects.
        example_inputs: needed for nn.Modules.
        **kw: `example_kwargs`, `trust_pickle`, `dynamic` (see `load`), and the
            pipeline's options (`rescompile.pipeline.compile_model`).

    Returns:
        an nn.Module (a trainable `torch.fx.GraphModule` whose original
        parameters keep their names; new ones live under `rescompile.<pass>.`)
        for torch input, an `onnx.ModelProto` with all weights in memory for
        ONNX input. To write large ONNX models use the CLI's `apply -o`, which
        streams weights to an external data file.
    """
    return compile_model(model, passes, example_inputs=example_inputs, **kw).output


def validate(
    original: Any,
    rewritten: Any,
    inputs: Any = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    dims: dict[str, int] | None = None,
    seed: int = 0,
):
    """Run both models on the same inputs and compare outputs.

    Outputs agree when |new - original| <= atol * max(1, max|original|) + rtol * |original|
    elementwise (see `rescompile.validation.Tolerance` for why these defaults).

    Args:
        original, rewritten: two nn.Modules or Hugging Face folders (compared in torch;
            a `.pt2` path beside a folder too), or two ONNX models as paths,
            onnx.ModelProto objects or bytes (compared in ONNX Runtime).
        inputs: for modules: a tensor, tuple or dict of inputs (required unless a
            folder gives its example inputs); for ONNX: a dict of arrays, random inputs
            when omitted.

    Returns:
        a `ValidationResult`: per-output max abs/rel differences and `.ok`.
    """
    from rescompile.validation import ValidationResult, compare_onnx, diff, run_onnx

    if is_hf_folder(original) or is_hf_folder(rewritten):
        original, rewritten, inputs = _open_folders(original, rewritten, inputs)
    if is_torch_module(original) or is_torch_module(rewritten):
        from rescompile.frontends.torch import compare_modules

        return compare_modules(original, rewritten, inputs, atol=atol, rtol=rtol)
    a, b = _onnx_source(original), _onnx_source(rewritten)
    if inputs is None:
        return compare_onnx(a, b, atol=atol, rtol=rtol, dims=dims, seed=seed)
    ref, new = run_onnx(a, inputs), run_onnx(b, inputs)
    pairs = zip(ref, ref) if set(ref) == set(new) else zip(ref, new)
    return ValidationResult(tuple(diff(x, ref[x], new[y], atol, rtol) for x, y in pairs), atol, rtol, {})


def _open_folders(original: Any, rewritten: Any, inputs: Any) -> tuple[Any, Any, Any]:
    """Folders as their models (and the first folder's example inputs), `.pt2` paths as modules."""
    from rescompile.frontends.hf_folder import load_folder

    models = []
    for model in (original, rewritten):
        if is_hf_folder(model):
            model, examples = load_folder(model)
            inputs = examples if inputs is None else inputs
        elif isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".pt2":
            from rescompile.frontends.torch import export_module

            model = export_module(load(model))
        elif not is_torch_module(model):
            raise RescompileError(
                f"cannot compare a Hugging Face folder with {model}: give a folder, a .pt2 or an nn.Module"
            )
        models.append(model)
    return models[0], models[1], inputs


def _onnx_source(model: Any) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        must_exist(Path(model))
        return str(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    raise RescompileError(f"cannot validate a {type(model).__name__}: pass a path or an onnx.ModelProto")
