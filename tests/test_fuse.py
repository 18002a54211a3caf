"""fuse: equals the unfused model (norm gains and shifts randomised so folding them matters)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import rescompile
from rescompile.ir import OpKind
from rescompile.validation import assert_close, run_onnx
from tests.test_parallel import neox
from tools.models import ResidualMLP, build, export_onnx


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _randomised(name: str):
    """A test model whose norm gains and shifts and linear biases are not 1 and 0."""
    case = build(name)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in case.module.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return case


@pytest.mark.parametrize(
    "name,folded,fused",
    [("gpt2", 4, 0), ("llama", 4, 10), ("bert", 0, 6), ("vit", 4, 6)],
)
def test_fuse_keeps_the_function_in_torch(name, folded, fused):
    case = _randomised(name)
    result = rescompile.pipeline.compile_model(case.module, ["fuse"], example_kwargs=case.kwargs)
    stats = result.result.stats["0:fuse"]
    assert (stats["norms_folded"], stats["linears_fused"]) == (folded, fused)
    with torch.no_grad():
        assert_close(_hidden(result.output(**case.kwargs)), _hidden(case.module(**case.kwargs)))


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_fuse_keeps_the_function_in_onnx(tmp_path, name):
    source = export_onnx(_randomised(name), tmp_path / "in.onnx")
    result = rescompile.pipeline.compile_model(
        str(source), ["fuse"], output=tmp_path / "f.onnx", validate=True
    )
    stats = result.result.stats["0:fuse"]
    assert stats["norms_folded"] == 4 and stats["linears_fused"] >= 6
    assert result.validation.ok


def test_after_shared_norm_parallel_the_two_input_projections_become_one():
    model = neox(parallel=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    ids = {"input_ids": torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))}
    parallel = rescompile.apply(model, ["parallel:shared_norm=true"], example_kwargs=ids)
    result = rescompile.pipeline.compile_model(
        model, ["parallel:shared_norm=true", "fuse"], example_kwargs=ids
    )
    assert result.result.stats["1:fuse"]["linears_fused"] == 4  # QKV + MLP input, in each of 2 layers
    fused = result.output
    with torch.no_grad():
        assert_close(_hidden(fused(**ids)), _hidden(parallel(**ids)))
    fused.train()
    target = torch.randn_like(_hidden(fused(**ids)))
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(_hidden(fused(**ids)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_options_switch_each_rewrite_off_and_nothing_to_do_is_reported():
    case = _randomised("llama")
    only_fold = rescompile.pipeline.compile_model(
        case.module, ["fuse:inputs=false"], example_kwargs=case.kwargs
    )
    assert only_fold.result.stats["0:fuse"]["linears_fused"] == 0
    assert only_fold.result.stats["0:fuse"]["norms_folded"] == 4
    plain = build("residual_mlp")
    nothing = rescompile.pipeline.compile_model(plain.module, ["fuse:norms=false"], example_inputs=plain.args)
    assert not nothing.result.modified


# ----- (c) output fusion: [a | h] [W_o; W_down] + (b_o + b_down) ---------------------------


def _linears(graph) -> int:
    """MatMul-like ops with a 2-D weight parameter: the linear layers."""
    return sum(
        1
        for n in graph
        if n.kind is OpKind.WEIGHTED
        and any(v is not None and v.is_initializer and len(v.shape or ()) == 2 for v in n.inputs)
    )


def _graph(model, passes, **kwargs):
    graph = rescompile.pipeline.load(model, **kwargs)
    stats = rescompile.api.run_passes(graph, rescompile.api.build_passes(passes)).stats if passes else {}
    return graph, stats


# per layer (2 layers): sequential; after parallel + fuse; after parallel + fuse:outputs=false.
# GPT-2 and ViT: the two folded LayerNorms of x merge, so QKV and the MLP input become one MatMul;
# LLaMA's RMSNorm is decomposed into elementwise ops, which are not merged: QKV and gate/up stay two.
MATMULS = {"gpt2": (4, 2, 3), "llama": (7, 3, 4), "vit": (6, 2, 3)}


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_after_parallel_fuse_keeps_the_function_and_sums_the_outputs_in_one_matmul(name):
    case = _randomised(name)
    parallel = rescompile.apply(case.module, ["parallel"], example_kwargs=case.kwargs)
    result = rescompile.pipeline.compile_model(case.module, ["parallel", "fuse"], example_kwargs=case.kwargs)
    stats = result.result.stats["1:fuse"]
    assert (stats["sums_fused"], stats["outputs_fused"]) == (2, 4)
    with torch.no_grad():
        want = _hidden(parallel(**case.kwargs))
        assert_close(_hidden(result.output(**case.kwargs)), want)
        assert not np.allclose(_hidden(case.module(**case.kwargs)), want, atol=1e-3)  # parallel matters
    sequential, fused, inputs_only = MATMULS[name]
    assert _linears(_graph(case.module, [], example_kwargs=case.kwargs)[0]) == 2 * sequential
    graph, _ = _graph(case.module, ["parallel", "fuse"], example_kwargs=case.kwargs)
    assert _linears(graph) == 2 * fused
    graph, _ = _graph(case.module, ["parallel", "fuse:outputs=false"], example_kwargs=case.kwargs)
    assert _linears(graph) == 2 * inputs_only


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_after_parallel_fuse_keeps_the_function_in_onnx_runtime(tmp_path, name):
    case = _randomised(name)
    source = export_onnx(case, tmp_path / "in.onnx")
    rescompile.pipeline.compile_model(str(source), ["parallel"], output=tmp_path / "p.onnx")
    result = rescompile.pipeline.compile_model(str(source), ["parallel", "fuse"], output=tmp_path / "pf.onnx")
    assert result.result.stats["1:fuse"]["outputs_fused"] == 4
    assert _linears(rescompile.pipeline.load(str(tmp_path / "pf.onnx"))) == 2 * MATMULS[name][1]
    feeds = {k: v.numpy() for k, v in case.kwargs.items()}
    want = next(iter(run_onnx(tmp_path / "p.onnx", feeds).values()))
    got = next(iter(run_onnx(tmp_path / "pf.onnx", feeds).values()))
    assert_close(got, want)


def test_parallel_and_fuse_equal_gpt_neox_with_parallel_residual():
    """Independent of both passes: HF's own parallel layout with the same weights."""
    model = neox(parallel=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    reference = neox(parallel=True)
    reference.load_state_dict(model.state_dict())
    ids = {"input_ids": torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))}
    result = rescompile.pipeline.compile_model(model, ["parallel", "fuse"], example_kwargs=ids)
    assert result.result.stats["1:fuse"]["outputs_fused"] == 4
    with torch.no_grad():
        assert_close(_hidden(result.output(**ids)), _hidden(reference(**ids)))


