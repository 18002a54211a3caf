"""Compare two ONNX models in ONNX Runtime on the same random inputs.

Inputs are drawn from the first model's declared inputs: floats ~ N(0, 1),
integers in [0, int_high) (valid token ids for any vocabulary), and inputs whose
name contains "mask" set to ones (so no attention row is fully masked).
Dynamic dimensions take values from `dims` (name -> size), else `default_dim`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from rescompile.errors import RescompileError

__all__ = ["OutputDiff", "ValidationResult", "random_onnx_inputs", "run_onnx", "compare_onnx"]

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    ok: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    """Per-output differences; `ok` when every output is within tolerance."""

    outputs: tuple[OutputDiff, ...]
    atol: float
    rtol: float
    dims: dict[str, int]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_json(self) -> dict:
        return {"ok": self.ok, "atol": self.atol, "rtol": self.rtol, "dims": self.dims,
                "outputs": [o.to_json() for o in self.outputs]}


def _session(model: str | os.PathLike | bytes):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RescompileError(f"ONNX Runtime cannot load {model if not isinstance(model, bytes) else 'the model'}: "
                              f"{str(exc).splitlines()[0][:200]}") from exc


def random_onnx_inputs(model: str | os.PathLike | bytes, *, dims: Mapping[str, int] | None = None,
                       default_dim: int = 2, int_high: int = 2, seed: int = 0):
    """Random feeds for `model`'s inputs; returns (feeds, dims actually used)."""
    session = model if hasattr(model, "get_inputs") else _session(model)
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    used: dict[str, int] = {}
    feeds = {}
    for arg in session.get_inputs():
        shape = []
        for d in arg.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = str(d) if d is not None else f"{arg.name}_dim"
                size = dims.get(key, default_dim)
                used[key] = size
                shape.append(size)
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise RescompileError(f"input {arg.name!r} has type {arg.type}, which validate cannot generate")
        if dtype is np.bool_:
            feeds[arg.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in arg.name.lower():
                feeds[arg.name] = np.ones(shape, dtype=dtype)
            else:
                feeds[arg.name] = rng.integers(0, int_high, size=shape).astype(dtype)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds, used


def run_onnx(model: str | os.PathLike | bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feeds)
    if missing:
        raise RescompileError(f"the rewritten model needs inputs the original does not have: {sorted(missing)}")
    outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, outputs))


def diff(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> OutputDiff:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return OutputDiff(name, tuple(b.shape), float("inf"), float("inf"), False)
    if a.size == 0:
        return OutputDiff(name, tuple(a.shape), 0.0, 0.0, True)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    err = np.where(both_nan, 0.0, np.abs(a64 - b64))
    err = np.where(np.isnan(err), np.inf, err)
    rel = err / np.maximum(np.abs(a64), 1e-12)
    ok = bool(np.all(err <= atol + rtol * np.abs(a64)))
    return OutputDiff(name, tuple(a.shape), float(err.max()), float(rel.max()), ok)


def compare_onnx(original: str | os.PathLike | bytes, rewritten: str | os.PathLike | bytes, *,
                 atol: float = 1e-5, rtol: float = 0.0, dims: Mapping[str, int] | None = None,
                 seed: int = 0) -> ValidationResult:
    """Run both models on the same random inputs and compare their outputs.

    Outputs are matched by name where the names agree, else by position.
    """
    feeds, used = random_onnx_inputs(original, dims=dims, seed=seed)
    ref = run_onnx(original, feeds)
    new = run_onnx(rewritten, feeds)
    if len(ref) != len(new):
        raise RescompileError(f"the models have {len(ref)} and {len(new)} outputs")
    pairs = (zip(ref, ref) if set(ref) == set(new) else zip(ref, new))
    diffs = tuple(diff(a, ref[a], new[b], atol, rtol) for a, b in pairs)
    return ValidationResult(diffs, atol, rtol, used)
