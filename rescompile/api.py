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
from rescompile.infra import PassBase, PassManager, PassResult, parse_spec
from rescompile.ir import PARAM, Graph

__all__ = ["InspectReport", "load", "inspect", "apply", "validate", "build_passes", "run_passes",
           "is_torch_module"]

PT2_SUFFIX = ".pt2"
PICKLE_SUFFIXES = (".pt", ".pth")


def is_torch_module(model: Any) -> bool:
    """True for nn.Module instances, without importing torch for other objects."""
    return any(c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module"
               for c in type(model).__mro__)


def load(model: Any, example_inputs: Any = None, *, example_kwargs: dict | None = None,
         trust_pickle: bool = False, dynamic: bool = True) -> Graph:
    """Import `model` into the IR.

    Args:
        model: an nn.Module, a `.pt2` path (torch.export.save), a `.pt`/`.pth`
            path holding a pickled module (only with `trust_pickle`), an ONNX
            path, an onnx.ModelProto or an onnx_ir.Model.
        example_inputs: for an nn.Module or a pickled module: a tensor, a tuple of
            positional inputs or a dict of keyword inputs.
        trust_pickle: allow unpickling a `.pt`/`.pth` file (unpickling runs code).
        dynamic: capture modules with dynamic dims where the model allows (the
            result then accepts other batch sizes and lengths); False captures
            the example shapes only, which is faster.
    """
    if isinstance(model, Graph):
        return model
    if is_torch_module(model):
        from rescompile.frontends.torch import import_module
        return import_module(model, example_inputs, example_kwargs, dynamic=dynamic)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix == PT2_SUFFIX:
            from rescompile.frontends.torch import load_pt2
            _must_exist(path)
            return load_pt2(path)
        if path.suffix in PICKLE_SUFFIXES:
            from rescompile.frontends.torch import import_module, load_pickled_module
            module = load_pickled_module(path, trust_pickle=trust_pickle)
            return import_module(module, example_inputs, example_kwargs, dynamic=dynamic)
    from rescompile.frontends.onnx import load_onnx
    return load_onnx(model)


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise RescompileError(f"{path}: no such file")


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


def _numel(payload: Any) -> int:
    numel = getattr(payload, "numel", None)
    if callable(numel):  # torch.Tensor (its .size is a method)
        return int(numel())
    return int(getattr(payload, "size", 0) or 0)  # numpy array, onnx-ir tensor


def _param_count(graph: Graph) -> int:
    return sum(_numel(v.payload) for v in graph.initializers.values() if v.role == PARAM)


def inspect(model: Any, example_inputs: Any = None, **kw: Any) -> InspectReport:
    """Find the residual connections of `model`.

    Args:
        model: see `load`.
        example_inputs: needed for nn.Modules (tensor, tuple or dict of inputs).
        **kw: `example_kwargs`, `trust_pickle`, `dynamic` (see `load`).

    Returns:
        An `InspectReport` with `.residuals`, `.streams` and `.to_json()`.
    """
    graph = load(model, example_inputs, **kw)
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


def apply(model: Any, passes: Iterable[str | PassBase] | str, example_inputs: Any = None, **kw: Any):
    """Rewrite `model` with `passes` (applied in order).

    Args:
        model: see `load`.
        passes: spec strings ("rezero", "rezero:init=0,sites=depth:2-") or pass objects.
        example_inputs: needed for nn.Modules.
        **kw: `example_kwargs`, `trust_pickle`, `dynamic` (see `load`).

    Returns:
        an nn.Module (a trainable `torch.fx.GraphModule` whose original
        parameters keep their names; new ones live under `rescompile.<pass>.`)
        for torch input, an `onnx.ModelProto` with all weights in memory for
        ONNX input. To write large ONNX models use the CLI's `apply -o`, which
        streams weights to an external data file.
    """
    if isinstance(passes, (str, PassBase)):
        passes = [passes]
    built = build_passes(passes)
    graph = load(model, example_inputs, **kw)
    run_passes(graph, built)
    from rescompile.frontends import is_torch_graph
    if is_torch_graph(graph):
        from rescompile.frontends.torch import export_module
        return export_module(graph)
    import onnx_ir as ir

    from rescompile.frontends.onnx import export_model
    exported = export_model(graph)
    # A ModelProto must be self-contained: pull weights kept in external files into memory.
    ir.external_data.load_to_model(exported)
    return ir.serde.serialize_model(exported)


def validate(original: Any, rewritten: Any, inputs: Any = None, *, atol: float = 1e-5,
             rtol: float = 0.0, dims: dict[str, int] | None = None, seed: int = 0):
    """Run both models on the same inputs and compare outputs.

    Args:
        original, rewritten: two nn.Modules (compared in torch), or two ONNX
            models as paths, onnx.ModelProto objects or bytes (compared in ONNX
            Runtime).
        inputs: for modules: a tensor, tuple or dict of inputs (required); for
            ONNX: a dict of arrays, random inputs when omitted.

    Returns:
        a `ValidationResult`: per-output max abs/rel differences and `.ok`.
    """
    from rescompile.validation import ValidationResult, compare_onnx, diff, run_onnx
    if is_torch_module(original) or is_torch_module(rewritten):
        from rescompile.frontends.torch import compare_modules
        return compare_modules(original, rewritten, inputs, atol=atol, rtol=rtol)
    a, b = _onnx_source(original), _onnx_source(rewritten)
    if inputs is None:
        return compare_onnx(a, b, atol=atol, rtol=rtol, dims=dims, seed=seed)
    ref, new = run_onnx(a, inputs), run_onnx(b, inputs)
    pairs = zip(ref, ref) if set(ref) == set(new) else zip(ref, new)
    return ValidationResult(tuple(diff(x, ref[x], new[y], atol, rtol) for x, y in pairs), atol, rtol, {})


def _onnx_source(model: Any) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        _must_exist(Path(model))
        return str(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    raise RescompileError(f"cannot validate a {type(model).__name__}: pass a path or an onnx.ModelProto")