def test_bert_post_norm_parallel_has_no_summed_outputs_and_fuse_stays_exact():
    """Post-norm parallel BERT is N2(N1(x + A x) + M x): a norm separates the two branch outputs,
    so there is no sum of linear outputs to fuse; fuse must still keep the function."""
    case = _randomised("bert")
    parallel = rescompile.apply(case.module, ["parallel"], example_kwargs=case.kwargs)
    result = rescompile.pipeline.compile_model(case.module, ["parallel", "fuse"], example_kwargs=case.kwargs)
    assert result.result.stats["1:fuse"]["outputs_fused"] == 0
    with torch.no_grad():
        assert_close(_hidden(result.output(**case.kwargs)), _hidden(parallel(**case.kwargs)))


def test_three_summed_outputs_after_shallow_become_one_matmul():
    torch.manual_seed(0)
    model = ResidualMLP(blocks=3).eval()
    x = torch.randn(2, 5, 16)
    shallow = rescompile.apply(model, ["shallow:k=3"], example_inputs=(x,))
    result = rescompile.pipeline.compile_model(
        model, ["shallow:k=3", "fuse:norms=false,inputs=false"], example_inputs=(x,)
    )
    assert (result.result.stats["1:fuse"]["sums_fused"], result.result.stats["1:fuse"]["outputs_fused"]) == (
        1,
        3,
    )
    with torch.no_grad():
        assert_close(result.output(x), shallow(x))


