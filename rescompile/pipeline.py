"""The one compile pipeline: load -> passes -> export -> validate.

The API, the CLI and the demo all call `compile_model`, so a model goes through
the same steps, checks and error messages whichever door it came in by. Only
presentation (tables, return types) differs between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rescompile.analysis.cost import count_macs, count_params
from rescompile.analysis.residuals import find_residuals
from rescompile.errors import RescompileError
from rescompile.infra import PassBase, PassManager, PassResult, parse_spec
from rescompile.ir import Graph, verify
from rescompile.validation import DEFAULT_TOLERANCE, Tolerance, ValidationResult

__all__ = [
    "CompileResult",
    "build_passes",
    "load",
    "compile_model",
    "check_onnx",
    "is_torch_module",
    "PT2_SUFFIX",
    "PICKLE_SUFFIXES",
]

PT2_SUFFIX = ".pt2"
ONNX_SUFFIX = ".onnx"
PICKLE_SUFFIXES = (".pt", ".pth")
logger = logging.getLogger("rescompile")


def is_torch_module(model: Any) -> bool:
    """True for nn.Module instances, without importing torch for other objects."""
    return any(
        c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module" for c in type(model).__mro__
    )


def load(
    model: Any,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    trust_pickle: bool = False,
    dynamic: bool | str | None = None,
    dynamic_timeout: float | None = None,
) -> Graph:
    """Import `model` into the IR.

    Args:
        model: an nn.Module, a `.pt2` path (torch.export.save), a `.pt`/`.pth`
            path holding a pickled module (only with `trust_pickle`), a Hugging Face
            folder (config.json and safetensors; example inputs from its tokenizer or
            config unless given), an ONNX path, an onnx.ModelProto or an onnx_ir.Model.
        example_inputs: for an nn.Module or a pickled module: a tensor, a tuple of
            positional inputs or a dict of keyword inputs.
        trust_pickle: allow unpickling a `.pt`/`.pth` file (unpickling runs code).
        dynamic: how torch modules are captured: True (dynamic dims, however long
            torch.export takes), False (the example's static shapes, about twice as
            fast), "auto" (dynamic within `dynamic_timeout` seconds, default 20, then
            static with one warning line); None takes the frontend's default, "auto".
    """
    if isinstance(model, Graph):
        return model
    capture = {k: v for k, v in (("dynamic", dynamic), ("dynamic_timeout", dynamic_timeout)) if v is not None}
    if _is_hf_folder(model):
        model, example_inputs, example_kwargs = _open_folder(model, example_inputs, example_kwargs)
    if is_torch_module(model):
        from rescompile.frontends.torch import import_module

        return import_module(model, example_inputs, example_kwargs, **capture)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix == PT2_SUFFIX:
            from rescompile.frontends.torch import load_pt2

            must_exist(path)
            return load_pt2(path)
        if path.suffix in PICKLE_SUFFIXES:
            from rescompile.frontends.torch import import_module, load_pickled_module

            module = load_pickled_module(path, trust_pickle=trust_pickle)
            return import_module(module, example_inputs, example_kwargs, **capture)
        if path.suffix.lower() != ONNX_SUFFIX and path.is_file():
            raise RescompileError(
                f"{path}: unknown model format {path.suffix or '(no suffix)'!r}; rescompile reads "
                ".onnx, .pt2 (torch.export.save) and .pt/.pth (pickled modules, with --trust-pickle)"
            )
    from rescompile.frontends.onnx import load_onnx

    return load_onnx(model)


def _is_hf_folder(model: Any) -> bool:
    from rescompile.frontends.hf_folder import is_hf_folder

    return is_hf_folder(model)


def _open_folder(folder: Any, example_inputs: Any, example_kwargs: dict | None) -> tuple[Any, Any, Any]:
    """The folder's model, with its own example inputs unless the caller gave some."""
    from rescompile.frontends.hf_folder import load_folder

    model, inputs = load_folder(folder)
    if example_inputs is None and example_kwargs is None:
        example_kwargs = inputs
    return model, example_inputs, example_kwargs


