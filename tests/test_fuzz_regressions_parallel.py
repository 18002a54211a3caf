"""Regressions of the fuzzer (tests/test_fuzz.py) for `parallel`: the shrunk example of a `make fuzz`
parity failure, run through every property of the fuzzer (`check_pass`), plus the sites both
frontends must find after the rewrite.

Post-norm parallel makes a layer `x' = N2(h + M(x))` with `h = N1(x + A(x))`. When M is one matmul
and an activation, `h + act(x W)` is a projection site by the analysis' definition (a short
weighted shortcut of x beside a branch that reaches x through other weighted ops). Torch's SiLU is
one node and the shortcut's tail walked back through it; ONNX has no SiLU op, and its
`y * sigmoid(y)` reads y twice, which stopped the walk (a tail op had to read one live value): ONNX
found no site there, torch a projection that starts a new stream. The tail of a projection shortcut
is now anything computed from the weighted op's output alone through a few parameter-free ops
(rescompile/analysis/residuals.py, _projection_root).
"""

from __future__ import annotations

import pytest
from fuzzgen import Builder, Program
from test_fuzz import check_pass, frontend_graphs

from rescompile.analysis.residuals import find_residuals
from rescompile.api import build_passes, run_passes

SPEC = "parallel:c=0,learnable=false"


def _attention(b: Builder, h: int) -> int:
    """Self-attention with two heads of width 2 (written out: softmax(q k^T / sqrt(d)) v)."""
    q, k, v = (b.heads(b.linear(h, 4, True), 2) for _ in range(3))
    return b.linear(b.merge_heads(b.attention(q, k, v, None, False, "manual")), 4, True)


def _post_layer_with_matmul_mlp(act: str = "silu", manual: bool = False) -> Program:
    """One post-norm layer on tokens (LayerNorm, eps 0): an attention block, then a block whose
    branch is one matmul and an activation (`act`, written out in both forms with `manual`)."""
    b = Builder(seed=3, symbolic_batch=False)
    x = b.input("tokens0", (2, 1, 4))
    b.new_stream()
    y = _attention(b, x)
    x = b.layernorm(b.residual(x, y, "identity", False, False), 0.0)
    y = b.act(b.matmul_w(x, 4), act, manual)
    x = b.layernorm(b.residual(x, y, "identity", False, False), 0.0)
    return b.finish([x])


def test_regression_parallel_post_norm_silu_matmul_branch_parity():
    """Shrunk from [SPEC] on two post attention blocks and a post matmul (SiLU) block beside a
    second chain: sites after were onnx [identity(0,0), identity(0,1), identity(1,0), ...] and
    torch [identity(0,0), identity(0,1), projection(1,0), identity(2,0), ...]."""
    program = _post_layer_with_matmul_mlp()
    for frontend, graph in frontend_graphs(program):  # the layer is rewritten, not refused
        assert run_passes(graph, build_passes([SPEC])).stats == {"0:parallel": {"layers": 1}}, frontend
    check_pass(program, [SPEC])


@pytest.mark.parametrize(("act", "manual"), [("silu", False), ("silu", True), ("relu", False)])
def test_post_norm_parallel_leaves_the_matmul_block_a_projection_site(act, manual):
    """After the rewrite `h + act(x W)` is a projection site with fork x, on a stream of its own,
    in both frontends, whether the activation is one op or written out."""
    for frontend, graph in frontend_graphs(_post_layer_with_matmul_mlp(act, manual)):
        run_passes(graph, build_passes([SPEC]))
        sites = find_residuals(graph).sites
        got = [(s.kind, s.stream, s.depth) for s in sites]
        assert got == [("identity", 0, 0), ("projection", 1, 0)], (frontend, got)
        assert sites[1].fork is sites[0].fork, frontend
