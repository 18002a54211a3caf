"""The IR's core op set (ONNX names, ONNX semantics) as plain torch functions.

Passes insert core ops; the torch exporter calls these. They are module-level
functions so that fx code generation, pickling and torch.compile see ordinary
named callables. Attributes arrive as keyword arguments.
"""

from __future__ import annotations

import torch

__all__ = ["CORE_OPS"]


def rescompile_add(a, b):
    return torch.add(a, b)


def rescompile_sub(a, b):
    return torch.sub(a, b)


def rescompile_mul(a, b):
    return torch.mul(a, b)


def rescompile_div(a, b):
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


def rescompile_max(a, b):
    return torch.maximum(a, b)


def rescompile_slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def rescompile_identity(x):
    return x


def rescompile_concat(*xs, axis=0):
    return torch.cat(xs, dim=axis)


def rescompile_transpose(x, perm=None):
    return x.permute(*perm) if perm is not None else x.permute(*reversed(range(x.dim())))


def rescompile_reshape(x, shape):
    dims = [int(d) for d in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
    # ONNX: 0 copies the input's dimension.
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, dims)


def rescompile_reduce_mean(x, axes=None, keepdims=1):
    return torch.mean(x, dim=tuple(axes), keepdim=bool(keepdims)) if axes is not None else torch.mean(x)


def rescompile_reduce_sum(x, axes=None, keepdims=1):
    if isinstance(axes, torch.Tensor):
        axes = axes.tolist()
    return torch.sum(x, dim=tuple(axes), keepdim=bool(keepdims)) if axes is not None else torch.sum(x)


CORE_OPS = {
    "Add": rescompile_add, "Sub": rescompile_sub, "Mul": rescompile_mul, "Div": rescompile_div,
    "MatMul": rescompile_matmul, "Sigmoid": rescompile_sigmoid, "Tanh": rescompile_tanh,
    "Relu": rescompile_relu, "Sqrt": rescompile_sqrt, "Max": rescompile_max, "Slice": rescompile_slice, "Identity": rescompile_identity, "Concat": rescompile_concat,
    "Transpose": rescompile_transpose, "Reshape": rescompile_reshape,
    "ReduceMean": rescompile_reduce_mean, "ReduceSum": rescompile_reduce_sum,
}
