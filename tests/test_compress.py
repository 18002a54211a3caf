"""compress: the planner meets its budget and spends it where the output changes least.

References are independent of the pass: parameter counts read from the torch modules, output
changes recomputed from the original and the compressed modules on the calibration batches.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from rescompile.errors import RescompileError
from rescompile.pipeline import compile_model
from tools.models import cached_onnx, gpt2


def test_meets_a_parameter_budget_and_logs_its_plan():
    source = cached_onnx("gpt2")
    result = compile_model(str(source), ["compress:params=0.7,of=model,importance=l2,step=0.25"])
    stats = result.result.stats["0:compress"]
    assert stats["left"] <= 0.7
    assert result.after["params"] <= 0.7 * result.before["params"]
    for step in stats["plan"]:  # the plan says what each step did and what it cost
        assert step["action"].startswith(("drop ", "prune ")) and step["measured"] == step["predicted"]
    changes = [step["output_change"] for step in stats["plan"]]
    assert changes == sorted(changes)  # the output drifts further with each step, never back
    onnx.checker.check_model(result.output)


@pytest.mark.parametrize("replace", ["identity", "linear"])
def test_drops_a_block_that_does_almost_nothing_before_pruning_width(replace):
    case = gpt2(layers=3)
    with torch.no_grad():  # block 1 barely changes the stream: removing it costs almost nothing
        case.module.h[1].attn.c_proj.weight.mul_(1e-4)
        case.module.h[1].attn.c_proj.bias.zero_()
        case.module.h[1].mlp.c_proj.weight.mul_(1e-4)
        case.module.h[1].mlp.c_proj.bias.zero_()
    result = compile_model(
        case.module,
        [f"compress:params=0.8,importance=l2,step=0.25,replace={replace}"],
        example_kwargs=case.kwargs,
        dynamic=False,
    )
    plan = result.result.stats["0:compress"]["plan"]
    assert plan[0]["action"] == ("drop h.1" if replace == "identity" else "drop h.1 (linear)"), plan
    if replace == "linear":  # a d x d map of the stream takes the block's place: no longer a GPT2Model
        return
    assert result.output.config.num_hidden_layers == 2  # whole blocks + uniform widths: still a GPT2Model


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("compress", "give params=F or latency=F"),
        ("compress:params=0.7,latency=0.7", "give params=F or latency=F"),
        ("compress:params=1.5", "must be in (0, 1)"),
        ("compress:params=0.5,step=0", "step must be in (0, 1)"),
        ("compress:params=0.5,of=layers", "of must be one of blocks, model"),
        ("compress:params=0.5,target=stream", "unknown target stream"),
        ("compress:params=0.5,distance=kl", "distance must be one of cosine, pooled, l2"),
    ],
)
def test_bad_budgets_are_refused(spec, message):
    with pytest.raises(RescompileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_model(str(cached_onnx("gpt2")), [spec])


def test_measures_after_removing_a_last_post_norm_layer():
    """Dropping BERT's last layer leaves an Identity as the model output; the next measurement
    must find it in the exported module (it is named as its IR node)."""
    from tools.models import bert

    case = bert(layers=3)
    with torch.no_grad():  # make the last layer the cheapest to drop
        for linear in (
            case.module.encoder.layer[2].attention.output.dense,
            case.module.encoder.layer[2].output.dense,
        ):
            linear.weight.mul_(1e-4)
            linear.bias.zero_()
    result = compile_model(
        case.module,
        ["compress:params=0.8,importance=l2,step=0.25"],
        example_kwargs=case.kwargs,
        dynamic=False,
    )
    plan = result.result.stats["0:compress"]["plan"]
    assert plan[0]["action"] == "drop encoder.layer.2", plan
    assert result.result.stats["0:compress"]["left"] <= 0.8


# ----- budgets, objective, progress -------------------------------------------------------------
def padded_batches(seed: int = 0, count: int = 3, batch: int = 3, seq: int = 8) -> list[dict]:
    """Calibration batches with padding at the end of some rows (attention_mask 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 101, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq - 3 :] = 0
        mask[2, seq - 5 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def count(module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("of", ["blocks", "model"])
def test_the_budget_is_a_fraction_of_the_blocks_or_of_the_whole_model(of):
    case = gpt2(layers=3)
    total, blocks = count(case.module), count(case.module, "h.")
    assert blocks < 0.9 * total  # the embeddings are a share no action can remove
    result = compile_model(
        case.module,
        [f"compress:params=0.7,of={of},importance=l2,step=0.25"],
        example_kwargs=case.kwargs,
        dynamic=False,
    )
    removed = total - count(result.output)
    scope = blocks if of == "blocks" else total
    assert removed >= 0.3 * scope  # the budget is met ...
    assert removed < 0.3 * scope + 0.25 * blocks  # ... without more than one width step too many
    stats = result.result.stats["0:compress"]
    assert stats["left"] == pytest.approx(1 - removed / scope, abs=2e-3)
    if of == "blocks":
        assert removed < 0.3 * total  # of the whole model, far less than 30% went


def output_change(original, compressed, batches, distance: str) -> float:
    """The change the planner must report, computed here from the two modules: every real
    (unpadded) token's hidden state of the compressed model against the ORIGINAL's."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            ref = original(**b).last_hidden_state.double().numpy()
            got = compressed(**b).last_hidden_state.double().numpy()
            mask = b["attention_mask"].numpy().astype(float)
            if distance == "pooled":  # each sequence's mean over its real tokens, then the cosine
                ref = (mask[..., None] * ref).sum(1) / mask.sum(1)[:, None]
                got = (mask[..., None] * got).sum(1) / mask.sum(1)[:, None]
                cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
                num += float((1 - cos).sum())
                den += len(cos)
            elif distance == "l2":
                num += float((mask[..., None] * (got - ref) ** 2).sum())
                den += float((mask[..., None] * ref**2).sum())
            else:
                cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
                num += float((mask * (1 - cos)).sum())
                den += float(mask.sum())
    return float(np.sqrt(num / den)) if distance == "l2" else num / den


@pytest.mark.parametrize("distance", ["cosine", "pooled", "l2"])
def test_the_output_change_is_measured_against_the_original_model(distance):
    """After several steps the reported change is the total drift from the original, padding
    left out; measured against the model of the previous step it would be the last step's."""
    case = gpt2(layers=3)
    batches = padded_batches()
    result = compile_model(
        case.module,
        [f"compress:params=0.45,importance=l2,step=0.25,distance={distance}"],
        example_kwargs=dict(batches[0]),
        calibration=batches,
        dynamic=False,
    )
    stats = result.result.stats["0:compress"]
    assert stats["steps"] >= 2, stats["plan"]
    expected = output_change(case.module, result.output, batches, distance)
    assert stats["output_change"] == pytest.approx(expected, rel=1e-3)
    last = stats["plan"][-1]
    assert last["output_change"] == pytest.approx(last["predicted_change"], rel=1e-6)


def test_reports_progress_through_the_pass_manager():
    case = gpt2(layers=3)
    said: list[str] = []
    compile_model(
        case.module,
        ["compress:params=0.8,importance=l2,step=0.25"],
        example_kwargs=case.kwargs,
        dynamic=False,
        progress=said.append,
    )
    steps = [m for m in said if m.startswith("pass 1/1: compress: step ")]
    assert steps and "step 1: 100.0% of the block parameters left, target 80%" in steps[0]
    assert any(m.startswith("pass 1/1: compress:   trying drop h.") for m in said)
    assert any(m.startswith("pass 1/1: compress:   trying prune mlp") for m in said)
    assert said[-1].startswith("pass 1/1: compress: done: ") or any("done: " in m for m in said)


class _PostNormTail(torch.nn.Module):
    """Two post-norm MLP blocks, the second's written-out RMSNorm (x * rsqrt(mean x^2 + eps) * w)
    being the model's output: nothing reads its end, as in a fuzz example where torch's block
    ended before the norm's gain and ONNX's (an Identity names the output) after it."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))
        self.gain = torch.nn.ParameterList(torch.nn.Parameter(torch.rand(d) + 0.5) for _ in range(2))

    def forward(self, x):
        for mlp, gain in zip(self.mlp, self.gain):
            x = x + mlp(x)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
        return x


def test_a_post_norm_block_that_ends_the_model_owns_its_norm_gain():
    from rescompile.analysis.importance import depth_units
    from rescompile.analysis.residuals import find_residuals
    from rescompile.api import load
    from rescompile.passes.compress import _block_params

    module = _PostNormTail()
    graph = load(module, (torch.randn(2, 3, 4),), dynamic=False)
    units = depth_units(find_residuals(graph), "block")
    assert len(units) == 2
    # each block: its linear (16 + 4) and its norm's gain (4), counted on the module
    assert _block_params(graph, units) == count(module) == 2 * (16 + 4 + 4)


def without_blocks(module, removed: set[int]):
    """The reference for a drops-only plan: a copy of the GPT-2 with those blocks deleted."""
    import copy

    reduced = copy.deepcopy(module)
    reduced.h = torch.nn.ModuleList(b for i, b in enumerate(reduced.h) if i not in removed)
    reduced.config.n_layer = len(reduced.h)
    return reduced


def test_plans_search_one_plan_per_number_of_drops_and_keep_the_least_change():
    """search=plans makes the plan with 0, 1, 2 blocks dropped (2 of 4 meet 0.7 alone: the search
    stops there) and keeps the one with the least output change; each plan's reported change is
    checked against a reference built without the pass where one exists (the drops-only plan:
    the model with those blocks deleted; the chosen plan: the returned module)."""
    case = gpt2(layers=4)
    batches = padded_batches()
    result = compile_model(
        case.module,
        ["compress:params=0.7,importance=l2,target=mlp"],
        example_kwargs=dict(batches[0]),
        calibration=batches,
        dynamic=False,
    )
    stats = result.result.stats["0:compress"]
    plans = stats["plans"]
    assert [p["drops"] for p in plans] == [0, 1, 2], plans
    assert all(p["left"] <= 0.7 for p in plans)
    drops_only = plans[2]
    assert all(a.startswith("drop h.") for a in drops_only["actions"])
    removed = {int(a.removeprefix("drop h.")) for a in drops_only["actions"]}
    reference = without_blocks(case.module, removed)
    assert drops_only["output_change"] == pytest.approx(
        output_change(case.module, reference, batches, "cosine"), rel=1e-3, abs=1e-6
    )
    chosen = output_change(case.module, result.output, batches, "cosine")
    assert stats["output_change"] == pytest.approx(chosen, rel=1e-3, abs=1e-6)
    assert chosen <= min(p["output_change"] for p in plans) * (1 + 1e-3)
    assert [s["action"] for s in stats["plan"]] in [p["actions"] for p in plans]


def test_plans_without_width_to_prune_drop_blocks_and_say_why_width_was_refused():
    """GPT-2 has no conv channels: the width-only plan is refused with its reason, and the chosen
    plan drops blocks; its module equals the model with those blocks deleted."""
    case = gpt2(layers=4)
    batches = padded_batches()
    result = compile_model(
        case.module,
        ["compress:params=0.7,target=channels"],
        example_kwargs=dict(batches[0]),
        calibration=batches,
        dynamic=False,
    )
    stats = result.result.stats["0:compress"]
    assert "no width action saves more" in stats["plans"][0]["refused"], stats["plans"]
    json.dumps(stats, allow_nan=False)  # the stats are valid JSON (a refused plan has no inf size)
    removed = {int(s["action"].removeprefix("drop h.")) for s in stats["plan"]}
    assert len(removed) == 2 and stats["left"] <= 0.7
    reference = without_blocks(case.module, removed)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(
                result.output(**b).last_hidden_state, reference(**b).last_hidden_state, atol=1e-5, rtol=1e-5
            )


def test_greedy_search_makes_one_plan():
    case = gpt2(layers=3)
    result = compile_model(
        case.module,
        ["compress:params=0.8,importance=l2,search=greedy"],
        example_kwargs=case.kwargs,
        dynamic=False,
    )
    stats = result.result.stats["0:compress"]
    assert "plans" not in stats and stats["left"] <= 0.8
