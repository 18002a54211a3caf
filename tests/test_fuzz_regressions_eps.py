"""Regression of the fuzzer (tests/test_fuzz.py): a pass that changes the function may hand an
eps = 0 norm a constant row, and 0/0 is NaN in any model; the fuzzer's "runs" property then
rejects the example instead of failing it, only where eps = 1e-5 makes the same rewritten model
finite (`_finite_with_eps`).

Shrunk example (10,000-example run on 40a836e): `depthscale` on two pre-norm MLP blocks whose
adds are followed by a ReLU, LayerNorm eps 0. Scaling the branches by 1/sqrt(2) left one token's
stream all non-positive after block 1, its ReLU all zero, block 2's LayerNorm 0/0."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from fuzzgen import Builder, Program, feeds, to_onnx
from hypothesis.errors import UnsatisfiedAssumption
from onnx import TensorProto, helper
from test_fuzz import _finite_with_eps, check_onnx_path, run_onnx

SEED = 0


def _post_activation_mlps(
    eps: float, scale: float | None = None, seed: int = SEED, beside: bool = False
) -> Program:
    """Two pre-norm MLP blocks, x = relu(x + W2 relu(W1 LN(x))), on (2, 2, 4) tokens; `scale`
    multiplies each branch (the formula depthscale writes, built here without rescompile);
    `beside`: a second chain, a LayerNorm with eps 1e-5 of a second input."""
    b = Builder(seed=seed, symbolic_batch=False)
    x = b.input("tokens0", (2, 2, 4))
    other = b.input("tokens1", (2, 2, 4)) if beside else None
    b.new_stream()
    for _ in range(2):
        branch = b.linear(b.act(b.linear(b.layernorm(x, eps), 4, False), "relu"), 4, False)
        if scale is not None:
            branch = b.scale(branch, scale)
        x = b.act(b.residual(x, branch, "identity", pre=True, skip_first=False), "relu")
    return b.finish([x] if other is None else [x, b.layernorm(other, 1e-5)])


def _outputs(program: Program) -> np.ndarray:
    return next(iter(run_onnx(to_onnx(program).SerializeToString(), feeds(program)).values()))


def test_regression_depthscale_on_eps_zero_norms_is_rejected_not_failed():
    program = _post_activation_mlps(0.0)
    assert np.isfinite(_outputs(program)).all()  # the original is finite on the test inputs
    # The formula itself, without rescompile: NaN with eps 0, finite with eps 1e-5.
    assert not np.isfinite(_outputs(_post_activation_mlps(0.0, 1 / math.sqrt(2)))).all()
    assert np.isfinite(_outputs(_post_activation_mlps(1e-5, 1 / math.sqrt(2)))).all()
    with pytest.raises(UnsatisfiedAssumption):
        check_onnx_path(program, ["depthscale"], preserving=False)


def test_regression_an_eps_zero_chain_beside_an_eps_1e_5_chain_is_rejected_not_failed():
    """Fuzz finding #30 (10,000-example run on 8307665): `rk2:method=heun` on an eps-0 RMSNorm
    chain beside an eps-1e-5 LayerNorm chain gave NaN from 0/0 in the first chain, and the
    excuse asked that every norm have eps 0. It asks for one now (`_has_zero_eps`)."""
    program = _post_activation_mlps(0.0, beside=True)
    assert not program.eps_zero and np.isfinite(_outputs(program)).all()
    with pytest.raises(UnsatisfiedAssumption):
        check_onnx_path(program, ["depthscale"], preserving=False)


def test_a_nan_that_is_not_an_eps_zero_norm_is_not_excused():
    """sqrt(-(x * x) - 1): NaN with no norm in sight, so eps = 1e-5 does not make it finite."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Add", ["sq", "one"], ["sq1"]),
        helper.make_node("Neg", ["sq1"], ["neg"]),
        helper.make_node("Sqrt", ["neg"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [one]), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model)
    assert not _finite_with_eps(model, {"x": np.ones(2, np.float32)})
