"""prune (issue 12) next to Torch-Pruning on four model shapes, random weights: parameters,
MACs, ONNX Runtime latency relative to the original, the time the pruning takes, and whether the
pruned model runs.

Models: ResNet-50 (torchvision, 1x3x224x224), ViT-B/16 (torchvision, 1x3x224x224), GPT-2 small
(HF GPT2LMHeadModel, default config, 1x32 tokens) and a LLaMA shape with grouped-query attention
(HF LlamaForCausalLM: width 1024, 16 heads, 4 key/value heads, MLP 2816, 8 layers, vocabulary
32000, 1x32 tokens).

Ours: `prune:ratio=0.3,importance=l2` through `compile_model` (static capture), plus the option
rows that say something (round_to=8 on the CNN for kernel-friendly widths, uniform=true on GPT-2 and
LLaMA, where the global ranking need not take heads). Torch-Pruning:
MetaPruner with GroupMagnitudeImportance(p=2), the classifier / lm_head ignored, at the
pruning_ratio whose parameter count comes closest to our default row's (a short bisection, so
that latency compares at equal size). Transformers: MLP + whole heads only (num_heads dict,
every layer that writes the residual stream ignored), as tools/bench/prune.py does for BERT;
ViT also in Torch-Pruning's own torchvision recipe (nn.MultiheadAttention as a channel group,
the residual stream pruned). Latency: every pruned model that runs and changed is exported
(dynamo exporter; legacy for ResNet-50) and timed in ORT interleaved with the original
and a second session on the original (noise control), median of N rounds.

Usage: python tools/bench/prune_models.py [--rounds N] [--models resnet50,vit_b_16,gpt2,llama_gqa]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tools.bench.common import CACHE, interleaved_medians, machine, write_result  # noqa: E402
from tools.bench.prune import _tp_version  # noqa: E402

RATIO = 0.3
SEQ = 32
TP = "Torch-Pruning"


@dataclasses.dataclass
class Case:
    name: str
    build: Callable  # () -> (module, args, kwargs)
    ours: list[tuple[str, str]]  # (label, spec); the first is the default the TP rows match
    tp: list[tuple[str, Callable]]  # (label, fn(model, ratio, args, kwargs) -> pruned model)
    dynamo: bool  # the legacy exporter cannot write nn.MultiheadAttention's fused eval kernel
    rounds: int = 1  # times --rounds: cheap models time more rounds


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ----- models ----------------------------------------------------------------------------------
def build_resnet50():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), (torch.randn(1, 3, 224, 224),), {}


def build_vit():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vit_b_16().eval(), (torch.randn(1, 3, 224, 224),), {}


def build_gpt2():
    import torch
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(use_cache=False)).eval()
    return model, (), {"input_ids": torch.randint(0, 50257, (1, SEQ))}


def build_llama():
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        num_hidden_layers=8,
        vocab_size=32000,
        use_cache=False,
    )
    return T.LlamaForCausalLM(config).eval(), (), {"input_ids": torch.randint(0, 32000, (1, SEQ))}


# ----- Torch-Pruning ---------------------------------------------------------------------------
def _meta(model, example, ratio, ignored, **kw):
    import torch
    import torch_pruning as tp

    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=False,
            ignored_layers=ignored,
            **kw,
        )
        pruner.step()
    return pruner


def tp_cnn(round_to: int | None = None):
    def prune(model, ratio, args, kwargs):
        _meta(model, args[0], ratio, [model.fc], round_to=round_to)
        return model

    return prune


def tp_vit_mlp(model, ratio, args, kwargs):
    """MLP hidden only: nn.MultiheadAttention cannot lose whole heads in Torch-Pruning (its
    MultiheadAttentionPruner shrinks embed_dim, the stream), so attention is ignored."""
    import torch

    blocks = list(model.encoder.layers)
    ignored = [model.conv_proj, model.heads]
    ignored += [m for b in blocks for m in (b.self_attention, b.mlp[3])]
    ignored += [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    _meta(model, args[0], ratio, ignored)
    return model


def tp_vit_recipe(model, ratio, args, kwargs):
    """Torch-Pruning's torchvision recipe: every nn.MultiheadAttention a channel group of its head
    count, the classifier ignored; the residual stream (embed_dim) shrinks. Nothing patched after."""
    import torch

    groups = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    _meta(model, args[0], ratio, [model.heads], channel_groups=groups)
    return model


def tp_gpt2(model, ratio, args, kwargs):
    """MLP + heads as for BERT: c_attn in whole heads, every writer of the stream ignored."""
    blocks = list(model.transformer.h)
    ignored = [model.transformer.wte, model.transformer.wpe, model.lm_head]
    ignored += [m for b in blocks for m in (b.attn.c_proj, b.mlp.c_proj)]
    heads = {b.attn.c_attn: b.attn.num_heads for b in blocks}
    _meta(
        model,
        kwargs["input_ids"],
        ratio,
        ignored,
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        output_transform=lambda out: out.logits.sum(),
    )
    return model


def tp_llama(model, ratio, args, kwargs):
    """MLP + whole heads (GQA: num_heads of q is 16, of k and v 4), writers of the stream ignored;
    the attention modules' head counts set after the step as Torch-Pruning's prune_llm.py does."""
    layers = list(model.model.layers)
    ignored = [model.model.embed_tokens, model.lm_head]
    ignored += [m for b in layers for m in (b.self_attn.o_proj, b.mlp.down_proj)]
    cfg = model.config
    heads = {}
    for b in layers:
        heads[b.self_attn.q_proj] = cfg.num_attention_heads
        heads[b.self_attn.k_proj] = heads[b.self_attn.v_proj] = cfg.num_key_value_heads
    pruner = _meta(
        model,
        kwargs["input_ids"],
        ratio,
        ignored,
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        output_transform=lambda out: out.logits.sum(),
    )
    for b in layers:
        a = b.self_attn
        q, kv = pruner.num_heads[a.q_proj], pruner.num_heads[a.k_proj]
        a.num_heads, a.num_key_value_heads = q, kv
        a.num_key_value_groups = q // kv
    return model


CASES = {
    "resnet50": Case(
        "ResNet-50",
        build_resnet50,
        [
            ("ours", "prune:ratio=0.3,importance=l2"),
            ("ours round_to=8", "prune:ratio=0.3,importance=l2,round_to=8"),
        ],
        [(TP, tp_cnn()), (f"{TP} round_to=8", tp_cnn(8))],
        dynamo=False,
        rounds=3,  # 0.3 s a call, and the target is read here
    ),
    "vit_b_16": Case(
        "ViT-B/16",
        build_vit,
        [("ours", "prune:ratio=0.3,importance=l2")],  # heads are refused, so uniform prunes the same MLPs
        [(f"{TP} MLP only", tp_vit_mlp), (f"{TP} torchvision recipe (stream)", tp_vit_recipe)],
        dynamo=True,
    ),
    "gpt2": Case(
        "GPT-2 small",
        build_gpt2,
        [
            ("ours", "prune:ratio=0.3,importance=l2"),
            ("ours uniform", "prune:ratio=0.3,importance=l2,uniform=true"),
        ],
        [(f"{TP} MLP + heads", tp_gpt2)],
        dynamo=True,
    ),
    "llama_gqa": Case(
        "LLaMA GQA (1024, 16/4 heads, 8 layers)",
        build_llama,
        [
            ("ours", "prune:ratio=0.3,importance=l2"),
            ("ours uniform", "prune:ratio=0.3,importance=l2,uniform=true"),
        ],
        [(f"{TP} MLP + heads", tp_llama)],
        dynamo=True,
    ),
}


# ----- measuring -------------------------------------------------------------------------------
def macs_of(module, args, kwargs) -> int | None:
    from rescompile.analysis.cost import count_macs
    from rescompile.pipeline import load

    try:
        return count_macs(load(module, args, example_kwargs=kwargs or None, dynamic=False))
    except Exception as exc:
        print(f"  MACs not counted: {first_line(exc)}", flush=True)
        return None


def runs(module, reference, args, kwargs) -> str:
    """'yes' when the pruned module runs and gives the original's output shape, else why not."""
    import torch

    try:
        with torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as exc:
        return f"no: {first_line(exc)}"
    out = out if isinstance(out, torch.Tensor) else out[0]
    return "yes" if tuple(out.shape) == tuple(reference.shape) else f"no: output {tuple(out.shape)}"


