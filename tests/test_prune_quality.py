"""prune's measured importance and refit, checked against hand-written formulas.

- activation: mean |x_j| * ||W[:, j]|| computed with plain torch; the same scores and choice from
  the torch and ONNX frontends on the same weights and calibration batches.
- taylor: |w * dL/dw| from plain torch autograd; refused on ONNX.
- refit: where the pruned channels are linear combinations of the kept ones, least squares gives
  back the original function; on GPT-2 refit never increases any reader's calibration error; both
  frontends refit alike.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import rescompile
from passes._branch import numpy_of
from passes.prune import PrunePass
from rescompile.analysis.groups import readers
from rescompile.frontends.probe import probe
from rescompile.infra import PassError
from rescompile.pipeline import compile_model, load
from rescompile.validation import Tolerance, assert_close
from tools.models import build, cached_onnx, export_onnx, gpt2

EXACT = Tolerance(1e-5, 1e-5)


class Mlp(torch.nn.Module):
    def __init__(self, hidden: int = 16, act: bool = True):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 8)
        self.act = torch.nn.ReLU() if act else torch.nn.Identity()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def batches(count: int = 4, rows: int = 32, seed: int = 0) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=gen),) for _ in range(count)]


def planned(graph, calibration, **options):
    pass_ = PrunePass(**options)
    pass_.calibration = calibration
    plan = pass_.plan(graph)
    (group,) = [g for g in plan.analysis.groups if g.index in plan.removed]
    return plan, group


def by_hidden_index(group, scores: np.ndarray, weight_name: str) -> np.ndarray:
    """Unit scores reordered by the hidden index of `weight_name`'s pruned axis."""
    member = next(m for m in group.members if m.value.name == weight_name)
    return scores[list(member.units)]


def test_activation_is_mean_abs_times_column_norm():
    torch.manual_seed(0)
    model, calib = Mlp().eval(), batches()
    plan, group = planned(load(model, calib[0]), calib, importance="activation", ratio=0.5, uniform=True)
    with torch.no_grad():
        hidden = torch.cat([model.act(model.fc1(x)) for (x,) in calib])
        want = hidden.abs().mean(0).double() * model.fc2.weight.double().norm(dim=0)
    got = by_hidden_index(group, plan.scores[group.index], "fc1.weight")
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    removed = by_hidden_index(
        group, np.isin(np.arange(group.size), list(plan.removed[group.index])), "fc1.weight"
    )
    assert set(np.flatnonzero(removed)) == set(np.argsort(want.numpy())[:8].tolist())


