"""Regressions of the fuzzer (tests/test_fuzz.py) for the wave-2 passes: each test is the shrunk
example of a failure `make fuzz` found, run through every property of the fuzzer (`check_pass`:
both frontends, refusal, checker, runs, gradients, function and parity), plus what the defect was.
"""

from __future__ import annotations

import pytest
import torch
from fuzzgen import Builder, Program, feeds, to_onnx, to_torch
from hypothesis.errors import DidNotReproduce
from test_fuzz import PropertyFailed, check_onnx_path, check_pass, check_torch_path

from rescompile.api import build_passes, load, run_passes


def _pre_norm_mlp(blocks: int = 1, head: str = "none", width: int = 4, tokens: int = 1) -> Program:
    """x + W2 relu(W1 LN(x) + b1) + b2, `blocks` times, eps 0; the last add is the model's output
    (head none) or feeds a final LayerNorm (head norm)."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, tokens, width))
    b.new_stream()
    for _ in range(blocks):
        branch = b.linear(b.act(b.linear(b.layernorm(x, 0.0), 8), "relu"), width)
        x = b.residual(x, branch, "identity", pre=True, skip_first=False)
    return b.finish([b.layernorm(x, 0.0) if head == "norm" else x])


@pytest.mark.parametrize("init", ["0", "0.5"])
def test_regression_loop_over_blocks_that_end_the_model(init):
    """Shrunk from ['loop'] on one pre-norm MLP block whose add is the model's output. In torch
    the add is the graph output itself (ONNX has an Identity to `out0` after it), and loop refused
    ("the run's output 'add' is a graph output"): the frontends disagreed. The loop's result now
    takes the output's place and name."""
    program = _pre_norm_mlp(blocks=2)
    spec = [f"loop:init={init}"]
    check_pass(program, spec)
    assert check_torch_path(program, spec, preserving=init == "0").refused is None
    # The ONNX output keeps its name when the loop's result replaces a graph output.
    graph = load(to_onnx(program))
    out = graph.outputs[0].producer.inputs[0]  # the Identity's input: the last add
    graph.set_outputs([out])
    name = out.name
    run_passes(graph, build_passes(spec))
    assert [v.name for v in graph.outputs] == [name] and graph.outputs[0] is not out


def test_regression_fuse_leaves_no_dead_norm_parameters():
    """Shrunk from ['fuse'] on one pre-norm MLP block (LayerNorm -> Linear): after folding the
    LayerNorm's affine into the linear, every trainable parameter of the torch output must still
    get a gradient (the gain and shift were replaced by constants but stayed in the module as
    parameters nothing read; fixed in passes/fuse.py by its owner)."""
    check_pass(_pre_norm_mlp(), ["fuse"])


def test_fuzz_regressions_build_both_forms():
    """The shrunk models are one model in both frontends (the generator's own check)."""
    program = _pre_norm_mlp(blocks=2, head="norm")
    module = to_torch(program)
    args = tuple(torch.from_numpy(v) for v in feeds(program).values())
    assert check_onnx_path(program, ["identity"], preserving=True).refused is None
    assert len(list(load(module, args, dynamic=False))) > 0