def ours_row(case: Case, model, args, kwargs, label: str, spec: str) -> dict:
    from rescompile.pipeline import compile_model

    start = time.perf_counter()
    try:
        result = compile_model(
            model, [spec], example_inputs=args, example_kwargs=kwargs or None, dynamic=False
        )
    except Exception as exc:  # a refused pass is a result of the benchmark
        return {
            "method": label,
            "spec": spec,
            "error": first_line(exc),
            "seconds": time.perf_counter() - start,
        }
    seconds = time.perf_counter() - start
    return {
        "method": label,
        "spec": spec,
        "module": result.output,
        "seconds": seconds,
        "params": params(result.output),
        "macs": result.after["macs"],
        "macs_before": result.before["macs"],
        "groups": next(iter(result.result.stats.values()), {}).get("groups"),
    }


def tp_row(label: str, fn, model, args, kwargs, target: int, total: int) -> dict:
    """Torch-Pruning at the pruning_ratio whose parameter count comes closest to `target`."""
    tried: dict[float, tuple] = {}

    def attempt(ratio: float):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(pruned, ratio, args, kwargs)
        except Exception as exc:
            tried[ratio] = (None, time.perf_counter() - start, first_line(exc))
            return None
        tried[ratio] = (pruned, time.perf_counter() - start, None)
        return params(pruned)

    lo, hi = 0.0, 0.9
    n = attempt(0.5)
    if n is None:
        return {"method": label, "error": tried[0.5][2], "seconds": tried[0.5][1], "tp_ratio": 0.5}
    if n == total:
        return {"method": label, "params": n, "seconds": tried[0.5][1], "tp_ratio": 0.5, "nothing": True}
    ratio = 0.5
    for _ in range(6):  # bisection on the ratio; parameters fall monotonically with it
        if n is not None and abs(n - target) / total < 0.002:
            break
        lo, hi = (ratio, hi) if n is None or n > target else (lo, ratio)
        ratio = round((lo + hi) / 2, 4)
        n = attempt(ratio)
    ok = [r for r, t in tried.items() if t[0] is not None]
    best = min(ok, key=lambda r: abs(params(tried[r][0]) - target))
    pruned, seconds, _ = tried[best]
    return {"method": label, "module": pruned, "params": params(pruned), "seconds": seconds, "tp_ratio": best}