class _SharedOutput(torch.nn.Module):
    """x + W relu(A x) + W relu(B x): one output weight used twice."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(width, 32), torch.nn.Linear(width, 32)
        self.out = torch.nn.Linear(32, width)

    def forward(self, x):
        return x + self.out(torch.relu(self.a(x))) + self.out(torch.relu(self.b(x)))


def test_shared_weights_and_sequential_layers_are_left_with_a_reason():
    x = torch.randn(2, 5, 16)
    shared = rescompile.pipeline.compile_model(_SharedOutput().eval(), ["fuse"], example_inputs=(x,))
    stats = shared.result.stats["0:fuse"]
    assert stats["outputs_fused"] == 0
    assert any("shares" in line and "outputs left unfused" in line for line in stats["refused"])
    case = _randomised("gpt2")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("rescompile.fuse")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sequential = rescompile.pipeline.compile_model(case.module, ["fuse"], example_kwargs=case.kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert sequential.result.stats["0:fuse"]["outputs_fused"] == 0
    # logged, not refused: every site after the first reads a partial sum the next norm also reads
    assert sum("apply parallel first" in line for line in lines) == 3
    learnable = rescompile.pipeline.compile_model(
        case.module, ["parallel:c=1", "fuse"], example_kwargs=case.kwargs
    )  # the MLP reads x + A: the partial sum feeds something else
    assert learnable.result.stats["1:fuse"]["outputs_fused"] == 0


# ----- a norm's shift into a linear whose bias is a separate add (ONNX's MatMul + Add) -----------
def _norm_linear_then_block():
    """h = W LN(x) + b (the LN's shift is not 0), then h + W2 relu(W1 h): the sum's operand h is a
    linear output that the block also reads, which output fusion refuses in both frontends."""
    from tests.fuzzgen import Builder

    b = Builder(seed=4, symbolic_batch=False)
    x = b.input("tokens0", (2, 3, 4))
    b.new_stream()
    h = b.linear(b.layernorm(x, 0.0), 4)
    branch = b.linear(b.act(b.linear(h, 8), "relu"), 4)
    return b.finish([b.residual(h, branch, "identity", pre=False, skip_first=True)])


def test_a_norm_shift_folds_into_the_separate_bias_add_alike_in_both_frontends():
    from tests.fuzzgen import feeds, to_onnx, to_torch

    program = _norm_linear_then_block()
    model, inputs = to_onnx(program), feeds(program)
    want = run_onnx(model.SerializeToString(), inputs)
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    compile_model = rescompile.pipeline.compile_model
    onnx_out = compile_model(model, ["fuse"])
    torch_out = compile_model(to_torch(program), ["fuse"], example_inputs=args, dynamic=False)
    # The shift went into linear0's own bias add: no second add hides the linear from (c).
    adds = [n.name for n in onnx_out.graph if n.kind is OpKind.ADD]
    assert adds == ["linear0.bias", "linear1.bias", "linear2.bias", "res0"]
    stats = {"onnx": onnx_out.result.stats["0:fuse"], "torch": torch_out.result.stats["0:fuse"]}
    for s in stats.values():
        assert s["norms_folded"] == 1
        assert [line.split(": ")[1] for line in s["refused"]] == ["outputs left unfused"], s["refused"]
        assert "is also read elsewhere" in s["refused"][0]
    got = run_onnx(onnx_out.output.SerializeToString(), inputs)
    for name, value in want.items():
        assert_close(got[name], value, name=name)
    with torch.no_grad():
        assert_close(torch_out.output(*args), torch.from_numpy(next(iter(want.values()))))
