"""The IR's core op set (ONNX names, ONNX semantics) as plain torch functions.

Passes insert core ops; the torch exporter calls these. They are module-level
functions so that fx code generation, pickling and torch.compile see ordinary
named callables. Attributes arrive as keyword arguments.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CORE_OPS"]


def rescompile_add(a, b):
    return torch.add(a, b)


def rescompile_sub(a, b):
    return torch.sub(a, b)


def rescompile_mul(a, b):
    return torch.mul(a, b)


def rescompile_div(a, b):
    # ONNX integer Div truncates and keeps the integer type; torch.div would return floats.
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


def rescompile_matmul(a, b):
    # A small matrix applied to a batched tensor (hyper-connections' width and depth
    # mixing): matmul on the 2-D matrix folds the batch into one GEMM on a transposed
    # copy, about 3.5x slower forward+backward than a batched GEMM on the matrix
    # expanded (a view) to the batch; einsum sits between (1.5x). Measured on CPU
    # with [5, 4] @ [1, 128, 4, 768].
    if a.dim() == 2 and b.dim() > 2:
        return torch.matmul(a.expand(*b.shape[:-2], *a.shape), b)
    return torch.matmul(a, b)


def rescompile_sigmoid(x):
    return torch.sigmoid(x)


def rescompile_tanh(x):
    return torch.tanh(x)


def rescompile_relu(x):
    return torch.relu(x)


def rescompile_sqrt(x):
    return torch.sqrt(x)


def rescompile_max(*xs):
    # ONNX Max is variadic (one or more inputs, broadcasting).
    return functools.reduce(torch.maximum, xs)


def rescompile_slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        start, end, step = int(start), int(end), int(step)
        if step > 0:  # Python slices clamp out-of-range bounds as ONNX does
            index[axis] = slice(start, end, step)
            continue
        # torch has no negative steps: clamp as ONNX does, then slice the flipped axis.
        n = x.shape[axis]
        start = min(max(start + n if start < 0 else start, 0), n - 1)
        end = min(max(end + n if end < 0 else end, -1), n - 1)
        x = x.flip(axis)
        index[axis] = slice(n - 1 - start, n - 1 - end, -step)
    return x[tuple(index)]


def rescompile_identity(x):
    return x


def rescompile_concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def rescompile_transpose(x, perm=None):
    return x.permute(*perm) if perm is not None else x.permute(*reversed(range(x.dim())))


def _ints(values) -> list[int]:
    """Shape and axes operands: Python ints from the exporter, or a tensor when computed."""
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def rescompile_reshape(x, shape, allowzero=0):
    dims = _ints(shape)
    if not allowzero:  # ONNX: 0 copies the input's dimension
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, dims)


def _reduce(fn, x, axes, keepdims, noop_with_empty_axes):
    axes = [] if axes is None else _ints(axes)
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=tuple(axes), keepdim=bool(keepdims))


def rescompile_reduce_mean(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(torch.mean, x, axes, keepdims, noop_with_empty_axes)


def rescompile_reduce_sum(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(torch.sum, x, axes, keepdims, noop_with_empty_axes)


def rescompile_softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


def rescompile_gather(x, indices, axis=0):
    # Indices may be negative (counted from the end) and of any rank; the output
    # replaces `axis` by the indices' shape.
    indices = torch.as_tensor(indices, device=x.device)
    size = x.shape[axis]
    flat = torch.where(indices < 0, indices + size, indices).reshape(-1)
    axis = axis % x.dim()
    picked = torch.index_select(x, axis, flat)
    return picked.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def rescompile_expand(x, shape):
    # ONNX broadcasts both ways: a 1 in `shape` keeps the input's dimension.
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def rescompile_unsqueeze(x, axes):
    rank = x.dim() + len(_ints(axes))
    for axis in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


def rescompile_squeeze(x, axes=None):
    if axes is None:
        return torch.squeeze(x)
    return torch.squeeze(x, dim=tuple(a % x.dim() for a in _ints(axes)))


# ONNX TensorProto data types (the `to` of Cast) -> torch dtypes.
_ONNX_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    16: torch.bfloat16,
}


def rescompile_cast(x, to, saturate=1, round_mode="up"):
    # saturate and round_mode apply to float8 and float4 targets only, which torch has no
    # lowering for here (they are not in _ONNX_DTYPES).
    return x.to(_ONNX_DTYPES[int(to)])


CORE_OPS = {
    "Add": rescompile_add,
    "Sub": rescompile_sub,
    "Mul": rescompile_mul,
    "Div": rescompile_div,
    "MatMul": rescompile_matmul,
    "Sigmoid": rescompile_sigmoid,
    "Tanh": rescompile_tanh,
    "Relu": rescompile_relu,
    "Sqrt": rescompile_sqrt,
    "Max": rescompile_max,
    "Slice": rescompile_slice,
    "Identity": rescompile_identity,
    "Concat": rescompile_concat,
    "Transpose": rescompile_transpose,
    "Reshape": rescompile_reshape,
    "ReduceMean": rescompile_reduce_mean,
    "ReduceSum": rescompile_reduce_sum,
    "Softmax": rescompile_softmax,
    "Gather": rescompile_gather,
    "Expand": rescompile_expand,
    "Unsqueeze": rescompile_unsqueeze,
    "Squeeze": rescompile_squeeze,
    "Cast": rescompile_cast,
}
