"""The `compress` planner (issue 17) on real weights: fidelity, size and ORT latency of its plans
next to width pruning alone and depth pruning alone at about the same parameter count.

The pretrained all-MiniLM-L6-v2 (loaded as tools/bench/drop.py does), the sentence sets of
tools/bench/sentences.py (evaluation sentences for fidelity, the separate 64 calibration
sentences for every pass). Rows: `compress:params=F,importance=fluctuation,distance=pooled`
(of=blocks; refit auto: least_squares; search=plans; the planner reads the mean-pooled outputs,
as the similarity below does) at F = 0.8, 0.7, 0.6 and one `of=model` row, the same with
replace=linear (dropped blocks replaced by a fitted map: no longer a BertModel); for each,
`prune:ratio=R,uniform=true,importance=fluctuation` (refit auto) with R = 1 - F (the block
parameters kept about F) and `drop:n=k,metric=greedy` with k the nearest layer count, with
replace=identity and replace=linear.
Fidelity: mean cosine similarity of mean-pooled sentence embeddings to the original's. Latency:
every result exported to ONNX and timed in ORT interleaved with the original (as prune.py does).

Usage: python tools/bench/compress.py [--rounds N] [--keep 0.8,0.7,0.6] [--model-keep 0.8]
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

from tools.bench.common import CACHE, RESULTS, interleaved_medians, machine, write_result  # noqa: E402
from tools.bench.drop import CALIBRATION_BATCH, EVAL_BATCH, embed, minilm_path, similarity, tokenize  # noqa: E402
from tools.bench.prune import export, params, run_pass  # noqa: E402

KEEP = [0.8, 0.7, 0.6]
MODEL_KEEP = 0.8


def block_params(model) -> int:
    """The parameters of the encoder layers: what drop and prune can remove (the reference for
    of=blocks, counted on the module, independently of the pass)."""
    return sum(p.numel() for p in model.encoder.layer.parameters())


def bench(rounds: int, keep: list[float], model_keep: float | None) -> dict:
    import torch
    import transformers as T

    from tools.bench.runtime import session
    from tools.bench.sentences import CALIBRATION, EVALUATION

    torch.set_grad_enabled(False)
    path = minilm_path()
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModel.from_pretrained(path).eval()
    evaluation = tokenize(tokenizer, EVALUATION, EVAL_BATCH)
    calibration = tokenize(tokenizer, CALIBRATION, CALIBRATION_BATCH)
    reference = embed(model, evaluation)
    total, blocks = params(model), block_params(model)
    layers = model.config.num_hidden_layers
    latency_batch = dict(evaluation[len(evaluation) // 2])

    rows, modules = [], {"original": model}

    def run(group: str, method: str, spec: str) -> dict:
        print(f"[compress bench] {spec}", file=sys.stderr, flush=True)
        out, seconds, stats = run_pass(model, spec, calibration)
        row = {"group": group, "method": method, "spec": spec, "seconds": seconds}
        if out is None:
            row["error"] = stats
        else:
            removed = total - params(out)
            row.update(
                similarity=similarity(reference, embed(out, evaluation)),
                params=params(out) / total,
                blocks=1 - removed / blocks,
                reloads=type(out) is type(model),
            )
            if "plan" in stats:
                row["plan"] = "; ".join(s["action"] for s in stats["plan"])
                row["plans"] = "; ".join(
                    f"{p['drops']} dropped: "
                    + (f"change {p['output_change']:.4f}" if "output_change" in p else "refused")
                    for p in stats.get("plans", [])
                )
                row["planner_seconds"] = stats.get("seconds")
            modules[spec] = out
        rows.append(row)
        return row

    budgets = [(f, "blocks") for f in keep] + ([(model_keep, "model")] if model_keep else [])
    drops_done: dict[int, dict] = {}
    for fraction, of in budgets:
        group = f"params={fraction:g}, of={of}"
        spec = f"compress:params={fraction:g},of={of},importance=fluctuation,distance=pooled"
        ours = run(group, "compress", spec)
        run(group, "compress, linear", f"{spec},replace=linear")
        size = ours.get("blocks", fraction)  # the others at the block share compress kept
        ratio = round(1 - size, 3)
        run(group, "prune alone", f"prune:ratio={ratio:g},uniform=true,importance=fluctuation")
        k = max(1, min(layers - 1, round((1 - size) * layers)))
        for method, replace in (("drop alone", "identity"), ("drop alone, linear", "linear")):
            if (k, replace) in drops_done:  # the same pass as another row's: reuse it
                rows.append({**drops_done[k, replace], "group": group})
            else:
                drops_done[k, replace] = run(group, method, f"drop:n={k},metric=greedy,replace={replace}")

    # Latency: every result exported and timed interleaved with the original.
    sessions = {}
    for number, (name, module) in enumerate(modules.items()):
        try:
            sessions[name] = session(
                export(module, latency_batch, CACHE / "compress" / f"minilm_{number}.onnx")
            )
        except Exception as exc:
            print(f"export of {name} failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr, flush=True)
    sessions["original, second session"] = session(CACHE / "compress" / "minilm_0.onnx")
    feeds = {i.name: latency_batch[i.name].numpy() for i in sessions["original"].get_inputs()}
    medians = interleaved_medians(
        {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds=rounds
    )
    base = medians["original"]
    for row in rows:
        if row["spec"] in medians:
            row["latency"] = medians[row["spec"]] / base
    return {
        "rows": rows,
        "base_ms": base * 1e3,
        "noise": medians["original, second session"] / base,
        "batch": tuple(latency_batch["input_ids"].shape),
        "sentences": len(EVALUATION),
        "calibration": len(CALIBRATION),
        "total": total,
        "blocks": blocks,
    }


def table(b: dict) -> list[str]:
    lines = [
        "| budget | method | pass | similarity | block params kept | params kept (model) | "
        "ORT latency ratio | pass time | reloads as BertModel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['group']} | {r['method']} | `{r['spec']}` | failed: {r['error'][:160]} | | | | | |"
            )
            continue
        latency = f"{r['latency']:.3f}" if "latency" in r else "n/a"
        planner = f" (planner {r['planner_seconds']:.0f} s)" if r.get("planner_seconds") is not None else ""
        lines.append(
            f"| {r['group']} | {r['method']} | `{r['spec']}` | **{r['similarity']:.4f}** | {r['blocks']:.3f} | "
            f"{r['params']:.3f} | {latency} | {r['seconds']:.0f} s{planner} | {'yes' if r['reloads'] else 'no'} |"
        )
    return lines


def plans(b: dict) -> list[str]:
    """Each compress row's plan, and the output change (on the calibration tokens, the planner's
    objective) of each plan its search compared, by the number of blocks dropped first."""
    return [
        f"- `{r['spec']}`: {r['plan']}" + (f" (plans compared: {r['plans']})" if r.get("plans") else "")
        for r in b["rows"]
        if r.get("plan")
    ]


def plot(b: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {
        "compress": ("o", "C0"),
        "compress, linear": ("P", "C4"),
        "prune alone": ("^", "C1"),
        "drop alone": ("s", "C2"),
        "drop alone, linear": ("D", "C3"),
    }
    for method, (marker, color) in styles.items():
        points = [r for r in b["rows"] if r["method"] == method and "latency" in r and "error" not in r]
        if not points:
            continue
        ax.scatter(
            [r["latency"] for r in points],
            [r["similarity"] for r in points],
            marker=marker,
            color=color,
            label=method,
            s=40,
        )
        for r in points:
            ax.annotate(
                f"{r['blocks']:.2f}",
                (r["latency"], r["similarity"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    ax.scatter([1.0], [1.0], marker="*", color="k", label="original")
    ax.axhline(0.9, color="lightgrey", linestyle=":")
    ax.invert_xaxis()
    ax.set_xlabel("ORT latency ratio to the original (lower is faster)")
    ax.set_ylabel("mean cosine similarity to the original")
    ax.set_title(
        "all-MiniLM-L6-v2: fidelity vs latency\n(labels: fraction of block parameters kept)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(b: dict, keep: list[float]) -> str:
    def find(method: str, group: str) -> dict | None:
        got = [r for r in b["rows"] if r["method"] == method and r["group"] == group and "error" not in r]
        return got[0] if got else None

    def said(label: str, r: dict) -> str:
        return f"{label} {r['similarity']:.3f} at {r.get('latency', float('nan')):.2f}x ({r['blocks']:.2f} of the blocks)"

    ours, alone = ("compress", "compress, linear"), ("prune alone", "drop alone", "drop alone, linear")
    parts = []
    for fraction in keep:
        group = f"params={fraction:g}, of=blocks"
        found = [(m, find(m, group)) for m in ours + alone]
        parts.append(f"params={fraction:g}: " + ", ".join(said(m, r) for m, r in found if r))
    verdicts = []
    for method in ours:
        c = find(method, "params=0.7, of=blocks")
        if not c or "latency" not in c:
            continue
        others = [o for o in (find(m, "params=0.7, of=blocks") for m in alone) if o and "latency" in o]
        faster = [o["method"] for o in others if c["latency"] < o["latency"]]
        slower = [o["method"] for o in others if o["method"] not in faster]
        verdicts.append(
            f"{method} {c['similarity']:.3f} ({'>=' if c['similarity'] >= 0.90 else 'below'} 0.90), faster than "
            f"{', '.join(faster) or 'none'}, not faster than {', '.join(slower) or 'none'}: "
            f"{'met' if c['similarity'] >= 0.90 and not slower else 'missed'}"
        )
    verdict = (
        "Issue 17's target (compress params=0.7 >= 0.90 at a lower ORT latency than either alone): "
        + "; ".join(verdicts)
        + ". "
    )
    return "Reading: " + "; ".join(parts) + ". " + verdict + "\n"


def main() -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("rescompile").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--keep", default=",".join(map(str, KEEP)))
    parser.add_argument(
        "--model-keep", default=str(MODEL_KEEP), help="the of=model row's params (none: skip)"
    )
    args = parser.parse_args()
    keep = [float(k) for k in args.keep.split(",")]
    model_keep = None if args.model_keep == "none" else float(args.model_keep)
    load_start = os.getloadavg()
    start = time.perf_counter()
    b = bench(args.rounds, keep, model_keep)
    plot(b, RESULTS / "compress.png")
    load_end = os.getloadavg()
    command = "python tools/bench/compress.py" + "".join(
        f" {flag} {value}"
        for flag, value, default in (
            ("--rounds", args.rounds, 10),
            ("--keep", args.keep, ",".join(map(str, KEEP))),
            ("--model-keep", args.model_keep, str(MODEL_KEEP)),
        )
        if value != default
    )
    write_result(
        "compress",
        "\n".join(
            [
                "## One planner over depth and width (compress)",
                "",
                f"Command: `{command}` ({time.perf_counter() - start:.0f} s)",
                f"Machine: {machine()}. Load average (1, 5, 15 min) at start "
                f"{', '.join(f'{x:.1f}' for x in load_start)}, at end {', '.join(f'{x:.1f}' for x in load_end)} "
                "(a shared machine: other jobs ran at the same time, so pass times and latencies are noisy).",
                "",
                f"all-MiniLM-L6-v2, {b['sentences']} evaluation and {b['calibration']} separate calibration "
                f"sentences (tools/bench/sentences.py). Every pass on the HF model through `compile_model` with "
                f"the calibration batches. `of=blocks`: params= is a fraction of the {b['blocks'] / 1e6:.1f}M "
                f"parameters of the 6 encoder layers (what drop and prune can remove); `of=model`: of all "
                f"{b['total'] / 1e6:.1f}M (the word embedding alone is 11.7M). prune alone and drop alone are "
                f"run at about the block share compress kept (prune ratio = 1 - that share; drop the nearest "
                f"number of layers). Similarity: mean cosine of the mean-pooled embeddings to the original's. "
                f"Latency: each result exported with `torch.onnx.export(dynamo=True)`, default ORT CPU sessions "
                f"on one batch {b['batch']}, timed interleaved with the original ({b['base_ms']:.1f} ms) and a "
                f"second session on it (noise control {b['noise']:.3f}), {args.rounds} rounds after 2 warm-ups, "
                f"median ratio. Pass time: `compile_model` end to end (export to the IR, the pass, the HF "
                f"rebuild); planner: the pass alone.",
                "",
                *table(b),
                "",
                "Plans:",
                "",
                *plans(b),
                "",
                "![similarity against ORT latency ratio, per method](tools/bench/results/compress.png)",
                "",
                reading(b, keep),
            ]
        ),
    )


if __name__ == "__main__":
    main()
