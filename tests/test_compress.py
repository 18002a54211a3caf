"""compress: the planner meets its budget and spends it where the output changes least."""

from __future__ import annotations

import onnx
import pytest
import torch

from rescompile.errors import RescompileError
from rescompile.pipeline import compile_model
from tools.models import cached_onnx, gpt2


def test_meets_a_parameter_budget_and_logs_its_plan():
    source = cached_onnx("gpt2")
    result = compile_model(str(source), ["compress:params=0.7,importance=l2,step=0.25"])
    stats = result.result.stats["0:compress"]
    assert stats["left"] <= 0.7
    assert result.after["params"] <= 0.7 * result.before["params"]
    for step in stats["plan"]:  # the plan says what each step did and what it cost
        assert step["action"].startswith(("drop ", "prune ")) and step["measured"] == step["predicted"]
    changes = [step["output_change"] for step in stats["plan"]]
    assert changes == sorted(changes)  # the output drifts further with each step, never back
    onnx.checker.check_model(result.output)


def test_drops_a_block_that_does_almost_nothing_before_pruning_width():
    case = gpt2(layers=3)
    with torch.no_grad():  # block 1 barely changes the stream: removing it costs almost nothing
        case.module.h[1].attn.c_proj.weight.mul_(1e-4)
        case.module.h[1].attn.c_proj.bias.zero_()
        case.module.h[1].mlp.c_proj.weight.mul_(1e-4)
        case.module.h[1].mlp.c_proj.bias.zero_()
    result = compile_model(
        case.module,
        ["compress:params=0.8,importance=l2,step=0.25"],
        example_kwargs=case.kwargs,
        dynamic=False,
    )
    plan = result.result.stats["0:compress"]["plan"]
    assert plan[0]["action"] == "drop h.1", plan
    assert result.output.config.num_hidden_layers == 2  # whole blocks + uniform widths: still a GPT2Model


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("compress", "give params=F or latency=F"),
        ("compress:params=0.7,latency=0.7", "give params=F or latency=F"),
        ("compress:params=1.5", "must be in (0, 1)"),
        ("compress:params=0.5,step=0", "step must be in (0, 1)"),
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