def export(module, args, kwargs, path: Path, dynamo: bool) -> Path:
    import torch

    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), kwargs=dict(kwargs), dynamo=True, optimize=True)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=["x"])
    return path


def bench_case(key: str, case: Case, rounds: int) -> dict:
    import torch

    from tools.bench.runtime import session

    print(f"== {case.name}", flush=True)
    model, args, kwargs = case.build()
    total = params(model)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    reference = reference if isinstance(reference, torch.Tensor) else reference[0]
    rows = []
    for label, spec in case.ours:
        rows.append(ours_row(case, model, args, kwargs, label, spec))
        print(
            f"  {label}: {rows[-1].get('params', rows[-1].get('error'))} in {rows[-1]['seconds']:.1f} s",
            flush=True,
        )
    base_macs = next((r["macs_before"] for r in rows if "macs_before" in r), None) or macs_of(
        model, args, kwargs
    )
    target = next((r["params"] for r in rows if "params" in r), int(total * (1 - RATIO)))
    for label, fn in case.tp:
        rows.append(tp_row(label, fn, model, args, kwargs, target, total))
        r = rows[-1]
        print(
            f"  {label}: {r.get('params', r.get('error'))} at ratio {r['tp_ratio']} in {r['seconds']:.1f} s",
            flush=True,
        )
        if "module" in r:
            r["macs"] = macs_of(r["module"], args, kwargs)
    for r in rows:
        if "module" in r:
            r["runs"] = runs(r["module"], reference, args, kwargs)

    # ORT latency: the original twice (noise control) and every pruned model that runs and changed.
    sessions, feeds = {}, None
    folder = CACHE / "prune_models"
    try:
        original = export(model, args, kwargs, folder / f"{key}_original.onnx", case.dynamo)
        sessions["original"] = session(original)
        sessions["original, second session"] = session(original)
    except Exception as exc:
        print(f"  export of the original failed: {first_line(exc)}", flush=True)
        return {"case": case, "rows": rows, "total": total, "base_macs": base_macs}
    for i, r in enumerate(rows):
        if r.get("runs") != "yes" or r["params"] == total:
            continue
        try:
            path = export(r["module"], args, kwargs, folder / f"{key}_{i}.onnx", case.dynamo)
            sessions[i] = session(path)
        except Exception as exc:
            r["ort"] = f"export/ORT failed: {first_line(exc)}"
    arrays = [a.numpy() for a in args] + [v.numpy() for v in kwargs.values()]
    feeds = {k: {i.name: a for i, a in zip(s.get_inputs(), arrays)} for k, s in sessions.items()}
    for k, s in list(sessions.items()):
        try:
            s.run(None, feeds[k])
        except Exception as exc:
            rows[k]["ort"] = f"ORT run failed: {first_line(exc)}"
            del sessions[k]
    rounds *= case.rounds
    print(f"  exported {len(sessions)} sessions; timing {rounds} rounds", flush=True)
    medians = interleaved_medians(
        {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}, rounds
    )
    base = medians["original"]
    for k, m in medians.items():
        if isinstance(k, int):
            rows[k]["latency"] = m / base
    for r in rows:
        r.pop("module", None)
    return {
        "case": case,
        "rows": rows,
        "total": total,
        "base_macs": base_macs,
        "base_ms": base * 1e3,
        "noise": medians["original, second session"] / base,
        "rounds": rounds,
    }


