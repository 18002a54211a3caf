"""Hyper- and frac-connections on GPT-2 (12 layers, n_embd 768, batch 1, seq 128)
(issue 5): forward+backward time and peak memory relative to the original, for
rescompile's rewrite and for a hand-built equivalent with the `hyper-connections`
package around the same Hugging Face submodules. Step times are taken with all
variants interleaved in one process, peak memory with each variant in its own.
The package always computes its dynamic terms, so it is compared with our
dynamic=true.

Usage: python tools/bench/hyper.py [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.common import machine, write_result  # noqa: E402

VARIANTS = [
    "original",
    "ours hyper:n=2",
    "ours hyper:n=4",
    "ours hyper:n=2,dynamic=true",
    "ours hyper:n=4,dynamic=true",
    "package n=2",
    "package n=4",
    "ours frac:m=4",
    "ours frac:m=4,dynamic=true",
    "package fracs=4",
]

SETUP = r'''
import json, logging, resource, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, transformers as T
from torch import nn
logging.disable(logging.WARNING)
torch.manual_seed(0)
torch.set_num_threads(2)
hf = T.GPT2Model(T.GPT2Config(n_layer=12, use_cache=False)).eval()
ids = torch.randint(0, 50257, (1, 128))

class Branch(nn.Module):
    def __init__(self, norm, body, attn):
        super().__init__()
        self.norm, self.body, self.attn = norm, body, attn
    def forward(self, x):
        out = self.body(self.norm(x))
        return out[0] if self.attn else out

class Package(nn.Module):
    """GPT-2 written by hand with hyper_connections around each attention and MLP."""
    def __init__(self, hf, streams, fracs):
        super().__init__()
        from hyper_connections import get_init_and_expand_reduce_stream_functions
        init_hc, self.expand, self.reduce = get_init_and_expand_reduce_stream_functions(
            streams, num_fracs=fracs, disable=False)
        self.hf = hf
        self.hcs = nn.ModuleList()
        for i, block in enumerate(hf.h):
            self.hcs.append(init_hc(dim=768, branch=Branch(block.ln_1, block.attn, True), layer_index=2 * i))
            self.hcs.append(init_hc(dim=768, branch=Branch(block.ln_2, block.mlp, False), layer_index=2 * i + 1))
    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1])
        h = self.expand(self.hf.wte(input_ids) + self.hf.wpe(pos))
        for hc in self.hcs:
            h = hc(h)
        return self.hf.ln_f(self.reduce(h))



def build(variant):
    """(model, forward function) for a variant."""
    if variant == "original":
        model, run = hf, lambda: hf(input_ids=ids).last_hidden_state
    elif variant.startswith("ours "):
        import rescompile
        model = rescompile.apply(hf, [variant[5:]], {"input_ids": ids}, dynamic=False)
        run = lambda: model(input_ids=ids).last_hidden_state
    else:
        streams = int(variant.split("n=")[1]) if "n=" in variant else 1
        fracs = int(variant.split("fracs=")[1]) if "fracs=" in variant else 1
        model = Package(hf, streams, fracs).eval()
        run = lambda: model(ids)
    return model, run


def training_step(model, run):
    def step():
        run().square().mean().backward()
        for p in model.parameters():
            p.grad = None
    return step
'''

# Step time: every variant in one process, one step each per round in a shuffled
# order, so the machine's drift (up to 15% between processes here) hits all alike.
TIME_WORKER = (
    SETUP
    + r"""
from tools.bench.common import interleaved_medians
variants, steps = sys.argv[2].split("|"), int(sys.argv[3])
steps_of = {v: training_step(*build(v)) for v in variants}
print(json.dumps(interleaved_medians(steps_of, steps, warmup=1)))
"""
)

# Peak memory: one variant per process (peak RSS cannot be split between variants).
MEMORY_WORKER = (
    SETUP
    + r"""
variant = sys.argv[2]
model, run = build(variant)
with torch.no_grad():
    run()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step = training_step(model, run)
for _ in range(3):
    step()
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"peak_mb": peak, "params": sum(p.numel() for p in model.parameters())}))
"""
)


def worker(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{args[0]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each variant per process")
    parser.add_argument(
        "--rounds", type=int, default=2, help="timing processes (figures: mean of their medians)"
    )
    args = parser.parse_args()
    timings = []
    for r in range(args.rounds):
        timings.append(worker(TIME_WORKER, "|".join(VARIANTS), str(args.steps)))
        print("round", r, timings[-1], flush=True)
    results = {}
    for v in VARIANTS:
        results[v] = worker(MEMORY_WORKER, v)
        results[v]["time"] = sum(t[v] for t in timings) / len(timings)
        print(v, results[v], flush=True)
    base = results["original"]
    rows = [
        f"| {v} | {r['time'] * 1e3:.0f} ms | {r['time'] / base['time']:.2f}x | {r['peak_mb']:.0f} MB | "
        f"{r['peak_mb'] / base['peak_mb']:.2f}x | {r['params'] - base['params']:+,} |"
        for v, r in results.items()
    ]
    pairs = [
        ("ours hyper:n=2,dynamic=true", "package n=2"),
        ("ours hyper:n=4,dynamic=true", "package n=4"),
        ("ours frac:m=4,dynamic=true", "package fracs=4"),
    ]
    per_round = {pair: [t[pair[0]] / t[pair[1]] for t in timings] for pair in pairs}
    verdicts = [
        f"- {a} / {b}: time {results[a]['time'] / results[b]['time']:.2f}x "
        f"(per process: {', '.join(f'{x:.2f}' for x in per_round[(a, b)])}), "
        f"peak memory {results[a]['peak_mb'] / results[b]['peak_mb']:.2f}x"
        for a, b in pairs
    ]
    write_result(
        "hyper",
        f"""## Hyper- and frac-connections: training step cost

Command: `python tools/bench/hyper.py --steps {args.steps} --rounds {args.rounds}`
Machine: {machine()}.
GPT-2 (12 layers, n_embd 768, batch 1, seq 128), forward + backward of a mean-square
loss. Step time: all variants built in one process and stepped round-robin in a
shuffled order, {args.steps} steps each after one warm-up; the figure is the median,
averaged over {args.rounds} such processes. (Timing each variant in its own process
instead mixed in the machine's drift, up to 15% between consecutive processes of
the same variant.) Peak memory: each variant in its own process, the growth of
peak RSS over three training steps (activations and gradients).
`ours` = `rescompile.apply(model, [spec], inputs, dynamic=False)` on the Hugging Face
model; `package` = the same model written by hand with `hyper_connections` (which
always computes its dynamic terms) around the same submodules.

| variant | step time | vs original | peak memory | vs original | extra parameters |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Ours relative to the package (target: <= 1.0):
{chr(10).join(verdicts)}

The package's frac variant writes each fraction of the branch output to every
fraction of the stream (an m x m depth matrix, all ones at init, which does not
keep the function); ours follows the paper's function-preserving form (one
weight per fraction), hence fewer parameters.
""",
    )


if __name__ == "__main__":
    main()
