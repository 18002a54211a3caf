"""prune's measured importance and refit, checked against hand-written formulas.

- activation: mean |x_j| * ||W[:, j]|| computed with plain torch; the same scores and choice from
  the torch and ONNX frontends on the same weights and calibration batches.
- taylor: |w * dL/dw| from plain torch autograd; refused on ONNX.
- refit: where the pruned channels are linear combinations of the kept ones, least squares gives
  back the original function; on GPT-2 refit never increases any reader's calibration error (its
  inputs from the pruned model, its target the original's output; conv readers in
  test_prune_refit.py); both
  frontends refit alike; with fewer calibration rows than kept channels the ridge chosen on
  held-out rows does better on fresh inputs than no refit, where a tiny fixed ridge does worse;
  padding rows (attention_mask 0) count in neither scores nor fits; refit=bias adds a bias.
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
    with torch.no_grad():  # inference code often prunes under no_grad: the scores must not change
        plan_ng, group_ng = planned(
            load(model, calib[0]), calib, importance="taylor", ratio=0.5, uniform=True
        )
    np.testing.assert_allclose(plan_ng.scores[group_ng.index], plan.scores[group.index], rtol=1e-6)


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


def test_least_squares_with_one_calibration_batch_holds_out_half_its_rows():
    model, x = redundant_mlp(), torch.randn(32, 8)
    calib = batches(count=1, rows=64)
    spec = ["prune:ratio=0.5,uniform=true,refit=least_squares"]
    result = compile_model(copy.deepcopy(model), spec, example_inputs=calib[0], calibration=calib)
    assert result.result.stats["0:prune"]["refit_chosen"] not in ({}, {"none": 1})
    with torch.no_grad():
        assert_close(result.output(x), model(x), EXACT)


def test_refit_never_increases_a_readers_calibration_error():
    """Per reader of a pruned group: ||X W + b - (Z W' + b')||^2 on the calibration batches, X its
    input in the original model, Z in the pruned one (upstream layers pruned and re-fit), W', b'
    read from each pruned graph; never above the kept rows' W_K, b_K on the same Z, and in all
    below pruning without refit (Z and W_K from that graph)."""
    case, calib = gpt2(layers=2), gpt2_calibration(False)
    graph = load(case.module, None, example_kwargs=case.kwargs)
    pass_ = PrunePass(ratio=0.5, uniform=True, importance="activation")
    pass_.calibration = calib
    plan = pass_.plan(graph)
    found = plan.pruned_readers()
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
        values = {out.name: out for node in result.graph for out in node.outputs}
        inputs = list(probe(result.graph, calib, [values[r.data.value.name] for r, _ in found]))
        for k, (reader, gone) in enumerate(found):
            kept = [i for i, u in enumerate(reader.data.units) if u not in gone]
            w = np.moveaxis(numpy_of(reader.weight.value.payload).astype(np.float64), reader.weight.axis, 0)
            new_w = np.moveaxis(pruned[reader.weight.value.name], reader.weight.axis, 0)
            bias = reader.node.inputs[0]  # addmm(bias, x, W)
            b, new_b = numpy_of(bias.payload), pruned[bias.name]
            total, before = 0.0, 0.0
            for arrays, pruned_arrays in zip(activations, inputs):
                x = np.moveaxis(arrays[k], reader.data.axis, -1).reshape(-1, len(w)).astype(np.float64)
                z = np.moveaxis(pruned_arrays[k], reader.data.axis, -1).reshape(-1, len(kept))
                total += float((((x @ w + b) - (z @ new_w + new_b)) ** 2).sum())
                before += float((((x @ w + b) - (z @ w[kept] + b)) ** 2).sum())
            assert total <= before * (1 + 1e-9), (refit, reader.node.name)
            errors[(refit, reader.node.name)] = total
    total = {r: sum(e for (refit, _), e in errors.items() if refit == r) for r in ("none", "least_squares")}
    assert total["least_squares"] < 0.9 * total["none"]


def gpt2_with_biases():
    """GPT-2 with random (not zero) biases: an exporter may drop a zero bias, and the refit fits an
    intercept only into a bias the reader has."""
    case = gpt2(layers=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in case.module.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return case


def test_both_frontends_refit_alike(tmp_path):
    case = gpt2_with_biases()
    path = export_onnx(case, tmp_path / "gpt2.onnx")
    spec = ["prune:ratio=0.5,uniform=true,importance=activation,refit=least_squares"]
    a = compile_model(
        copy.deepcopy(case.module), spec, example_kwargs=case.kwargs, calibration=gpt2_calibration(False)
    )
    b = compile_model(str(path), spec, calibration=gpt2_calibration(True))
    stats = a.result.stats["0:prune"], b.result.stats["0:prune"]
    assert stats[0]["refit"] == stats[1]["refit"] == "least_squares"
    assert stats[0]["refit_chosen"] == stats[1]["refit_chosen"]  # the same ridge, reader by reader
    assert "none" not in stats[0]["refit_chosen"]
    onnx_weights = {v.name.removeprefix("module."): v for v in b.graph.initializers.values()}
    for name in ("h.0.mlp.c_proj.weight", "h.1.attn.c_proj.weight", "h.0.mlp.c_proj.bias"):
        mine = numpy_of(a.graph.initializers[name].payload)
        np.testing.assert_allclose(mine, numpy_of(onnx_weights[name].payload), rtol=1e-3, atol=1e-5)
        assert not np.allclose(mine, case.module.state_dict()[name].numpy()[: len(mine)])  # refitted


def test_refit_defaults_to_least_squares_only_with_calibration():
    """auto: least_squares on the user's calibration data; random inputs are not worth fitting."""
    model = Mlp().eval()
    for calibration, want in ((None, "none"), (batches(), "least_squares")):
        result = compile_model(
            model, ["prune:ratio=0.5"], example_inputs=batches()[0], calibration=calibration
        )
        assert result.result.stats["0:prune"]["refit"] == want


