"""ONNX Runtime latency of rewritten models relative to the original, before and
after `fold` (issue 4): ResNet-50 (HF ResNetConfig defaults, 1x3x224x224) and
GPT-2 (12 layers, n_embd 768, batch 1, seq 128).

Usage: python tools/bench/runtime.py [--rounds N] [--models resnet50,gpt2]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tools.bench.common import CACHE, interleaved_medians, machine, write_result  # noqa: E402

SPECS = [["rezero"], ["layerscale"], ["gate"], ["laurel:variant=rw"], ["depthscale:compensate=true"]]


def build_case(name: str):
    import torch
    import transformers as T

    from tools.models import ModelCase

    torch.manual_seed(0)
    if name == "resnet50":
        model = T.ResNetModel(T.ResNetConfig()).eval()
        return ModelCase(name, model, (), {"pixel_values": torch.randn(1, 3, 224, 224)}, sites=16)
    model = T.GPT2Model(T.GPT2Config(n_layer=12, use_cache=False)).eval()
    return ModelCase(name, model, (), {"input_ids": torch.randint(0, 50257, (1, 128))}, sites=24)


def export(name: str) -> Path:
    from tools.models import export_onnx

    path = CACHE / f"{name}.onnx"
    if not path.exists():
        export_onnx(build_case(name), path)
    return path


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default="resnet50,gpt2")
    args = parser.parse_args()
    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.onnx import load_onnx, save_onnx
    from rescompile.validation import random_onnx_inputs

    rows = []
    for name in args.models.split(","):
        src = export(name)
        variants = {"original": src}
        extra_nodes = {}
        base_nodes = len(load_onnx(src))
        for spec in SPECS:
            for folded in (False, True):
                specs = spec + (["fold"] if folded else [])
                graph = load_onnx(src)
                run_passes(graph, build_passes(specs))
                out = CACHE / f"{name}.{'+'.join(s.split(':')[0] for s in specs)}.onnx"
                save_onnx(graph, out)
                variants["+".join(specs)] = out
                extra_nodes["+".join(specs)] = len(graph) - base_nodes
        feeds, _ = random_onnx_inputs(str(src))
        # A second session on the unchanged model: its ratio shows the noise floor.
        variants["original, second session"] = src
        sessions = {k: session(p) for k, p in variants.items()}
        reference = sessions["original"].run(None, feeds)[0]
        for key, s in sessions.items():
            diff = np.abs(s.run(None, feeds)[0] - reference).max() / np.abs(reference).max()
            assert diff < 1e-5, (key, diff)  # relative to the output scale
        medians = interleaved_medians(
            {k: (lambda s=s, feeds=feeds: s.run(None, feeds)) for k, s in sessions.items()},
            rounds=args.rounds,
        )
        base = medians["original"]
        rows.append(f"| {name} | original ({base_nodes} nodes) | {base * 1e3:.1f} ms | 1.000 | | |")
        control = medians["original, second session"]
        rows.append(
            f"| {name} | original, second session (noise control) | {control * 1e3:.1f} ms | "
            f"{control / base:.3f} | | |"
        )
        for spec in SPECS:
            plain, folded = "+".join(spec), "+".join(spec + ["fold"])
            rows.append(
                f"| {name} | {plain} | {medians[plain] * 1e3:.1f} ms | {medians[plain] / base:.3f} | "
                f"{medians[folded] / base:.3f} | {extra_nodes[plain]:+d} / {extra_nodes[folded]:+d} |"
            )
        del sessions
    table = "\n".join(
        [
            "| model | passes | median latency | ratio to original | after fold | "
            "extra nodes (before / after fold) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_result(
        "runtime",
        f"""## Runtime of rewritten models (ONNX Runtime, CPU)

Command: `python tools/bench/runtime.py --rounds {args.rounds} --models {args.models}`
Machine: {machine()}. Default ORT session options (all graph optimisations).
Each model variant has its own session; runs are interleaved round-robin in a
shuffled order, {args.rounds} rounds after 2 warm-up runs; median latency.
Outputs of every variant are checked against the original first.

{table}

The second session on the unchanged original shows how far two identical
models differ on this machine. Target (issue 4): after `fold`, within noise of
the original (<= 1.02x). `gate`
is input-dependent and cannot be folded; `laurel:variant=rw` keeps its skip
weight (a factor on the stream, not on a branch), so one Mul per site remains.
""",
    )


if __name__ == "__main__":
    main()
