"""drop: depth pruning, checked against independent references.

- Whole blocks: the same Hugging Face class built with fewer layers and the kept layers'
  weights copied in (GPT-2, BERT post-norm, LLaMA with GQA), through both frontends.
- One branch: the original with that branch's output projection zeroed.
- Both frontends score and choose alike on the same weights and calibration batches.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.pipeline import compile_model
from rescompile.validation import assert_close, run_onnx
from tools.models import bert, build, cached_onnx, gpt2, llama

LAYER_LISTS = {"gpt2": "h", "bert": "encoder.layer", "llama": "layers"}
BUILDERS = {"gpt2": gpt2, "bert": bert, "llama": llama}


def fewer_layers(model, path: str, keep: list[int]):
    """The reference: the model's class built with `keep` layers, their weights copied in."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    init = {"add_pooling_layer": False} if path == "encoder.layer" else {}  # as tools.models builds them
    reference = type(model)(config, **init).eval()
    old = model.state_dict()
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    state = {}
    for key in reference.state_dict():
        match = pattern.match(key)
        state[key] = old[f"{path}.{keep[int(match[1])]}.{match[2]}" if match else key]
    reference.load_state_dict(state)
    return reference


def removed_layers(stats: dict) -> list[int]:
    return sorted(index for _, index in stats["0:drop"]["removed_positions"])


def hidden(out):
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).detach().numpy()


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_block_drop_equals_the_class_with_fewer_layers_torch(name):
    case = BUILDERS[name](layers=4)
    result = compile_model(
        case.module, ["drop:n=2,metric=bi"], example_inputs=case.args, example_kwargs=case.kwargs
    )
    gone = removed_layers(result.result.stats)
    assert len(gone) == 2
    keep = [i for i in range(4) if i not in gone]
    reference = fewer_layers(case.module, LAYER_LISTS[name], keep)
    # HF models come back as their own class: rebuilt with 2 layers
    rebuilt = result.output
    assert type(rebuilt) is type(case.module)
    assert rebuilt.config.num_hidden_layers == 2
    with torch.no_grad():
        want = hidden(reference(**case.kwargs))
        assert_close(hidden(rebuilt(**case.kwargs)), want)
        graph_module = rescompile.frontends.torch.export_module(result.graph)
        assert_close(hidden(graph_module(**case.kwargs)), want)
    n_params = sum(p.numel() for p in rebuilt.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters())
    assert n_params < sum(p.numel() for p in case.module.parameters())


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_block_drop_equals_the_class_with_fewer_layers_onnx(name, tmp_path):
    case = build(name)  # 2 layers, the model cached_onnx exported
    source = cached_onnx(name)
    out = tmp_path / "dropped.onnx"
    result = compile_model(str(source), ["drop:n=1"], output=out)
    (gone,) = removed_layers(result.result.stats)
    reference = fewer_layers(case.module, LAYER_LISTS[name], [1 - gone])
    feeds = {k: v.numpy() for k, v in case.kwargs.items()}
    (got,) = run_onnx(out, feeds).values()
    with torch.no_grad():
        assert_close(got, hidden(reference(**case.kwargs)))
    assert _model_bytes(out) < _model_bytes(source)  # the removed layers' weights are gone


def _model_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_hf_model_round_trips_through_save_pretrained(tmp_path):
    case = llama(layers=3)
    dropped = rescompile.apply(case.module, ["drop:n=1,metric=norm"], example_kwargs=case.kwargs)
    assert dropped.config.num_hidden_layers == 2
    dropped.save_pretrained(tmp_path)
    reloaded = type(case.module).from_pretrained(tmp_path).eval()
    assert [m.self_attn.layer_idx for m in reloaded.layers] == [0, 1]
    with torch.no_grad():
        assert_close(hidden(reloaded(**case.kwargs)), hidden(dropped(**case.kwargs)))


@pytest.mark.parametrize(
    ("name", "depth", "zeroed"),
    [
        ("gpt2", 3, ["h.1.mlp.c_proj.weight", "h.1.mlp.c_proj.bias"]),
        ("llama", 2, ["layers.1.self_attn.o_proj.weight"]),
    ],
)
def test_branch_drop_equals_zeroed_output_projection(name, depth, zeroed):
    case = BUILDERS[name](layers=2)
    dropped = rescompile.apply(
        case.module, [f"drop:unit=branch,sites=depth:{depth}"], example_kwargs=case.kwargs
    )
    assert isinstance(dropped, torch.fx.GraphModule)  # a branch is not a layer: no HF class
    reference = copy.deepcopy(case.module)
    with torch.no_grad():
        for key in zeroed:
            reference.get_parameter(key).zero_()
        assert_close(hidden(dropped(**case.kwargs)), hidden(reference(**case.kwargs)))
        assert not np.allclose(hidden(case.module(**case.kwargs)), hidden(reference(**case.kwargs)))
    names = dict(dropped.named_parameters())
    assert not any(key.replace(".", "_") in str(names) or key in names for key in zeroed)