def wide_gelu_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()


def test_ridge_chosen_on_held_out_rows_does_not_overfit_few_rows():
    """24 calibration rows for 32 kept hidden units: a near-interpolating fit (the old ridge of
    1e-6 x the mean diagonal, computed here in numpy) is worse on fresh inputs than no refit at
    all; least_squares, with its ridge chosen on held-out calibration rows, is better than both."""
    model = wide_gelu_mlp()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(12, 16, generator=gen),) for _ in range(2)]
    fresh = torch.randn(2000, 16, generator=gen)
    with torch.no_grad():
        want = model(fresh).double().numpy()
        hidden = torch.cat([model[1](model[0](x)) for (x,) in calib]).double().numpy()
        hidden_fresh = model[1](model[0](fresh)).double().numpy()
    w1, b1, w2 = (t.detach().double().numpy() for t in (model[0].weight, model[0].bias, model[2].weight))
    kept = np.sort(np.argsort((w1**2).sum(1) + b1**2 + (w2**2).sum(0))[32:])  # l2 keeps these
    gram, target = hidden[:, kept].T @ hidden[:, kept], hidden @ w2.T
    ridge = 1e-6 * np.trace(gram) / len(kept)
    tiny = np.linalg.solve(gram + ridge * np.eye(len(kept)), hidden[:, kept].T @ target + ridge * w2.T[kept])

    def fresh_error(w):
        return float(((hidden_fresh @ w2.T - hidden_fresh[:, kept] @ w) ** 2).sum())

    assert fresh_error(tiny) > 1.2 * fresh_error(w2.T[kept])  # interpolation overfits here
    errors = {}
    for refit in ("none", "least_squares"):
        spec = f"prune:ratio=0.5,uniform=true,importance=l2,refit={refit}"
        pruned = rescompile.apply(copy.deepcopy(model), [spec], calib[0], calibration=calib)
        with torch.no_grad():
            errors[refit] = float(((pruned(fresh).double().numpy() - want) ** 2).sum())
    np.testing.assert_allclose(errors["none"], fresh_error(w2.T[kept]), rtol=1e-4)  # the same units
    assert errors["least_squares"] < 0.8 * errors["none"]


class MaskedMlp(torch.nn.Module):
    """Padding positions (attention_mask 0) never reach the output."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8, bias=bias)

    def forward(self, x, attention_mask):
        return self.fc2(torch.relu(self.fc1(x))) * attention_mask.unsqueeze(-1)


def padded_batches() -> list[dict]:
    """Two batches of 3 sequences of 6 positions; the padding positions hold huge values."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for lengths in ((6, 4, 2), (5, 3, 1)):
        x = torch.randn(3, 6, 8, generator=gen)
        mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).long()
        garbage = 1e3 * torch.randn(3, 6, 8, generator=gen)
        out.append({"x": torch.where(mask.bool()[..., None], x, garbage), "attention_mask": mask})
    return out


def real_hidden(model, calib) -> np.ndarray:
    with torch.no_grad():
        rows = [torch.relu(model.fc1(b["x"]))[b["attention_mask"].bool()] for b in calib]
    return torch.cat(rows).double().numpy()


def test_padding_rows_are_ignored():
    """Scores and the bias refit come from the real tokens' rows only (hand-computed here)."""
    torch.manual_seed(0)
    model, calib = MaskedMlp().eval(), padded_batches()
    hidden = real_hidden(model, calib)
    graph = load(model, None, example_kwargs=calib[0])
    plan, group = planned(graph, calib, importance="activation", ratio=0.5, uniform=True)
    w2 = model.fc2.weight.double().detach().numpy()
    want = np.abs(hidden).mean(0) * np.linalg.norm(w2, axis=0)
    np.testing.assert_allclose(
        by_hidden_index(group, plan.scores[group.index], "fc1.weight"), want, rtol=1e-5
    )
    gone = sorted(np.argsort(want)[:8].tolist())
    spec = ["prune:ratio=0.5,uniform=true,importance=activation,refit=bias"]
    result = compile_model(copy.deepcopy(model), spec, example_kwargs=calib[0], calibration=calib)
    shift = hidden[:, gone].mean(0) @ w2[:, gone].T
    np.testing.assert_allclose(
        numpy_of(result.graph.initializers["fc2.bias"].payload),
        model.fc2.bias.double().detach().numpy() + shift,
        rtol=1e-5,
        atol=1e-6,
    )


def test_bias_refit_adds_a_bias_where_the_reader_has_none():
    """FLAP's compensation on a reader without a bias: a new bias after it, the mean of what the
    removed channels contributed (hand-computed)."""
    torch.manual_seed(0)
    model, calib = MaskedMlp(bias=False).eval(), padded_batches()
    hidden = real_hidden(model, calib)
    w2 = model.fc2.weight.double().detach().numpy()
    spec = ["prune:ratio=0.5,uniform=true,importance=activation,refit=bias"]
    result = compile_model(copy.deepcopy(model), spec, example_kwargs=calib[0], calibration=calib)
    assert "refit_refused" not in result.result.stats["0:prune"]
    gone = sorted(np.argsort(np.abs(hidden).mean(0) * np.linalg.norm(w2, axis=0))[:8].tolist())
    kept = [k for k in range(16) if k not in gone]
    x, mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        got = result.output(x=x, attention_mask=mask).double().numpy()
        h = torch.relu(model.fc1(x)).double().numpy()
    want = h[..., kept] @ w2[:, kept].T + hidden[:, gone].mean(0) @ w2[:, gone].T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


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
