"""Shared helpers for the benchmarks: machine facts, result files, timing."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import onnxruntime
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def write_result(name: str, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    print(markdown)
    return path


def interleaved_medians(fns: dict, rounds: int, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin in a shuffled
    order each round, so slow drifts of the machine hit every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
