"""Compile speed against the limit (issue 6): whole-process wall time of
`rescompile inspect` and `rescompile apply -p rezero` over the whole-process time
of a plain load+save of the same file (onnx_ir and onnx), in the same run; and
where the time goes inside one `apply`.

Usage: python tools/bench/compile.py [--repeat N] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.common import machine, write_result  # noqa: E402
from tools.bench.models import gpt2_large_export, residual_chain  # noqa: E402

PY = sys.executable
RESCOMPILE = [PY, "-m", "rescompile"]

IR_LOAD_SAVE = (
    "import sys, onnx_ir as ir; m = ir.load(sys.argv[1]); "
    "ir.save(m, sys.argv[2], external_data=sys.argv[3] or None)"
)
ONNX_LOAD_SAVE = (
    "import sys, onnx; m = onnx.load(sys.argv[1]); "
    "onnx.save(m, sys.argv[2], save_as_external_data=bool(sys.argv[3]), location=sys.argv[3] or None)"
)

SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
from rescompile.api import build_passes, load
from rescompile.analysis.residuals import find_residuals
from rescompile.pipeline import check_onnx
from rescompile.frontends.onnx import save_onnx
from rescompile.infra import PassManager
t1 = time.perf_counter()
graph = load(sys.argv[1])
t2 = time.perf_counter()
find_residuals(graph)
t3 = time.perf_counter()
PassManager(build_passes(["rezero"]), check=False)(graph)
t4 = time.perf_counter()
import onnx_ir as ir
from rescompile.frontends.onnx import export_model
model = export_model(graph)
t5 = time.perf_counter()
save_onnx(graph, sys.argv[2])
t6 = time.perf_counter()
check_onnx(sys.argv[2])
t7 = time.perf_counter()
print(json.dumps({"import rescompile": t1 - t0, "load (onnx-ir -> IR)": t2 - t1, "analysis": t3 - t2,
                  "pass rezero (incl. its analysis)": t4 - t3, "IR edits -> onnx-ir model": t5 - t4,
                  "export + save": t6 - t5, "onnx.checker": t7 - t6}))
"""


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench(path: Path, repeat: int, external: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    data = "out.onnx.data" if external else ""
    commands = {
        "python start-up": [PY, "-c", "pass"],
        "onnx_ir load+save": [PY, "-c", IR_LOAD_SAVE, str(path), str(tmp / "out.onnx"), data],
        "onnx load+save": [PY, "-c", ONNX_LOAD_SAVE, str(path), str(tmp / "out.onnx"), data],
        "rescompile inspect": [*RESCOMPILE, "inspect", str(path), "--json"],
        "rescompile apply -p rezero": [
            *RESCOMPILE,
            "apply",
            str(path),
            "-p",
            "rezero",
            "-o",
            str(tmp / "r.onnx"),
        ],
    }
    times = {k: [] for k in commands}
    for _ in range(repeat):  # interleave the commands so drifts hit all alike
        for name, cmd in commands.items():
            times[name].append(wall(cmd))
    split = json.loads(
        subprocess.run(
            [PY, "-c", SPLIT, str(path), str(tmp / "s.onnx")], check=True, capture_output=True, text=True
        ).stdout
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="only the residual chain")
    args = parser.parse_args()
    models = [("residual MLP, 1000 blocks", residual_chain(1000), False)]
    if not args.skip_large:
        models.insert(0, ("GPT-2 48 layers (n_embd 768)", gpt2_large_export(), True))
    sections = []
    for title, path, external in models:
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
        r = bench(path, args.repeat, external)
        m = r["median"]
        ir_time = m["onnx_ir load+save"]
        rows = [f"| {k} | {v:.2f} s | {v / ir_time:.2f}x |" for k, v in m.items()]
        split = [f"| {k} | {v:.3f} s |" for k, v in r["split"].items()]
        verdict = (
            f"apply / onnx_ir load+save = **{m['rescompile apply -p rezero'] / ir_time:.2f}x** (target <= 1.5x); "
            f"inspect / onnx_ir load+save = **{m['rescompile inspect'] / ir_time:.2f}x** (target <= 1.2x)"
        )
        sections.append(f"""### {title} ({size:,.0f} MB on disk)

| whole process | median wall time | ratio to onnx_ir load+save |
|---|---|---|
{chr(10).join(rows)}

{verdict}

Time split inside one `apply` (in-process, after Python start-up):

| step | time |
|---|---|
{chr(10).join(split)}
""")
    write_result(
        "compile",
        f"""## Compile speed against the limit

Command: `python tools/bench/compile.py --repeat {args.repeat}{" --skip-large" if args.skip_large else ""}`
Machine: {machine()}.
Each figure is the median of {args.repeat} whole-process runs, commands interleaved.
The load+save baselines write weights to an external data file when the input has one.
`apply` includes writing the output and running `onnx.checker` on it.

{chr(10).join(sections)}""",
    )


if __name__ == "__main__":
    main()
