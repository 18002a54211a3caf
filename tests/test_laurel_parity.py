"""laurel's lr variant on token streams: after the rewrite, both frontends find the residual sites
that the model really has (the generator's ground truth), with the same kinds, streams and depths.

Shrunk from a fuzz failure (post-norm chains with a projection block and a bare-matmul block):
the low-rank term read a projection site's shortcut `W x`, which made the site an identity site of
`W x`; and beside a one-matmul branch the sum `W x + B A x` it inserts looked like a projection
site of its own, a new stream in one frontend only.
"""

from __future__ import annotations

import pytest
import torch
from fuzzgen import Builder, Program, feeds, to_onnx, to_torch
from test_fuzz import check_pass

from rescompile.analysis.residuals import find_residuals
from rescompile.api import build_passes, load, run_passes


def _projection_then_matmul(skip_first: bool) -> Program:
    """Post-norm, eps 0: a projection block (shortcut linear 4 -> 6, MLP branch), an identity MLP
    block, a weighted transition, then an identity block whose branch is one bare matmul."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, 3, 4))
    b.new_stream()
    branch = b.linear(b.act(b.linear(x, 8), "relu"), 6)
    x = b.layernorm(b.residual(b.linear(x, 6), branch, "projection", False, skip_first), 0.0)
    branch = b.linear(b.act(b.linear(x, 8), "relu"), 6)
    x = b.layernorm(b.residual(x, branch, "identity", False, skip_first), 0.0)
    x = b.linear(x, 6)
    b.new_stream()
    x = b.layernorm(b.residual(x, b.matmul_w(x, 6), "identity", False, skip_first), 0.0)
    return b.finish([x])


def _sites(graph) -> list[tuple]:
    return [(s.kind, s.stream, s.depth) for s in find_residuals(graph).sites]


@pytest.mark.parametrize("skip_first", [False, True])
def test_laurel_lr_keeps_the_true_sites_in_both_frontends(skip_first):
    program = _projection_then_matmul(skip_first)
    truth = [(s.kind, s.stream, s.depth) for s in program.sites]
    assert truth == [("projection", 0, 0), ("identity", 0, 1), ("identity", 1, 0)]
    module = to_torch(program)
    args = tuple(torch.from_numpy(v) for v in feeds(program).values())
    for frontend, graph in (("onnx", load(to_onnx(program))), ("torch", load(module, args, dynamic=False))):
        assert _sites(graph) == truth, frontend
        result = run_passes(graph, build_passes(["laurel:variant=lr,rank=2"]))
        assert result.stats["0:laurel"] == {"sites": 3, "terms": 3}, frontend
        assert _sites(graph) == truth, frontend
        assert not [s.name for s in find_residuals(graph).sites if s.name.startswith("laurel/")], frontend


def test_laurel_lr_passes_every_fuzz_property():
    """Both frontends, function kept (B = 0 at init), gradients, and parity of the sites after."""
    check_pass(_projection_then_matmul(False), ["laurel:variant=lr"])
