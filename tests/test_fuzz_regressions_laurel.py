"""Regressions of the fuzzer (tests/test_fuzz.py) for laurel's pa variant: the shrunk example of a
`make fuzz` parity failure, run through every property of the fuzzer (`check_pass`), plus the
sites both frontends must find after the rewrite (the generator's ground truth).

pa adds `g * x_j` (an earlier stream value) into block l's branch: `x_l + (F(x_l) + g x_j)`. That
sum has the shape of a scaled long skip from x_j around blocks j..l, and detection read it as a
site of its own: streams were cut at every block. When x_0 was the fork of a projection block,
torch also dropped the projection (nested in the long skip with the same fork), while ONNX, whose
written-out RMSNorm ends in `normed * gain`, looked through the gain to another fork and kept it.
"""

from __future__ import annotations

import pytest
from fuzzgen import Builder, Program
from test_fuzz import _sites4, check_pass, frontend_graphs

from rescompile.analysis.residuals import find_residuals
from rescompile.api import build_passes, run_passes


def _mlp(b: Builder, h: int, out: int) -> int:
    return b.linear(b.act(b.linear(h, 4, False), "relu"), out, False)


def _rmsnorm_then_projection(lead_norm: bool = True, style: str = "module", post: bool = False) -> Program:
    """RMSNorm (eps 0) -> a projection block 4 -> 4 (shortcut linear, MLP branch) -> an identity
    MLP block: pa adds `g * x_0`, the projection's fork, into the identity block's branch."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, 1, 4))
    if lead_norm:
        x = b.rmsnorm(x, 0.0, style)
    b.new_stream()
    x = b.residual(b.linear(x, 4, False), _mlp(b, x, 4), "projection", False, False)
    if post:
        x = b.rmsnorm(x, 0.0, style)
    x = b.residual(x, _mlp(b, x, 4), "identity", False, False)
    return b.finish([x])


def _identity_chain(placement: str) -> Program:
    """Three identity MLP blocks on one stream, pre- or post-norm (LayerNorm, eps 0)."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, 1, 4))
    b.new_stream()
    for _ in range(3):
        x = b.residual(
            x,
            _mlp(b, b.layernorm(x, 0.0) if placement == "pre" else x, 4),
            "identity",
            placement == "pre",
            False,
        )
        if placement == "post":
            x = b.layernorm(x, 0.0)
    return b.finish([x])


def test_regression_laurel_pa_keeps_a_projection_site_after_rmsnorm():
    """Shrunk from ['laurel:variant=pa'] (a post attention block, a projection segment, a weighted
    transition, then a second chain): sites after were onnx [projection(1,0), identity(0,1), ...]
    and torch [identity(0,1), identity(1,0), ...], one site fewer."""
    check_pass(_rmsnorm_then_projection(), ["laurel:variant=pa"])


@pytest.mark.parametrize(
    "program",
    [
        _rmsnorm_then_projection(),
        _rmsnorm_then_projection(post=True),
        _rmsnorm_then_projection(style="manual"),
        _rmsnorm_then_projection(lead_norm=False),
        _identity_chain("pre"),
        _identity_chain("post"),
    ],
    ids=["rmsnorm", "rmsnorm-post", "rmsnorm-manual", "no-norm", "chain-pre", "chain-post"],
)
def test_laurel_pa_keeps_the_true_sites_in_bothfrontend_graphs(program):
    """The pa terms are part of their block: both frontends find the generator's sites, with the
    same kinds, streams and depths, before and after, and no site at a term laurel added."""
    truth = [(s.kind, s.stream, s.depth) for s in program.sites]
    for frontend, graph in frontend_graphs(program):
        assert _sites4(graph) == truth, frontend
        result = run_passes(graph, build_passes(["laurel:variant=pa"]))
        assert result.stats["0:laurel"]["terms"] > 0, frontend
        assert _sites4(graph) == truth, frontend
        assert not [s.name for s in find_residuals(graph).sites if s.name.startswith("laurel/")], frontend


def test_a_rescaled_skip_keeps_the_fork_after_a_written_out_rmsnorm():
    """After `laurel:variant=rw` (beta * skip), the fork is still the norm's output, the value the
    branch reads; in ONNX it was the value before the RMSNorm's gain (`normed * gain` looked like
    one more scaling), so pa after rw read other earlier values in the two frontends."""
    program = _rmsnorm_then_projection(post=True)
    for frontend, graph in frontend_graphs(program):
        before = [s.fork for s in find_residuals(graph).sites]
        run_passes(graph, build_passes(["laurel:variant=rw"]))
        assert [s.fork for s in find_residuals(graph).sites] == before, frontend
