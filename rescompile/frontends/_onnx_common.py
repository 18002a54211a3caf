"""What the ONNX importer and exporter share: model-level facts kept for export
and the conversions between onnx-ir and IR types and shapes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from rescompile.ir import Value

__all__ = ["OnnxSource", "dtype_name", "shape_tuple", "ir_type", "ir_shape"]


@dataclasses.dataclass
class OnnxSource:
    """Model-level ONNX facts the IR does not model, kept for export.

    `model` is the onnx-ir model the graph was imported from when the frontend
    owns it (read from a file or a ModelProto): export writes the IR's edits
    back into it instead of building a second model. A caller's onnx_ir.Model
    is not kept there, so it is never modified.
    """

    ir_version: int
    opset_imports: dict[str, int]
    producer_name: str | None = None
    producer_version: str | None = None
    domain: str | None = None
    model_version: int | None = None
    doc_string: str | None = None
    graph_doc_string: str | None = None
    metadata_props: dict[str, str] = dataclasses.field(default_factory=dict)
    graph_metadata_props: dict[str, str] = dataclasses.field(default_factory=dict)
    functions: tuple = ()
    external_data: bool = False
    path: str | None = None
    model: ir.Model | None = dataclasses.field(default=None, repr=False)


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(type_: Any) -> str | None:
    dtype = getattr(type_, "dtype", None)
    if dtype is None:
        return None
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        try:
            name = np.dtype(dtype.numpy()).name
        except (TypeError, ValueError, AttributeError):
            name = str(dtype).lower()
        _DTYPE_NAMES[dtype] = name
    return name


def shape_tuple(shape: ir.Shape | None) -> tuple | None:
    if shape is None:
        return None
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            name = getattr(d, "value", None)
            # Shape inference names dims it cannot infer unk__N: unknown, not a shared symbol.
            dims.append(None if name is None or name.startswith("unk__") else name)
    return tuple(dims)


def ir_type(value: Value) -> Any:
    """The onnx-ir type for an IR value: the imported object while the dtype is unchanged."""
    kept = value.origin  # (the onnx-ir value it was imported from, its IR shape then)
    if (
        kept is not None
        and kept[0].type is not None
        and (value.dtype is None or dtype_name(kept[0].type) == value.dtype)
    ):
        return kept[0].type
    if value.dtype is None:
        return None
    return ir.TensorType(ir.DataType.from_numpy(np.dtype(value.dtype)))


def ir_shape(value: Value) -> ir.Shape | None:
    """The onnx-ir shape: the imported object while the IR shape is unchanged
    (rebuilding ir.Shape objects dominated export time on large graphs)."""
    if value.shape is None:
        return None
    kept = value.origin
    if kept is not None and kept[1] == value.shape:
        return kept[0].shape
    return ir.Shape(list(value.shape))
