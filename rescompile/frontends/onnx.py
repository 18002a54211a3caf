"""ONNX <-> rescompile IR, through onnx-ir.

ONNX I/O goes through onnx-ir rather than onnx.load/onnx.save or
onnx-graphsurgeon: weights stay as lazy (memory-mapped) tensors and are never
copied through protobuf (on a 1.4 GB GPT-2 export the project brief measured
load+save at 0.6 s for onnx-ir, 5 s for graphsurgeon and 9 s for protobuf;
BENCHMARKS.md has this machine's figures). Initializer payloads keep those
tensor objects, so a rewrite touches only the bytes it changes.

Import keeps everything needed for a lossless export in `graph.source`
(`OnnxSource`), in each node's `attrs` (the onnx-ir attribute objects) and in
`origin` (the onnx-ir node and value each IR object came from): export writes
the IR's edits back into the loaded model (_onnx_export) instead of building
a second one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from rescompile._gc import paused_gc
from rescompile.errors import RescompileError
from rescompile.frontends._onnx_common import OnnxSource, dtype_name, shape_tuple
from rescompile.frontends._onnx_export import export_model
from rescompile.frontends._onnx_write import write_model
from rescompile.frontends._staging import staging_dir
from rescompile.ir import CONST, PARAM, Graph, Node, Value
from rescompile.ir.shapes import infer_shapes

__all__ = ["OnnxSource", "load_onnx", "import_model", "export_model", "save_onnx", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 13  # axes-as-input ops (Unsqueeze, Split, ReduceSum) settled in opset 13
MAX_OPSET = 25

# Above this many bytes of weights a model must keep its weights outside the
# protobuf (2 GB hard limit); below it we still honour an input's external data.
_EXTERNAL_DATA_THRESHOLD = 1 << 30


def _copy_type(src: ir.Value, dst: Value) -> None:
    dst.dtype = dtype_name(src.type)
    dst.shape = shape_tuple(src.shape)
    # Export reuses (or updates) this onnx-ir value instead of building a new one.
    dst.origin = (src, dst.shape)


def _read(source: str | os.PathLike | Any) -> tuple[ir.Model, str | None, bool]:
    """Load a path, an onnx.ModelProto or an onnx_ir.Model; one-line errors for bad input.

    Returns the model, its path if read from a file, and whether this module
    owns it (may write the IR's edits back into it on export)."""
    if isinstance(source, ir.Model):
        return source, None, False
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise RescompileError(f"{path}: no such file")
        if path.is_dir():
            raise RescompileError(f"{path}: is a directory, expected an .onnx file")
        if path.stat().st_size == 0:
            raise RescompileError(f"{path}: the file is empty, not an ONNX model")
        try:
            model = ir.load(path)
        except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ...
            if isinstance(exc, ir.serde.SerdeError):  # it parsed, but the graph is invalid
                cause = _root_cause(exc)
                raise RescompileError(
                    f"{path}: not a readable ONNX model, its graph is invalid "
                    f"({type(cause).__name__}: {_first_line(cause)})"
                ) from exc
            raise RescompileError(
                f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]}); "
                "is the file truncated or of another format?"
            ) from exc
        if not model.opset_imports and len(model.graph) == 0:
            raise RescompileError(
                f"{path}: not a readable ONNX model (it parses to an empty model); is it of another format?"
            )
        _check_external_data(model, path)
        return model, str(path), True
    if type(source).__name__ == "ModelProto":
        try:
            return ir.serde.deserialize_model(source), None, True
        except Exception as exc:
            raise RescompileError(f"cannot read the ONNX ModelProto: {exc}") from exc
    raise RescompileError(f"cannot import {type(source).__name__}: expected a path or an ONNX model")


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse external data that is outside the model's folder, missing or too short, at load.

    Only names and sizes are looked at (no file outside the folder is ever opened), so a
    broken model fails here, before any output exists, rather than when its weights are
    first read (onnx-ir checks containment only then, and a short file ends in a numpy error).
    """
    folder = os.path.realpath(path.parent)
    sizes: dict[str, int] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        # NOTE: decided on the names alone, before any file-system access: "../x" and "/x"
        # are refused even where the file exists, and a symlink must resolve inside the folder.
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or os.path.commonpath([folder, target]) != folder:
            linked = not os.path.isabs(location) and ".." not in Path(location).parts
            raise RescompileError(
                f"{path}: initializer {name!r} points at external data {location!r}, "
                f"{'a symlink ' if linked else ''}outside the model's folder; refused "
                "(external data must be a file inside that folder)"
            )
        if target not in sizes:
            if not os.path.isfile(target):
                raise RescompileError(
                    f"{path}: the external data file {location!r} of initializer {name!r} does not "
                    "exist; copy it with the model"
                )
            sizes[target] = os.path.getsize(target)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if sizes[target] < end:
            raise RescompileError(
                f"{path}: the external data file {location!r} has {sizes[target]} bytes, but "
                f"initializer {name!r} needs bytes up to {end}; is the file truncated?"
            )


def load_onnx(source: str | os.PathLike | Any) -> Graph:
    """Import an ONNX model (path, onnx.ModelProto or onnx_ir.Model) into the IR.

    Raises:
        RescompileError: missing or unreadable file, unsupported opset, or a
            feature the IR does not model (control-flow subgraphs).
    """
    # onnx-ir logs a warning for each node input it cannot resolve (while loading, and again
    # in shape inference); import_model reports the first one as the error, in one line.
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        with paused_gc():
            model, path, owned = _read(source)
            return import_model(model, path=path, owned=owned)
    finally:
        serde_log.setLevel(level)


def import_model(model: ir.Model, *, path: str | None = None, owned: bool = False) -> Graph:
    """Convert an onnx_ir.Model into a rescompile Graph.

    With `owned`, export writes the graph's edits back into `model` (see
    _onnx_export) rather than building a second model; the caller must not
    use `model` for anything else.
    """
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise RescompileError("the model imports no ONNX standard opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise RescompileError(
            f"unsupported opset {opset}: rescompile reads opsets {MIN_OPSET}-{MAX_OPSET}; "
            "convert the model with onnx.version_converter.convert_version(model, 17)"
        )
    _infer_missing_shapes(model)
    src_graph = model.graph
    graph = Graph(src_graph.name or "main")
    external = False
    vmap: dict[ir.Value, Value] = {}
    input_set = set(src_graph.inputs)
    for v in src_graph.inputs:
        value = Value(v.name or "input")
        _copy_type(v, value)
        graph.add_input(value)
        vmap[v] = value
    for name, v in src_graph.initializers.items():
        if v in input_set:
            continue  # an input with a default: stays an input
        tensor = v.const_value
        external = external or isinstance(tensor, ir.ExternalTensor)
        floating = tensor is not None and tensor.dtype.is_floating_point()
        role = PARAM if floating and tensor.size > 1 else CONST
        value = Value(name, payload=tensor, role=role)
        _copy_type(v, value)
        graph.add_initializer(value)
        vmap[v] = value
    for n in src_graph:
        for attr in n.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise RescompileError(
                    f"node {n.name!r} ({n.op_type}) has a control-flow subgraph; "
                    "rescompile does not rewrite models with If/Loop/Scan yet"
                )
        inputs = []
        for v in n.inputs:
            if v is None:
                inputs.append(None)
                continue
            if v not in vmap:
                raise RescompileError(_undefined_input(src_graph, n, v))
            inputs.append(vmap[v])
        out_names = [o.name or f"{n.name or n.op_type}_absent{i}" for i, o in enumerate(n.outputs)]
        node = Node(
            n.op_type,
            inputs,
            domain=n.domain,
            attrs=dict(n.attributes),
            num_outputs=len(n.outputs),
            name=n.name or n.op_type,
            output_names=out_names,
        )
        if n.overload:
            node.meta["onnx.overload"] = n.overload
        if n.doc_string:
            node.meta["onnx.doc_string"] = n.doc_string
        if n.metadata_props:
            node.meta["onnx.metadata_props"] = dict(n.metadata_props)
        if owned:
            node.origin = n
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx"):
            # Running statistics are state, not trainable parameters (torch: buffers): as params
            # they were counted, and scored by prune, in ONNX graphs only.
            for stat in inputs[3:5]:
                if stat is not None and stat.role == PARAM:
                    stat.role = CONST
        graph.append(node)
        for o, out in zip(n.outputs, node.outputs):
            _copy_type(o, out)
            if not o.name:
                out.meta["onnx.absent"] = True
            vmap[o] = out
    graph.set_outputs(vmap[v] for v in src_graph.outputs)
    # NOTE: ONNX inference leaves sizes that the graph computes from a shape unknown (the legacy
    # exporter's chunk: Slice bounds from Shape -> Gather -> Add -> Div -> Mul); rescompile's own
    # evaluates those chains. It only fills what is unknown and never replaces a known size.
    infer_shapes(graph)
    for value in graph.initializers.values():
        if value.role == PARAM and _is_additive_mask(value):
            value.role = CONST
    graph.source = OnnxSource(
        ir_version=model.ir_version,
        opset_imports=dict(model.opset_imports),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        graph_doc_string=src_graph.doc_string,
        metadata_props=dict(model.metadata_props),
        graph_metadata_props=dict(src_graph.metadata_props),
        functions=tuple(model.functions.values()),
        external_data=external,
        path=path,
        model=model if owned else None,
    )
    return graph


MASK_MAGNITUDE = 1e4


def _is_additive_mask(value: Value) -> bool:
    """An initializer only added to other values and holding "minus infinity" (-inf, -1e9,
    float32's min, BERT's -10000) is an attention mask: torch keeps it as a buffer, not a
    trainable parameter, and counting it as one made the frontends count block parameters
    differently (a fuzz finding). Only such Add-only initializers are read (never a weight)."""
    readers = value.consumers()
    if not readers or any(n.op_type != "Add" or n.domain not in ("", "ai.onnx") for n in readers):
        return False
    tensor = value.payload
    if isinstance(tensor, ir.ExternalTensor):
        return False  # a mask is small; never read external data just to ask
    array = np.asarray(tensor.numpy())
    return bool(array.size) and bool((~np.isfinite(array)).any() or np.abs(array).max() >= MASK_MAGNITUDE)


def _undefined_input(graph: ir.Graph, node: ir.Node, value: ir.Value) -> str:
    """Why `node` reads `value` before it exists: a cycle, nodes out of order, or no producer."""
    producer = value.producer()
    if producer is None or producer.graph is not graph:
        return f"node {node.name!r} reads {value.name!r}, which is defined nowhere"
    # Kahn's algorithm: the nodes left over lie on a cycle or downstream of one.
    waiting = {n: len(set(n.predecessors())) for n in graph}
    ready = [n for n, count in waiting.items() if count == 0]
    while ready:
        done = ready.pop()
        del waiting[done]
        for succ in set(done.successors()):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                ready.append(succ)
    if waiting:
        names = ", ".join(repr(n.name) for n in list(waiting)[:4]) + (" ..." if len(waiting) > 4 else "")
        return (
            f"the graph has a cycle: node {node.name!r} reads {value.name!r}, "
            f"computed downstream of it ({names})"
        )
    return (
        f"node {node.name!r} reads {value.name!r} before node {producer.name!r} computes it: "
        "the nodes are not in topological order (ONNX requires it)"
    )


def _infer_missing_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference when the file carries no shapes for some values.

    Analysis needs shapes to reject broadcasting adds. Exports by torch.onnx
    carry them; other producers may not. onnx-ir's pass runs inference on the
    graph without the weights, so this costs little even for large models.
    Inferred types are import-time facts only: the exported model gets them as
    value_info, which is harmless.
    """
    if all(o.shape is not None for n in model.graph for o in n.outputs if o.name):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)