def gpt2_calibration(numpy: bool):
    ids = [torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    return [{"input_ids": t.numpy() if numpy else t} for t in ids]


def test_both_frontends_score_and_choose_alike():
    case = gpt2(layers=2)
    graphs = {
        "torch": (load(case.module, None, example_kwargs=case.kwargs), gpt2_calibration(False)),
        "onnx": (load(str(cached_onnx("gpt2"))), gpt2_calibration(True)),
    }
    seen = {}
    for frontend, (graph, calib) in graphs.items():
        pass_ = PrunePass(importance="activation", ratio=0.5, uniform=True)
        pass_.calibration = calib
        plan = pass_.plan(graph)
        seen[frontend] = [
            (g.kind, plan.scores[g.index], sorted(plan.removed[g.index]))
            for g in plan.analysis.groups
            if g.index in plan.removed
        ]
    assert [k for k, _, _ in seen["torch"]] == ["heads", "mlp", "heads", "mlp"]
    for (kind, a, removed_a), (kind_b, b, removed_b) in zip(seen["torch"], seen["onnx"], strict=True):
        assert kind == kind_b and removed_a == removed_b
        np.testing.assert_allclose(a, b, rtol=1e-4)


def test_taylor_is_weight_times_gradient():
    torch.manual_seed(0)
    model, calib = Mlp().eval(), batches()
    plan, group = planned(load(model, calib[0]), calib, importance="taylor", ratio=0.5, uniform=True)
    reference = copy.deepcopy(model)
    loss = sum((reference(x) ** 2).sum() for (x,) in calib)
    loss.backward()
    w = {n: (p.detach() * p.grad).abs().double() for n, p in reference.named_parameters()}
    want = w["fc1.weight"].sum(1) + w["fc1.bias"] + w["fc2.weight"].sum(0)
    np.testing.assert_allclose(
        by_hidden_index(group, plan.scores[group.index], "fc1.weight"), want.numpy(), rtol=1e-4
    )
    assert all(p.grad is None for p in model.parameters())  # the user's model is left alone


def test_taylor_is_refused_on_onnx():
    with pytest.raises(PassError, match="importance=taylor: gradients need the torch model") as info:
        rescompile.apply(str(cached_onnx("residual_mlp")), ["prune:importance=taylor"])
    assert "\n" not in str(info.value)


def redundant_mlp() -> Mlp:
    """Hidden units 8..15 are small linear combinations of units 0..7 (no activation between), so
    l2 removes exactly them and the kept units can say everything they said."""
    torch.manual_seed(0)
    model = Mlp(act=False).eval()
    mix = 0.05 * torch.randn(8, 8)
    with torch.no_grad():
        model.fc1.weight[8:] = mix @ model.fc1.weight[:8]
        model.fc1.bias[8:] = mix @ model.fc1.bias[:8]
        model.fc2.weight[:, 8:] *= 0.05
    return model


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_least_squares_restores_a_redundant_layer(frontend, tmp_path):
    model, calib, x = redundant_mlp(), batches(), torch.randn(32, 8)  # fresh inputs, static shape
    spec = "prune:ratio=0.5,uniform=true,refit={}"
    if frontend == "torch":
        run = lambda refit: rescompile.apply(  # noqa: E731
            copy.deepcopy(model), [spec.format(refit)], calib[0], calibration=calib
        )(x)
    else:
        case = dataclasses.replace(build("residual_mlp"), module=model, args=calib[0])
        path = export_onnx(case, tmp_path / "mlp.onnx", exporter="legacy")
        from rescompile.validation import run_onnx

        def run(refit):
            pruned = rescompile.apply(
                str(path), [spec.format(refit)], calibration=[(b.numpy(),) for (b,) in calib]
            )
            (out,) = run_onnx(pruned.SerializeToString(), {"input_0": x.numpy()}).values()
            return torch.from_numpy(out)

    with torch.no_grad():
        want = model(x)
        assert (run("none") - want).abs().max() > 1e-3  # pruning alone changes the function
        assert_close(run("least_squares"), want, EXACT)


def test_refit_never_increases_a_readers_calibration_error():
    """Per reader of a pruned group: ||X W + b - (X_kept W' + b')||^2 on the calibration batches,
    with X the original model's activations and W', b' read from each pruned graph."""
    case, calib = gpt2(layers=2), gpt2_calibration(False)
    graph = load(case.module, None, example_kwargs=case.kwargs)
    pass_ = PrunePass(ratio=0.5, uniform=True, importance="activation")
    pass_.calibration = calib
    plan = pass_.plan(graph)
    found = [
        (r, plan.removed[g.index])
        for g in plan.analysis.groups
        if g.index in plan.removed
        for r in readers(g)
    ]
    assert len(found) == 4
    activations = list(probe(graph, calib, [r.data.value for r, _ in found]))
    errors = {}
    for refit in ("none", "bias", "least_squares"):
        spec = [f"prune:ratio=0.5,uniform=true,importance=activation,refit={refit}"]
        result = compile_model(
            copy.deepcopy(case.module), spec, example_kwargs=case.kwargs, calibration=calib
        )
        assert result.result.stats["0:prune"]["refit"] == refit
        pruned = {v.name: numpy_of(v.payload).astype(np.float64) for v in result.graph.initializers.values()}
        for k, (reader, gone) in enumerate(found):
            kept = [i for i, u in enumerate(reader.data.units) if u not in gone]
            w = np.moveaxis(numpy_of(reader.weight.value.payload).astype(np.float64), reader.weight.axis, 0)
            new_w = np.moveaxis(pruned[reader.weight.value.name], reader.weight.axis, 0)
            bias = reader.node.inputs[0]  # addmm(bias, x, W)
            b, new_b = numpy_of(bias.payload), pruned[bias.name]
            total = 0.0
            for arrays in activations:
                x = np.moveaxis(arrays[k], reader.data.axis, -1).reshape(-1, len(w)).astype(np.float64)
                total += float((((x @ w + b) - (x[:, kept] @ new_w + new_b)) ** 2).sum())
            errors[(refit, reader.node.name)] = total
    for (refit, name), error in errors.items():
        assert error <= errors[("none", name)] * (1 + 1e-9), (refit, name)
    total = {r: sum(e for (refit, _), e in errors.items() if refit == r) for r in ("none", "least_squares")}
    assert total["least_squares"] < 0.9 * total["none"]


def test_both_frontends_refit_alike():
    case = gpt2(layers=2)
    spec = ["prune:ratio=0.5,uniform=true,importance=activation,refit=least_squares"]
    a = compile_model(case.module, spec, example_kwargs=case.kwargs, calibration=gpt2_calibration(False))
    b = compile_model(str(cached_onnx("gpt2")), spec, calibration=gpt2_calibration(True))
    assert a.result.stats["0:prune"]["refit"] == b.result.stats["0:prune"]["refit"] == "least_squares"
    onnx_weights = {v.name: v for v in b.graph.initializers.values()}
    for name in ("h.0.mlp.c_proj.weight", "h.1.attn.c_proj.weight"):
        mine = numpy_of(a.graph.initializers[name].payload)
        np.testing.assert_allclose(
            mine, numpy_of(onnx_weights[f"module.{name}"].payload), rtol=1e-3, atol=1e-5
        )
        assert not np.allclose(mine, case.module.state_dict()[name].numpy()[: len(mine)])  # refitted


def test_refit_defaults_to_none_with_or_without_calibration():
    """least_squares overfit MiniLM's 64 calibration sentences (tools/bench/prune.py): opt in."""
    model = Mlp().eval()
    for calibration in (None, batches()):
        result = compile_model(
            model, ["prune:ratio=0.5"], example_inputs=batches()[0], calibration=calibration
        )
        assert result.result.stats["0:prune"]["refit"] == "none"


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_calibration_that_does_not_match_the_inputs_fails_in_one_line(frontend):
    if frontend == "torch":
        model = Mlp().eval()
        call = lambda: rescompile.apply(  # noqa: E731
            model, ["prune:importance=activation"], batches()[0], calibration=[(torch.randn(4, 3),)]
        )
    else:
        call = lambda: rescompile.apply(  # noqa: E731
            str(cached_onnx("gpt2")), ["prune:importance=activation"], calibration=[{"ids": np.zeros((2, 8))}]
        )
    with pytest.raises(PassError, match="prune: ") as info:
        call()
    assert "\n" not in str(info.value)