def must_exist(path: Path) -> None:
    if not path.exists():
        raise RescompileError(f"{path}: no such file")


def build_passes(passes: Iterable[str | PassBase] | str | PassBase) -> list[PassBase]:
    """Turn spec strings ("rezero", "rezero:init=0") and pass objects into passes."""
    from rescompile.passes import PASSES

    if isinstance(passes, (str, PassBase)):
        passes = [passes]
    built = []
    for p in passes:
        built.append(parse_spec(p, PASSES) if isinstance(p, str) else p)
        if not isinstance(built[-1], PassBase):
            raise RescompileError(f"{p!r} is neither a pass spec string nor a pass object")
    return built


def check_onnx(path: Path) -> None:
    """onnx.checker on a written model, as a one-line rescompile error."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError and C++ errors
        raise RescompileError(f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}") from exc


@dataclasses.dataclass
class CompileResult:
    """What one run of the pipeline produced.

    Attributes:
        graph: the rewritten IR.
        passes: the passes that ran, in order.
        result: the PassManager's result (per-pass stats).
        pass_timings: seconds per pass, keyed like `result.stats` ("0:rezero").
        timings: seconds per stage: load, passes, export (and validate when run).
        output: the written file (with `output=`), else the exported object: an
            nn.Module for torch graphs, an onnx.ModelProto for ONNX graphs.
        validation: the comparison with the input (when asked and every pass
            preserves the function), else None.
    """

    graph: Graph
    passes: list[PassBase]
    result: PassResult
    pass_timings: dict[str, float]
    timings: dict[str, float]
    output: Any
    validation: ValidationResult | None = None
    before: dict[str, int] = dataclasses.field(default_factory=dict)  # params, macs of the input
    after: dict[str, int] = dataclasses.field(default_factory=dict)  # and of the result

    def to_json(self) -> dict:
        """The machine-readable summary `apply --json` prints."""
        return {
            "passes": [
                {
                    "pass": repr(p),
                    "stats": self.result.stats.get(f"{i}:{p.name}", {}),
                    "seconds": self.pass_timings.get(f"{i}:{p.name}"),
                }
                for i, p in enumerate(self.passes)
            ],
            "preserves_function": self.preserves_function,
            "params": {"before": self.before.get("params"), "after": self.after.get("params")},
            "macs": {"before": self.before.get("macs"), "after": self.after.get("macs")},
            "nodes": len(self.graph),
            "seconds": dict(self.timings),
            "output": str(self.output) if isinstance(self.output, (str, os.PathLike)) else None,
            "validation": self.validation.to_json() if self.validation is not None else None,
        }

    @property
    def preserves_function(self) -> bool:
        return all(p.preserves_function for p in self.passes)


def compile_model(
    model: Any,
    passes: Sequence[str | PassBase] | str | PassBase,
    *,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    trust_pickle: bool = False,
    dynamic: bool | str | None = None,
    dynamic_timeout: float | None = None,
    output: str | os.PathLike | None = None,
    check: bool = True,
    verify_each_pass: bool = False,
    validate: bool = False,
    compare_with_changed: bool = False,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    dims: Mapping[str, int] | None = None,
    calibration: Any = None,
    require_sites: bool = False,
    progress: Any = None,
) -> CompileResult:
    """Load `model`, run `passes`, export, and optionally validate against the input.

    Args:
        model, example_inputs, example_kwargs, trust_pickle, dynamic, dynamic_timeout: see `load`.
        passes: spec strings or pass objects, run in order, each in a transaction.
        output: write here (ONNX: atomically, with external data as the input had;
            torch graphs: `.pt2` or `.onnx` by suffix; a Hugging Face model or folder: also a
            folder, when every pass keeps the model its class); None returns the exported object.
        check: run onnx.checker on a written ONNX file before it is moved into place.
        verify_each_pass: verify the IR after every pass (it is always verified at the end).
        validate: compare the result with the input (ONNX Runtime for ONNX, torch for
            torch graphs) when every pass preserves the function.
        compare_with_changed: also compare when a pass changes the function (the
            result then shows how much it changed).
        calibration: inputs for passes that measure the model (drop, prune's activation
            importance): a list of batches (tuples of positional inputs or dicts by input
            name) or a file (`torch.save`d list, or `.npz` named by input); default random.
        progress: called with a short description as each stage starts (the CLI shows it).
        require_sites: a pass that rewrites residual sites finding none is an error (the CLI),
            not a no-op with a warning; log records of the passes are held until they succeed.
    """
    built = build_passes(passes)  # a bad spec fails before a large model is loaded
    from rescompile.frontends import is_torch_graph

    step = progress or (lambda description: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step("loading the model")
    folder = Path(model) if _is_hf_folder(model) else None
    if folder is not None:
        model, example_inputs, example_kwargs = _open_folder(folder, example_inputs, example_kwargs)
    to_folder = output is not None and _is_folder_output(model, output)
    if to_folder:
        _check_folder_output(model, built, Path(output))
    graph = load(
        model,
        example_inputs,
        example_kwargs=example_kwargs,
        trust_pickle=trust_pickle,
        dynamic=dynamic,
        dynamic_timeout=dynamic_timeout,
    )
    timings["load"] = time.perf_counter() - t0
    before = {"params": count_params(graph), "macs": count_macs(graph, dims)}
    # Modules are exported from the graph only after the passes: keep the reference now.
    t0 = time.perf_counter()
    manager = PassManager(built, check=verify_each_pass, calibration=calibration, progress=step)
    with _held_logs(require_sites):
        result = manager(graph)
        if require_sites and not result.modified:
            _require_sites(graph, built)
    verify(graph)
    timings["passes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exported = _export(graph, None if to_folder else output, check)
    if to_folder:
        exported = _save_folder(model, graph, exported, tolerance, Path(output), folder)
    elif output is None and built and all(getattr(p, "keeps_model_class", False) for p in built):
        exported = _same_class(model, graph, exported, tolerance)
    timings["export"] = time.perf_counter() - t0
    compiled = CompileResult(graph, built, result, dict(manager.timings), timings, exported, before=before)
    compiled.after = {"params": count_params(graph), "macs": count_macs(graph, dims)}
    if validate and (compiled.preserves_function or compare_with_changed):
        step("validating against the input")
        t0 = time.perf_counter()
        compiled.validation = _validate(
            model,
            graph,
            exported,
            output,
            example_inputs,
            example_kwargs,
            trust_pickle,
            tolerance,
            dims,
            is_torch_graph(graph),
        )
        timings["validate"] = time.perf_counter() - t0
    return compiled


def _require_sites(graph: Graph, passes: Sequence[PassBase]) -> None:
    """Raise when a pass that rewrites residual sites (it selects sites or streams) left the
    model unchanged because the model has none."""
    needing = [p for p in passes if hasattr(p.options, "sites") or hasattr(p.options, "streams")]
    if needing and not find_residuals(graph).sites:
        raise RescompileError(f"{needing[0].name}: the model has no residual sites; nothing to rewrite")


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_logs(hold: bool) -> Iterator[None]:
    """Hold the `rescompile` loggers' records and replay them once the block succeeds: when it
    fails, its one error line replaces them (the CLI prints exactly one line)."""
    if not hold:
        yield
        return
    log = logging.getLogger("rescompile")
    held, propagate = _Held(), log.propagate
    log.addHandler(held)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(held)
        log.propagate = propagate
    for record in held.records:
        logging.getLogger(record.name).handle(record)


def _export(graph: Graph, output: str | os.PathLike | None, check: bool) -> Any:
    from rescompile.frontends import is_torch_graph

    if is_torch_graph(graph):
        if output is not None:
            from rescompile.frontends.torch import save_program

            save_program(graph, output)
            return Path(output)
        from rescompile.frontends.torch import export_module

        return export_module(graph)
    if output is not None:
        from rescompile.frontends.onnx import save_onnx

        save_onnx(graph, output, check=check_onnx if check else None)
        return Path(output)
    import onnx_ir as ir

    from rescompile.frontends.onnx import export_model

    exported = export_model(graph)
    # A ModelProto must be self-contained: pull weights kept in external files into memory.
    ir.external_data.load_to_model(exported)
    return ir.serde.serialize_model(exported)


def _same_class(model: Any, graph: Graph, exported: Any, tolerance: Tolerance) -> Any:
    """For a Hugging Face model and passes that keep a model its own class (drop of whole
    layers): the rebuilt model of that class, checked to compute what the graph does; else,
    with one warning saying why, the exported GraphModule."""
    from rescompile.frontends.hf import NotSameClass, is_hf_model

    if not is_hf_model(model):
        return exported
    try:
        return _rebuilt(model, graph, exported, tolerance)
    except NotSameClass as exc:
        logger.warning("returning a GraphModule, not a %s: %s", type(model).__name__, exc)
        return exported


def _rebuilt(model: Any, graph: Graph, exported: Any, tolerance: Tolerance) -> Any:
    """The graph as `model`'s class, checked to compute what the graph does (or NotSameClass)."""
    from rescompile.frontends.hf import NotSameClass, rebuild
    from rescompile.frontends.torch import compare_modules, example_inputs_of

    rebuilt = rebuild(model, graph)
    args, kwargs = example_inputs_of(graph)
    check = compare_modules(exported, rebuilt, args, kwargs=kwargs, atol=tolerance.atol, rtol=tolerance.rtol)
    if not check.ok:
        name = type(model).__name__
        raise NotSameClass(f"the rebuilt {name} differs from the graph ({check.max_abs:.3g})")
    return rebuilt