# ----- report ----------------------------------------------------------------------------------
def table(results: list[dict]) -> list[str]:
    lines = [
        "| model | method | params (M) | params removed | MACs (G) | MACs removed | ORT latency ratio | "
        "prune time | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results:
        total, base_macs = b["total"], b["base_macs"]
        noise = f"{b['noise']:.3f} (second session)" if "noise" in b else "n/a"
        ms = f", {b['base_ms']:.0f} ms, {b['rounds']} rounds" if "base_ms" in b else ""
        lines.append(
            f"| {b['case'].name} | original{ms} | {total / 1e6:.2f} | | "
            f"{base_macs / 1e9:.2f} | | {noise} | | yes |"
            if base_macs
            else f"| {b['case'].name} | original | {total / 1e6:.2f} | | n/a | | {noise} | | yes |"
        )
        for r in b["rows"]:
            method = r["method"] + (f" (ratio {r['tp_ratio']:g})" if "tp_ratio" in r else "")
            method += f" ({r['groups']} groups)" if r.get("groups") else ""
            if "error" in r:
                lines.append(
                    f"| | {method} | failed: {r['error'][:150]} | | | | | {r['seconds']:.1f} s | no |"
                )
                continue
            if r.get("nothing"):
                lines.append(
                    f"| | {method} | {r['params'] / 1e6:.2f} | **0%: prunes nothing, no error** | | | | "
                    f"{r['seconds']:.1f} s | yes |"
                )
                continue
            macs = r.get("macs")
            macs_cells = (
                f"{macs / 1e9:.2f} | {1 - macs / base_macs:.1%}" if macs and base_macs else "n/a | n/a"
            )
            latency = f"{r['latency']:.3f}" if "latency" in r else r.get("ort", "n/a")
            lines.append(
                f"| | {method} | {r['params'] / 1e6:.2f} | {1 - r['params'] / total:.1%} | {macs_cells} | "
                f"{latency} | {r['seconds']:.1f} s | {r.get('runs', 'n/a')[:160]} |"
            )
    return lines


def _row(b: dict, method: str) -> dict | None:
    return next((r for r in b["rows"] if r["method"] == method), None)


def _say(b: dict, r: dict | None) -> str:
    """One row in words: what it removed, its latency ratio, or why it has none."""
    if r is None:
        return "not run"
    if "error" in r:
        return f"fails ({r['error'][:120]})"
    if r.get("nothing"):
        return "prunes nothing, without an error"
    if r.get("runs") != "yes":
        return f"removes {1 - r['params'] / b['total']:.1%} of the parameters but the model does not run ({r['runs'][4:120]})"
    latency = f"latency ratio {r['latency']:.3f}" if "latency" in r else f"no latency ({r.get('ort', 'n/a')})"
    return f"{1 - r['params'] / b['total']:.1%} of the parameters, {latency}"


def _span(seconds: list[float]) -> str:
    low, high = f"{min(seconds):.1f}", f"{max(seconds):.1f}"
    return f"{low} s" if low == high else f"{low} to {high} s"


def _round_to_sentence(b: dict) -> str:
    plain, rounded = _row(b, "ours"), _row(b, "ours round_to=8")
    if not (plain and rounded and "latency" in plain and "latency" in rounded and b.get("noise")):
        return ""
    gap, spread = plain["latency"] - rounded["latency"], abs(1 - b["noise"])
    verdict = (
        f"faster by {gap:.3f} of the original's time, more than the noise control's {spread:.3f}"
        if gap > spread
        else f"not faster beyond the noise control's spread ({plain['latency']:.3f} vs {rounded['latency']:.3f})"
    )
    return f"round_to=8 (widths a multiple of 8, a little less removed) is {verdict}. "


def reading(results: list[dict]) -> str:
    """The paragraph under the table, with this run's figures."""
    lines = []
    for b in results:
        name, noise = b["case"].name, b.get("noise")
        ours = [r for r in b["rows"] if r["method"].startswith("ours")]
        theirs = [r for r in b["rows"] if r["method"].startswith(TP)]
        text = f"**{name}** (noise control {noise:.3f}): " if noise else f"**{name}**: "
        text += "; ".join(f"{r['method']} {_say(b, r)}" for r in ours + theirs) + ". "
        if name == "ResNet-50":
            pairs = [
                (_row(b, "ours"), _row(b, TP)),
                (_row(b, "ours round_to=8"), _row(b, f"{TP} round_to=8")),
            ]
            pairs = [(o, t) for o, t in pairs if o and t and "latency" in o and "latency" in t]
            met = pairs and all(o["latency"] <= t["latency"] for o, t in pairs)
            text += (
                "Issue 12's target (ResNet-50 at 30% of the parameters removed at least as fast in ORT as "
                f"Torch-Pruning's at the same count) is {'met' if met else 'not met'} in this run ("
                + ", ".join(f"{o['latency']:.3f} vs {t['latency']:.3f}" for o, t in pairs)
                + "). Why: `prune` leaves the residual stream (every conv3 and downsample output, 256 to 2048 "
                "channels) whole, since `stream` is not in the default target, and narrows the bottleneck "
                "interiors (conv1/conv2 outputs, where the 3x3 convs are) by about 30 to 45%; Torch-Pruning "
                "narrows every channel, the stream included, by its ratio (about 20%), so at the same "
                "parameter count ours removes more MACs ("
                + ", ".join(f"{1 - r['macs'] / b['base_macs']:.0%}" for r in ours if r.get("macs"))
                + " vs "
                + ", ".join(f"{1 - r['macs'] / b['base_macs']:.0%}" for r in theirs if r.get("macs"))
                + "). "
                + _round_to_sentence(b)
            )
        if name == "ViT-B/16":
            text += (
                "`prune` cannot take ViT heads: nn.MultiheadAttention packs q, k and v in one in_proj and "
                "splits it with unflatten(-1, (3, E)) and select, which the group walk does not follow, so "
                "the heads group is reported unprunable and only MLP units go (the same in both tools). "
                "Torch-Pruning's own torchvision recipe shrinks the stream instead, and the result does not "
                "run: VisionTransformer keeps hidden_dim = 768 for its reshape. "
            )
        if name == "GPT-2 small":
            text += (
                "Torch-Pruning has no rule for HF's Conv1D (weight [in, out]), so with the BERT recipe it "
                "returns GPT-2 unchanged. "
            )
        times = [r["seconds"] for r in ours if "seconds" in r and "error" not in r]
        tp_times = [r["seconds"] for r in theirs if "error" not in r]
        if times and tp_times:
            text += (
                f"Pruning time: ours {_span(times)} (capture, groups, pass, rebuild), "
                f"Torch-Pruning {_span(tp_times)} per call."
            )
        lines.append(text)
    return "Reading.\n\n" + "\n\n".join(lines) + "\n"


def main() -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("rescompile").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys or args.rounds < 1:
        print(
            f"rescompile: error: --models takes {','.join(CASES)} and --rounds >= 1, not {','.join(unknown)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    import torch

    torch.set_grad_enabled(False)
    load_start, start = os.getloadavg(), time.perf_counter()
    results = [bench_case(k, CASES[k], args.rounds) for k in keys]
    load_end = os.getloadavg()
    command = "python tools/bench/prune_models.py" + (f" --rounds {args.rounds}" if args.rounds != 10 else "")
    if keys != list(CASES):
        command += f" --models {','.join(keys)}"
    write_result(
        "prune_models",
        "\n".join(
            [
                "## prune next to Torch-Pruning: ResNet-50, ViT-B/16, GPT-2, LLaMA (GQA)",
                "",
                f"Command: `{command}` ({time.perf_counter() - start:.0f} s)",
                f"Machine: {machine()}, Torch-Pruning {_tp_version()}. Load average (1, 5, 15 min) at start "
                f"{', '.join(f'{x:.2f}' for x in load_start)}, at end {', '.join(f'{x:.2f}' for x in load_end)}"
                + _load_note(load_start, load_end),
                "",
                __doc__.split("Usage:")[0].strip().replace("\n", " "),
                "",
                "Params: all of the module's parameters (tied weights once). MACs: rescompile's "
                "`count_macs` on a static capture of each model (convs, linears and attention matmuls). "
                f"Prune time: ours is `compile_model` end to end (capture, pass, module rebuild); "
                f"Torch-Pruning's is MetaPruner construction (its trace) plus `step()` at the chosen ratio. "
                f"ORT latency ratio: pruned / original median over {args.rounds} interleaved rounds "
                f"({3 * args.rounds} for ResNet-50) after 2 "
                f"warm-ups, default CPU sessions; the original row shows its own time and the ratio of a "
                f"second session on it (how far apart identical models measure).",
                "",
                *table(results),
                "",
                reading(results),
            ]
        ),
    )


def _load_note(start: tuple, end: tuple) -> str:
    """Say so when other work shared the cores: wall times (the prune times) are then inflated."""
    cores = os.cpu_count() or 1
    if max(start[0], end[0]) <= cores:
        return "."
    return (
        f": more runnable work than the {cores} cores, so the prune times (wall clock) are inflated; "
        "the latency ratios are interleaved with the original in the same rounds and hold up better, "
        "within the noise control's spread."
    )


if __name__ == "__main__":
    main()