@pytest.mark.parametrize("metric", ["bi", "angular", "norm", "greedy"])
def test_both_frontends_score_and_choose_alike(metric):
    case = gpt2(layers=2)
    ids = [torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    spec = [f"drop:n=1,unit=branch,metric={metric}"]
    torch_run = compile_model(
        case.module, spec, example_kwargs=case.kwargs, calibration=[{"input_ids": t} for t in ids]
    )
    onnx_run = compile_model(
        str(cached_onnx("gpt2")), spec, calibration=[{"input_ids": t.numpy()} for t in ids]
    )
    a, b = torch_run.result.stats["0:drop"], onnx_run.result.stats["0:drop"]
    assert list(a["scores"]) and len(a["scores"]) == len(b["scores"])
    np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), rtol=1e-3, atol=1e-6)
    positions = [list(a["scores"]).index(u) for u in a["removed_units"]]
    assert positions == [list(b["scores"]).index(u) for u in b["removed_units"]]


def test_greedy_remeasures_after_each_pick():
    case = gpt2(layers=3)
    result = compile_model(case.module, ["drop:n=2,metric=greedy"], example_kwargs=case.kwargs)
    stats = result.result.stats["0:drop"]
    first, second = stats["scores"].values()
    assert 0 < first <= second  # the second pick's change includes the first removal


@pytest.mark.parametrize(
    "name", ["tv_resnet50", "tv_swin", "resnet50", "vit", "tv_regnet", "convnext", "mixer", "t5"]
)
def test_drop_runs_on_other_architectures(name):
    module, args, kwargs = _architecture(name)
    out = rescompile.apply(
        module, ["drop:n=1,metric=norm"], example_inputs=args, example_kwargs=kwargs, dynamic=False
    )
    before = sum(p.numel() for p in module.parameters())
    after = sum(p.numel() for p in out.parameters())
    assert after < before
    with torch.no_grad():
        result = out(*args, **kwargs)
    first = result if isinstance(result, torch.Tensor) else hidden(result)
    assert np.isfinite(np.asarray(first)).all()


def _architecture(name):
    torch.manual_seed(0)
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        cfg = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]
        return ConvNeXt(cfg, num_classes=10).eval(), (torch.randn(1, 3, 32, 32),), {}
    if name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        model = MlpMixer(num_classes=10, img_size=32, patch_size=8, embed_dim=32, num_blocks=4)
        return model.eval(), (torch.randn(1, 3, 32, 32),), {}
    if name == "t5":
        import transformers as T

        cfg = T.T5Config(
            vocab_size=101,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            use_cache=False,
        )
        model = T.T5Model(cfg).eval()
        ids = torch.randint(0, 101, (2, 8))
        return model, (), {"input_ids": ids, "decoder_input_ids": ids}
    case = build(name)
    return case.module, case.args, case.kwargs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("drop:n=4", "would remove every one"),
        ("drop:ratio=1.5", "ratio must be in (0, 1)"),
        ("drop:ratio=0.1", "removes none"),
        ("drop:n=1,ratio=0.5", "not both"),
    ],
)
def test_bad_counts_are_one_line_errors(spec, message, tmp_path):
    source = cached_onnx("gpt2")  # 2 layers: 2 block units, 4 branch units
    spec = spec.replace("n=4", "n=2")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rescompile",
            "apply",
            str(source),
            "-p",
            spec,
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rescompile: error: ") and message in lines[0], lines
    assert not (tmp_path / "o.onnx").exists()


def test_calibration_file_must_exist(tmp_path):
    with pytest.raises(RescompileError, match="no such file"):
        compile_model(str(cached_onnx("gpt2")), ["drop:n=1"], calibration=tmp_path / "missing.pt")


