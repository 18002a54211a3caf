"""The Python API: inspect, apply, validate.

Models are ONNX for now: a path, an `onnx.ModelProto` or an `onnx_ir.Model`.
(nn.Module and .pt2 programs come with the torch frontend.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rescompile.analysis.residuals import ResidualAnalysis, ResidualSite, ResidualStream, find_residuals
from rescompile.errors import RescompileError
from rescompile.infra import PassBase, PassManager, PassResult, parse_spec
from rescompile.ir import Graph

__all__ = ["InspectReport", "load", "inspect", "apply", "validate", "build_passes", "run_passes"]

_TORCH_SUFFIXES = (".pt2", ".pt", ".pth")


def load(model: Any) -> Graph:
    """Import `model` into the IR (ONNX path, onnx.ModelProto or onnx_ir.Model)."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(_TORCH_SUFFIXES):
        raise RescompileError(f"{model}: torch programs are not supported yet; export to ONNX first")
    if type(model).__module__.startswith("torch"):
        raise RescompileError("nn.Module input is not supported yet; export the module to ONNX first")
    from rescompile.frontends.onnx import load_onnx
    return load_onnx(model)


@dataclasses.dataclass(frozen=True)
class InspectReport:
    """What `inspect` found: residual sites and streams, plus graph size."""

    analysis: ResidualAnalysis
    nodes: int
    params: int

    @property
    def residuals(self) -> tuple[ResidualSite, ...]:
        return self.analysis.sites

    @property
    def streams(self) -> tuple[ResidualStream, ...]:
        return self.analysis.streams

    def to_json(self) -> dict:
        return {**self.analysis.to_json(), "nodes": self.nodes, "params": self.params}


def _param_count(graph: Graph) -> int:
    from rescompile.ir import PARAM
    total = 0
    for value in graph.initializers.values():
        if value.role == PARAM:
            size = getattr(value.payload, "size", None)
            total += int(size) if size is not None else 0
    return total


def inspect(model: Any, example_inputs: Any = None, **_: Any) -> InspectReport:
    """Find the residual connections of `model`.

    Args:
        model: an ONNX path, onnx.ModelProto or onnx_ir.Model.
        example_inputs: unused for ONNX models (kept for the torch frontend).

    Returns:
        An `InspectReport` with `.residuals`, `.streams` and `.to_json()`.
    """
    graph = load(model)
    return InspectReport(find_residuals(graph), nodes=len(graph), params=_param_count(graph))


def build_passes(passes: Iterable[str | PassBase]) -> list[PassBase]:
    """Turn spec strings ("rezero", "rezero:init=0") and pass objects into passes."""
    from rescompile.passes import PASSES
    built = []
    for p in passes:
        built.append(parse_spec(p, PASSES) if isinstance(p, str) else p)
        if not isinstance(built[-1], PassBase):
            raise RescompileError(f"{p!r} is neither a pass spec string nor a pass object")
    return built


def run_passes(graph: Graph, passes: Sequence[PassBase], *, check: bool = True) -> PassResult:
    return PassManager(passes, check=check)(graph)


def apply(model: Any, passes: Iterable[str | PassBase] | str, example_inputs: Any = None,
          **_: Any):
    """Rewrite `model` with `passes` (applied in order).

    Returns:
        an `onnx.ModelProto` for ONNX input (path, ModelProto or onnx_ir.Model),
        with all weights in memory. To write large models, use the CLI's
        `apply -o`, which streams weights to an external data file.
    """
    import onnx_ir as ir

    from rescompile.frontends.onnx import export_model
    if isinstance(passes, (str, PassBase)):
        passes = [passes]
    built = build_passes(passes)
    graph = load(model)
    run_passes(graph, built)
    model = export_model(graph)
    # A ModelProto must be self-contained: pull weights kept in external files into memory.
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model)


def validate(original: Any, rewritten: Any, inputs: Any = None, *, atol: float = 1e-5,
             rtol: float = 0.0, dims: dict[str, int] | None = None, seed: int = 0):
    """Run both ONNX models in ONNX Runtime on the same inputs and compare outputs.

    Args:
        original, rewritten: paths, onnx.ModelProto objects or serialized bytes.
        inputs: a dict of input arrays; random inputs are drawn when omitted.

    Returns:
        a `ValidationResult` (per-output max abs/rel differences and `.ok`).
    """
    from rescompile.validation import ValidationResult, compare_onnx, diff, run_onnx
    a, b = _onnx_source(original), _onnx_source(rewritten)
    if inputs is None:
        return compare_onnx(a, b, atol=atol, rtol=rtol, dims=dims, seed=seed)
    ref, new = run_onnx(a, inputs), run_onnx(b, inputs)
    pairs = zip(ref, ref) if set(ref) == set(new) else zip(ref, new)
    return ValidationResult(tuple(diff(x, ref[x], new[y], atol, rtol) for x, y in pairs), atol, rtol, {})


def _onnx_source(model: Any) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise RescompileError(f"{model}: no such file")
        return str(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    raise RescompileError(f"cannot validate a {type(model).__name__}: pass a path or an onnx.ModelProto")
