"""Run every benchmark and rewrite BENCHMARKS.md from their results (`make bench`).

Each benchmark writes tools/bench/results/<name>.md with the command that
produced it; this script runs them in order and concatenates the results.
Usage: python tools/bench/run.py [--only compile,scaling,large,torchpath,... | none]
The fuzz table (tools/bench/results/fuzz.md) comes from `make fuzz`, not from here; it is
included when present.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ORDER = [
    "compile",
    "scaling",
    "large",
    "torchpath",
    "runtime",
    "hyper",
    "drop",
    "drop_calibration",
    "prune",
    "prune_models",
    "compress",
    "cnn_refit",
    "blocks",
]
FROM_ELSEWHERE = ["fuzz"]  # written by `make fuzz` (tools/fuzz.py)

HEADER = """# Benchmarks

Produced by `make bench` (`python tools/bench/run.py`), which runs each script
below and rewrites this file; each section names the exact command and the
machine. Ratios are taken within one run, never across runs. Large models are
built once into `.cache/bench/` (GPT-2 48 layers: about 1.4 GB).
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(ORDER))
    args = parser.parse_args()
    for name in [n for n in args.only.split(",") if n and n != "none"]:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / f"{name}.py")], check=True, cwd=ROOT)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    assemble()


def assemble() -> None:
    """Rewrite BENCHMARKS.md from the result files (`--only none` does just this)."""
    sections = [
        (HERE / "results" / f"{n}.md").read_text()
        for n in ORDER + FROM_ELSEWHERE
        if (HERE / "results" / f"{n}.md").exists()
    ]
    (ROOT / "BENCHMARKS.md").write_text(HEADER + "\n" + "\n".join(sections))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