def test_inspect_importance_lists_every_unit_and_uses_a_calibration_file(tmp_path):
    import json

    source = cached_onnx("gpt2")
    case = gpt2(layers=2)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input_ids=case.kwargs["input_ids"].numpy())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rescompile",
            "inspect",
            str(source),
            "--importance",
            "norm",
            "--unit",
            "branch",
        ]
        + ["--calibration", str(calibration), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "random inputs" not in result.stderr  # the file was used
    report = json.loads(result.stdout)
    units = report["importance"]["units"]
    assert report["importance"]["metric"] == "norm"
    assert [u["sites"][0] for u in units] == [r["add"] for r in report["residuals"]]
    assert all(u["score"] > 0 for u in units)
    # the API gives the same numbers
    scores = rescompile.inspect(
        str(source), importance="norm", unit="branch", calibration=calibration
    ).importance
    np.testing.assert_allclose([s.score for s in scores], [u["score"] for u in units], rtol=1e-6)


class _LinearBlocks(torch.nn.Module):
    """A stream of residual blocks that are linear maps: x + W2 (W1 x + b1) + b2."""

    def __init__(self, width: int = 8, blocks: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(torch.tanh(x))


def test_replace_linear_restores_a_run_of_linear_blocks_exactly():
    model = _LinearBlocks().eval()
    x = torch.randn(4, 16, 8)
    calibration = [(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    spec = "drop:n=2,metric=angular,replace=linear"
    fitted = rescompile.apply(model, [spec], (x,), calibration=calibration)
    plain = rescompile.apply(model, ["drop:n=2,metric=angular"], (x,), calibration=calibration)
    with torch.no_grad():
        want = model(x)
        assert_close(fitted(x), want)  # the removed run was linear: the fit is exact
        assert not np.allclose(plain(x), want, atol=1e-3)  # removing it without the map is not
    assert sum(p.numel() for p in fitted.parameters()) < sum(p.numel() for p in model.parameters())


def test_replace_linear_is_refused_where_a_projection_keeps_its_shortcut():
    case = build("tv_resnet18")
    with pytest.raises(RescompileError, match="replace=linear"):
        rescompile.apply(
            case.module, ["drop:n=1,metric=norm,replace=linear,unit=branch"], case.args, dynamic=False
        )


def test_padding_tokens_do_not_count():
    """A padded batch scores like the same sentences run one by one without padding."""
    case = bert(layers=2)
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    padded = [{"input_ids": ids, "attention_mask": mask}]
    alone = [
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
        {"input_ids": ids[1:, :5], "attention_mask": mask[1:, :5]},
    ]
    scores = [
        [
            s.score
            for s in rescompile.inspect(
                case.module, example_kwargs=case.kwargs, importance="bi", calibration=c
            ).importance
        ]
        for c in (padded, alone)
    ]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)


class _WigglyBlocks(torch.nn.Module):
    """Residual blocks with a small nonlinear update: x + 0.2 sin(3 x W). No affine map
    reproduces them, and one fit on few tokens overfits: the identity is hard to beat."""

    def __init__(self, width: int = 16, blocks: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = x + 0.2 * torch.sin(3 * block(x))
        return x


def _plain_affine_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ~ [x 1] S without any ridge: the fit the pass must not settle for."""
    x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return np.linalg.lstsq(x1, y, rcond=None)[0]


def test_replace_linear_is_never_worse_than_dropping_on_held_out_tokens():
    """The last two blocks replaced by the fitted map: the model's output is the run's exit, so
    its error on fresh tokens is the map's. Few calibration tokens: plain least squares is
    worse than the identity there; the validated fit is not."""
    model = _WigglyBlocks().eval()
    width = 16
    calibration = [(torch.randn(2, 12, width, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    fresh = torch.randn(64, 32, width, generator=torch.Generator().manual_seed(99))
    sites = "sites=depth:1-2"
    spec = f"drop:{sites},replace=linear"
    fitted = rescompile.apply(model, [spec], calibration[0], calibration=calibration)
    dropped = rescompile.apply(model, [f"drop:{sites}"], calibration[0], calibration=calibration)

    def rows(t: torch.Tensor) -> np.ndarray:
        return t.reshape(-1, width).numpy().astype(np.float64)

    def entry(x: torch.Tensor) -> torch.Tensor:  # the run's entry: after the first block
        return x + 0.2 * torch.sin(3 * model.blocks[0](x))

    with torch.no_grad():
        want = rows(model(fresh))
        fitted_error = float(np.sum((rows(fitted(fresh)) - want) ** 2))
        identity_error = float(np.sum((rows(dropped(fresh)) - want) ** 2))
        # the independent reference: plain least squares from the run's entry to its exit
        x = np.concatenate([rows(entry(c[0])) for c in calibration])
        y = np.concatenate([rows(model(c[0])) for c in calibration])
        x_fresh = rows(entry(fresh))
        plain_out = np.concatenate([x_fresh, np.ones((len(x_fresh), 1))], axis=1) @ _plain_affine_fit(x, y)
        plain_error = float(np.sum((plain_out - want) ** 2))
    assert plain_error > identity_error  # the setting is one where naive fitting loses
    assert fitted_error <= identity_error * 1.001, (fitted_error, identity_error)


def test_replace_linear_fits_real_tokens_only():
    """Padding rows (attention_mask 0) leave the fit: batches that differ only in the ids at
    padded positions give the same map, and the fit counts only the real tokens."""
    case = bert(layers=2)
    ids = [torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0

    def calibration(pad_seed: int) -> list[dict]:
        batches = []
        for i, t in enumerate(ids):
            t = t.clone()
            g = torch.Generator().manual_seed(pad_seed + i)
            t[1, 5:] = torch.randint(1, 101, (3,), generator=g)
            batches.append({"input_ids": t, "attention_mask": mask})
        return batches

    outputs, fits = [], []
    for pad_seed in (10, 20):
        result = compile_model(
            case.module,
            ["drop:sites=depth:2-3,replace=linear"],
            example_kwargs=case.kwargs,
            calibration=calibration(pad_seed),
        )
        fits.append(result.result.stats["0:drop"]["linear_fits"])
        with torch.no_grad():
            outputs.append(hidden(result.output(**case.kwargs)))
    assert [f["rows"] for f in fits[0]] == [2 * (8 + 5)]
    assert fits[0][0]["ridge"] is not None  # a map was fit, not the identity kept
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
