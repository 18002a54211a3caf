"""Compare outputs with one tolerance rule; compare two ONNX models in ONNX Runtime.

The rule (`Tolerance`, `diff`) is used by `rescompile validate`, the API, the
demo and the test suite alike, so a rewrite judged correct in one place is
judged correct everywhere.

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

__all__ = [
    "Tolerance",
    "DEFAULT_TOLERANCE",
    "OutputDiff",
    "ValidationResult",
    "diff",
    "assert_close",
    "assert_ok",
    "random_onnx_inputs",
    "run_onnx",
    "compare_onnx",
]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """When two float outputs count as equal: elementwise

        |got - want| <= atol * scale + rtol * |want|,   scale = max(1, max|want|)

    as numpy.allclose, except that `atol` is relative to the output's scale.

    Why these defaults (atol 1e-5, rtol 1e-4): a function-preserving rewrite
    changes the order of float32 operations (a gate of 1.0 folded into a weight,
    a MatMul split in two, another kernel picked by ONNX Runtime for another
    instruction set). The rounding error of a float32 sum of K terms is bounded by
    about K * u * sum|terms| (u = 2**-24 = 6e-8) and typically grows like
    sqrt(K) * u * sum|terms|; a ResNet-50 conv sums K = 4608 products and the
    error compounds over 50 layers, so differences of 1e-5 relative to the
    output's magnitude are ordinary rounding, not a wrong rewrite. An absolute
    bound alone rejects correct rewrites of models with large outputs (LM logits
    of magnitude 10-100); a relative bound alone rejects them near zero. A wrong
    rewrite (a missed scale, a dropped branch) changes outputs by 1e-2 or more of
    their scale, three orders of magnitude above these bounds.
    Use `Tolerance(0, 0)` for bit-exact comparisons.
    """

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise RescompileError(f"tolerances must be >= 0, not atol={self.atol}, rtol={self.rtol}")

    def scaled(self, factor: float) -> Tolerance:
        return Tolerance(self.atol * factor, self.rtol * factor)

    def __str__(self) -> str:
        return f"atol={self.atol:g} (x max|want|) rtol={self.rtol:g}"


DEFAULT_TOLERANCE = Tolerance()


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """How far one output is from its reference.

    Attributes:
        max_abs: largest |got - want|.
        max_rel: max_abs / max|want| (the difference relative to the output's scale).
        ratio: the largest |got - want| / allowed over elements; ok when <= 1.
        worst: (index, want, got) of the element with the largest ratio.
    """

    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    ok: bool
    ratio: float = 0.0
    worst: tuple | None = None

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

    @property
    def ratio(self) -> float:
        """The worst diff / allowed over every output (ok when <= 1)."""
        return max((o.ratio for o in self.outputs), default=0.0)

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(self.atol, self.rtol)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "atol": self.atol,
            "rtol": self.rtol,
            "dims": self.dims,
            "outputs": [o.to_json() for o in self.outputs],
        }


def _session(model: str | os.PathLike | bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RescompileError(
            f"ONNX Runtime cannot load {model if not isinstance(model, bytes) else 'the model'}: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc


def random_onnx_inputs(
    model: str | os.PathLike | bytes,
    *,
    dims: Mapping[str, int] | None = None,
    default_dim: int = 2,
    int_high: int = 2,
    seed: int = 0,
):
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
        raise RescompileError(
            f"the rewritten model needs inputs the original does not have: {sorted(missing)}"
        )
    outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, outputs))


def diff(name: str, want, got, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> OutputDiff:
    """Compare `got` with the reference `want` under `Tolerance(atol, rtol)`.

    Non-float outputs (ids, masks) must be equal; NaN equals NaN; inf only itself.
    """
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return OutputDiff(name, tuple(got.shape), float("inf"), float("inf"), False, float("inf"))
    if want.size == 0:
        return OutputDiff(name, tuple(want.shape), 0.0, 0.0, True)
    w64, g64 = want.astype(np.float64), got.astype(np.float64)
    same = (np.isnan(w64) & np.isnan(g64)) | (w64 == g64)  # NaN vs NaN, inf vs the same inf
    with np.errstate(invalid="ignore"):  # inf - inf: `same` or a NaN error below
        err = np.where(same, 0.0, np.abs(w64 - g64))
    err = np.where(np.isnan(err), np.inf, err)
    finite = np.abs(w64[np.isfinite(w64)])
    top = float(finite.max()) if finite.size else 0.0
    exact = not (np.issubdtype(want.dtype, np.floating) or np.issubdtype(want.dtype, np.complexfloating))
    allowed = 0.0 if exact else atol * max(1.0, top) + rtol * np.where(np.isfinite(w64), np.abs(w64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(err == 0, 0.0, err / allowed)
    flat = int(np.argmax(ratios))
    index = tuple(int(i) for i in np.unravel_index(flat, want.shape))
    ratio = float(ratios.reshape(-1)[flat])
    max_abs = float(err.max())
    return OutputDiff(
        name,
        tuple(want.shape),
        max_abs,
        max_abs / top if top > 0 else max_abs,
        ratio <= 1.0,
        ratio,
        (index, float(w64[index]), float(g64[index])),
    )


# Per-test record of the worst ratio seen by `assert_close` (read by tests/conftest.py's margin report).
observed_ratios: list[float] = []


def assert_close(got, want, tolerance: Tolerance = DEFAULT_TOLERANCE, *, name: str = "output") -> OutputDiff:
    """Assert that `got` matches `want` under `tolerance` (arrays or tensors; pytrees of them
    are compared leaf by leaf by the caller). The test suite's one numerical check."""
    res = diff(name, _numpy(want), _numpy(got), tolerance.atol, tolerance.rtol)
    observed_ratios.append(res.ratio)
    assert res.ok, (
        f"{name}: max abs diff {res.max_abs:.3g}, {res.max_rel:.3g} of max|want|, "
        f"{res.ratio:.3g}x the tolerance ({tolerance}); worst element {res.worst}"
    )
    return res


def assert_ok(result: ValidationResult) -> ValidationResult:
    """Assert that a `compare_onnx` / `validate` result is within its tolerance (recorded as
    assert_close records)."""
    observed_ratios.append(result.ratio)
    worst = max(result.outputs, key=lambda o: o.ratio, default=None)
    assert result.ok, (
        f"{worst.name}: max abs diff {worst.max_abs:.3g}, {worst.max_rel:.3g} of max|want|, "
        f"{worst.ratio:.3g}x the tolerance ({result.tolerance}); worst element {worst.worst}"
    )
    return result


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        return x.float().numpy() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x.numpy()
    return np.asarray(x)


def compare_onnx(
    original: str | os.PathLike | bytes,
    rewritten: str | os.PathLike | bytes,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> ValidationResult:
    """Run both models on the same random inputs and compare their outputs.

    Outputs are matched by name where the names agree, else by position.
    """
    feeds, used = random_onnx_inputs(original, dims=dims, seed=seed)
    ref = run_onnx(original, feeds)
    new = run_onnx(rewritten, feeds)
    if len(ref) != len(new):
        raise RescompileError(f"the models have {len(ref)} and {len(new)} outputs")
    pairs = zip(ref, ref) if set(ref) == set(new) else zip(ref, new)
    diffs = tuple(diff(a, ref[a], new[b], atol, rtol) for a, b in pairs)
    return ValidationResult(diffs, atol, rtol, used)