def _two_segments() -> Program:
    """Two pre-norm MLP blocks with a linear transition between them (two streams), final norm."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, 1, 4))
    for i in range(2):
        if i:
            x = b.linear(x, 4)
        b.new_stream()
        branch = b.linear(b.act(b.linear(b.layernorm(x, 0.0), 8), "relu"), 4)
        x = b.residual(x, branch, "identity", pre=True, skip_first=False)
    return b.finish([b.layernorm(x, 0.0)])


def test_regression_drop_counts_a_linear_bias_alike_in_both_frontends():
    """Shrunk from ['drop'] on a pre-norm stack: drop reported params_removed 64 for the ONNX
    graph and 76 for the torch module of one model. A site's branch_params counted the weighted
    ops' inputs only, and an ONNX linear's bias is a separate Add (MatMul + Add). The bias add
    now counts with its linear (rescompile/analysis/residuals.py)."""
    program = _two_segments()
    check_pass(program, ["drop"])
    want = 4 * 8 + 8 + 8 * 4 + 4  # the removed block's two linears, biases included
    for path in (check_onnx_path, check_torch_path):
        assert path(program, ["drop"], preserving=False).stats["0:drop"]["params_removed"] == want


def _pre_activation_cnn() -> Program:
    """One pre-activation conv block (BN -> ReLU -> conv -> BN -> ReLU -> conv -> BN), final BN."""
    b = Builder(seed=2, symbolic_batch=False)
    x = b.input("image0", (2, 2, 2, 2))
    b.new_stream()
    h = b.act(b.batchnorm(x, 0.0), "relu")
    branch = b.batchnorm(b.conv(b.act(b.batchnorm(b.conv(h, 2), 0.0), "relu"), 2), 0.0)
    x = b.residual(x, branch, "identity", pre=True, skip_first=True)
    return b.finish([b.batchnorm(x, 0.0)])


def test_regression_batchnorm_running_statistics_are_not_parameters():
    """Shrunk from ['prune'] on a pre-activation CNN: prune removed 40 parameters from the ONNX
    graph and 38 from the torch module (the same channel). The ONNX frontend made every float
    initializer a parameter, BatchNorm's running mean and variance included (torch: buffers); they
    are constants now (rescompile/frontends/onnx.py), so counts and magnitude scores agree."""
    program = _pre_activation_cnn()
    check_pass(program, ["prune"])
    graph = load(to_onnx(program))
    stats = [v for n in graph if n.op_type == "BatchNormalization" for v in n.inputs[3:5]]
    assert stats and all(v.role == "const" for v in stats)
    assert all(n.inputs[1].role == "param" for n in graph if n.op_type == "BatchNormalization")


def _one_head_attention(heads: int = 1, dh: int = 2) -> Program:
    """x + W_o attention(heads of LN(x) W_q, W_k, W_v) (separate projections), the add the output."""
    b = Builder(seed=5, symbolic_batch=False)
    x = b.input("tokens0", (2, 2, 4))
    b.new_stream()
    h = b.layernorm(x, 0.0)
    q, k, v = (b.heads(b.linear(h, heads * dh), heads) for _ in range(3))
    branch = b.linear(b.merge_heads(b.attention(q, k, v, None, False, "manual")), 4)
    return b.finish([b.residual(x, branch, "identity", pre=True, skip_first=True)])


def test_regression_prune_head_width_behind_unflatten():
    """Shrunk from ['compress:params=0.5,step=0.5,max_steps=3'] (compress's uniform width step),
    then to ['prune:uniform=true,ratio=0.5'] on one attention block with one head of width 2: the
    q.k and v groups (the head's channels) are pruned to width 1. torch.unflatten's `sizes` kept
    (1, 2) and the torch module failed; prune now rewrites `sizes` like a reshape's `shape`."""
    check_pass(_one_head_attention(), ["prune:uniform=true,ratio=0.5"])


def test_known_defects_have_strict_xfail_regressions():
    """Every failure the fuzz tests count as known (test_fuzz.KNOWN_DEFECTS) has its regression
    here, marked strict xfail: once the defect is fixed that test passes, fails as XPASS, and the
    row (and the mark) must go, so the fuzzer checks the property again."""
    import sys

    from test_fuzz import KNOWN_DEFECTS

    module = sys.modules[__name__]
    for _, _, _, test_name in KNOWN_DEFECTS:
        test = getattr(module, test_name)
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "xfail"]
        assert marks and marks[0].kwargs.get("strict"), test_name


@pytest.mark.xfail(
    strict=True,
    reason="fold/_scale_params: a per-channel factor (layerscale's gamma) over a branch ending in "
    "`* 0.5` scales the ONNX constant into a vector but is refused on torch's Python number, which "
    "cannot hold one (it needs the number turned into a tensor argument)",
)
def test_regression_fold_per_channel_factor_into_a_number():
    """From the constant-multiply regression with layerscale: ['layerscale:init=0.5', 'fold'] on a
    branch ending in a written-out GELU; the frontends fold differently."""
    from test_fuzz import _pre_norm_stack

    check_pass(_pre_norm_stack(act="gelu", manual=True), ["layerscale:init=0.5", "fold"])


def _replay(name: str, blob: bytes) -> None:
    """Replay one example of test_fuzz's fuzz test for pass `name` (its exact draws: style,
    program, specs) from hypothesis's @reproduce_failure blob; once the defect is fixed the
    example no longer fails and hypothesis raises DidNotReproduce (so the xfail, limited to
    PropertyFailed, fails and says so)."""
    from fuzzgen import STYLES, programs
    from hypothesis import given, reproduce_failure, settings
    from hypothesis import strategies as st
    from test_fuzz import pass_specs

    def fuzz(data):
        program = data.draw(programs(style=data.draw(st.sampled_from(STYLES))), label="program")
        check_pass(program, data.draw(pass_specs(name), label="specs"))

    test = given(data=st.data())(fuzz)
    reproduce_failure("6.170.17", blob)(settings(database=None, deadline=None)(test))()


@pytest.mark.xfail(
    strict=True,
    raises=PropertyFailed,
    reason="fuse (owned elsewhere): ['fuse:inputs=true'] on a two-chain model (post-norm tokens "
    "with attention and tied MLPs, a BatchNorm CNN): the stats list 6 refused folds for ONNX, 8 "
    "for torch (not shrunk yet: found at 08:45 by the make-test budget)",
)
def test_regression_fuse_refusals_alike_in_both_frontends():
    _replay(
        "fuse",
        b"AXicNY3BEYBADAITciVoQdh/UULQuQ+zkD3iue4iqqjXPJxWGoIh1RvQu5ivWewGPKUw7rrj0MDbUNhtrw9iUyEv"
        b"o+h8iChUGpXB6s5Hlv5ja8bnLyAgEuc=",
    )


def test_regression_prune_finds_the_same_mlp_groups_in_both_frontends():
    """target=mlp pruned 4 groups in ONNX and 3 in torch: torch's repeat_interleave (GQA's
    key/value repeat) had no axis map, so its group was opaque there while ONNX's Unsqueeze,
    Expand, Reshape mapped. It maps now (a Group, one input index per block of repeats)."""
    with pytest.raises(DidNotReproduce):
        _replay(
            "prune",
            b"AXicTY7BDcAwCAN9pB3M6v471UAfVaQQgznHPEhyIWNZ+HK0fHK6SpBnmVgqDdpX7UzPpGo2I3t8WimUbGU4iEVH"
            b"MwnTvDuCBQ0SlvDJ6uiOWN9pSPG7kjE0fRv7EdbwAjD+FVU=",
        )


def test_regression_parallel_refuses_alike_in_both_frontends():
    """parallel:c=0 on a post-norm RMSNorm stream: ONNX's RMSNorm is several nodes, torch's one
    rms_norm node, and the post-norm test once asked for a single norm node, so ONNX refused the
    site torch converted. It now reads the analysis's post-norm mark. The replayed example must
    pass every property (hypothesis then says it did not reproduce)."""
    with pytest.raises(DidNotReproduce):
        _replay(
            "parallel",
            b"AXicdYsLCgAgCEOnHqSzrPsfqvxRECHo3PaoUwaoAu4BxZcfpYUTVppxtFx0/aIsU8/xwSX/KqWyF2rkVFssXoERyQ==",
        )


@pytest.mark.parametrize(
    "name, blob",
    [
        (
            "loop",
            b"AXicLYzbDcAwDALB8RL97SZ0/6HqSyL5gTjs1Pc+iqeiSGmGslK7NaTYBAyu9JjG25m5OxA8wttb9vnIuAjRtLkQodSN/+/rDkw=",
        ),
        (
            "drop",
            b"AXicXY3LEYBACEMTVgt7FmD/5cjHPegwTEgCgbjOW4SFEWpIZBHFk8h7aOBH13dtjR64Bo/HQdupZmdJvOcxf2pxB7vUynkA/ZUPgw==",
        ),
        ("compress", b"AXicJcvRFQAgCAJAwAaL9h8q0R8f4mk9XZowDQNWRrbySQcyWU2apeGamutY7GtS0AeB2QiL"),
    ],
)
def test_regression_post_norm_blocks_end_after_a_written_out_norm(name, blob):
    """The last block of a post-norm stream ends after its norm. That was found for torch's one
    rms_norm node but not for ONNX's RMSNorm written out (Pow, ReduceMean, Add, Sqrt, Div, Mul),
    so loop looped a different region (outputs 0.99 apart), drop scored different exits and
    compress chose differently. `analysis.importance._after_post_norm` now follows a written-out
    norm to where its ops join again; the replayed examples (the 1,000-example run's) pass."""
    with pytest.raises(DidNotReproduce):
        _replay(name, blob)


def test_regression_prune_keeps_sdpa_scale_of_the_unpruned_head_dim():
    """prune on one single-head sdpa attention removes head_dim channels of q and k. torch's
    scaled_dot_product_attention without `scale` divides by sqrt of the head_dim it is given, so
    the torch module changed its softmax while ONNX (a constant scale) kept it: outputs 0.038
    apart (found by make test's budget). prune now pins scale = 1/sqrt(original head_dim)."""
    with pytest.raises(DidNotReproduce):
        _replay("prune", b"AXicc2R0ZGBwZGRwZADRzCACyAVCZrAIVByiAgYAkBEEng==")