def _weight_bytes(graph: Graph) -> int:
    total = 0
    for value in graph.initializers.values():
        payload = value.payload
        nbytes = getattr(payload, "nbytes", None)
        total += int(nbytes) if nbytes is not None else 0
    return total


def save_onnx(
    graph: Graph,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Export and write atomically; returns the files written.

    Weights go to `<name>.data` beside the model when the input had external
    data, when they would be too large for one protobuf, or when asked.
    The files are written in a temporary folder next to the destination and
    moved into place only once complete (and, with `check`, only once
    `check(temporary_model_path)` returned), so a failure leaves no partial output.
    """
    path = Path(path)
    if external_data is None:
        source = graph.source
        had_external = isinstance(source, OnnxSource) and source.external_data
        external_data = had_external or _weight_bytes(graph) > _EXTERNAL_DATA_THRESHOLD
    with paused_gc():
        model = export_model(graph)
    data_name = path.name + ".data" if external_data else None
    with staging_dir(path) as tmpdir:
        parent = tmpdir.parent
        with paused_gc():
            write_model(model, tmpdir / path.name, external_data=data_name)
        if check is not None:
            check(tmpdir / path.name)
        written = []
        if data_name and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, parent / data_name)
            written.append(parent / data_name)
        os.replace(tmpdir / path.name, parent / path.name)
        written.append(parent / path.name)
        return written