def _is_folder_output(model: Any, output: str | os.PathLike) -> bool:
    if not is_torch_module(model):
        return False  # NOTE: frontends.hf imports torch, which ONNX work never does
    from rescompile.frontends.hf import is_hf_model
    from rescompile.frontends.hf_folder import is_folder_output

    return is_hf_model(model) and is_folder_output(output)


def _check_folder_output(model: Any, passes: Sequence[PassBase], output: Path) -> None:
    """Before any work: a folder holds the input's class, which some passes do not keep."""
    from rescompile.frontends.hf_folder import check_output_folder

    changing = [p.name for p in passes if not getattr(p, "keeps_model_class", False)]
    if changing:
        raise RescompileError(
            f"-o {output}: after {', '.join(changing)} the result is no longer a {type(model).__name__}: "
            "write .pt2 or .onnx"
        )
    check_output_folder(output)


def _save_folder(
    model: Any, graph: Graph, exported: Any, tolerance: Tolerance, output: Path, source: Path | None
) -> Path:
    from rescompile.frontends.hf import NotSameClass
    from rescompile.frontends.hf_folder import save_folder

    try:
        rebuilt = _rebuilt(model, graph, exported, tolerance)
    except NotSameClass as exc:
        raise RescompileError(
            f"-o {output}: the result is no longer a {type(model).__name__} ({exc}): write .pt2 or .onnx"
        ) from exc
    save_folder(rebuilt, output, source)
    return output


def _validate(
    model: Any,
    graph: Graph,
    exported: Any,
    output,
    example_inputs,
    example_kwargs,
    trust_pickle: bool,
    tolerance: Tolerance,
    dims,
    torch_graph: bool,
) -> ValidationResult:
    if torch_graph:
        from rescompile.frontends.torch import compare_modules, example_inputs_of, export_module

        reference = (
            model
            if is_torch_module(model)
            else export_module(
                load(model, example_inputs, example_kwargs=example_kwargs, trust_pickle=trust_pickle)
            )
        )
        rewritten = exported if output is None else export_module(graph)
        args, kwargs = example_inputs_of(graph)
        return compare_modules(
            reference, rewritten, args, kwargs=kwargs, atol=tolerance.atol, rtol=tolerance.rtol
        )
    from rescompile.validation import compare_onnx

    reference = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    if not isinstance(reference, (str, os.PathLike, bytes)):
        raise RescompileError(
            f"cannot validate against a {type(model).__name__}: pass a path or a ModelProto"
        )
    rewritten = str(exported) if output is not None else exported.SerializeToString()
    return compare_onnx(reference, rewritten, atol=tolerance.atol, rtol=tolerance.rtol, dims=dims)
