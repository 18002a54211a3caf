"""Scaling (issue 6): synthetic residual chains of 1k to 300k nodes; time per
node and peak memory for import, analysis, one pass and export, each size in a
fresh process.

Usage: python tools/bench/scaling.py [--nodes 1000,10000,100000,300000]
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
from tools.bench.models import residual_chain  # noqa: E402

STAGES = r'''
import gc, json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from rescompile.api import build_passes, run_passes
from rescompile.analysis.residuals import find_residuals
from rescompile.frontends.onnx import load_onnx, save_onnx
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
gc.disable()  # as the CLI does (rescompile._gc)
base = rss_mb()
out = {}
t = time.perf_counter(); graph = load_onnx(sys.argv[1]); out["import"] = time.perf_counter() - t
out["nodes"] = len(graph)
t = time.perf_counter(); analysis = find_residuals(graph); out["analysis"] = time.perf_counter() - t
out["sites"] = len(analysis.sites)
t = time.perf_counter(); run_passes(graph, build_passes(["rezero"]), check=False); out["pass rezero"] = time.perf_counter() - t
t = time.perf_counter(); save_onnx(graph, sys.argv[2]); out["export"] = time.perf_counter() - t
out["peak_rss_mb"] = rss_mb() - base
print(json.dumps(out))
'''


def graph_proto_mb(path: Path) -> float:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.initializer[:]
    return model.ByteSize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="1000,10000,100000,300000")
    args = parser.parse_args()
    rows, per_node = [], {}
    for n in (int(x) for x in args.nodes.split(",")):
        path = residual_chain(n // 4)
        out = Path("/tmp") / f"rc-scale-{n}.onnx"
        r = json.loads(subprocess.run([sys.executable, "-c", STAGES, str(path), str(out), str(ROOT)],
                                      check=True, capture_output=True, text=True).stdout)
        out.unlink(missing_ok=True)
        proto = graph_proto_mb(path)
        per_node[n] = {k: r[k] / r["nodes"] * 1e6 for k in ("import", "analysis", "pass rezero", "export")}
        stages = " | ".join(f"{per_node[n][k]:.1f}" for k in ("import", "analysis", "pass rezero", "export"))
        rows.append(f"| {r['nodes']:,} | {r['sites']:,} | {stages} | {r['peak_rss_mb']:.0f} MB | {proto:.1f} MB | "
                    f"{r['peak_rss_mb'] / proto:.1f}x |")
    sizes = sorted(per_node)
    ratio = ""
    if 10000 in per_node and sizes[-1] > 10000:
        top = sizes[-1]
        ratio = "Time per node at {:,} over 10,000: ".format(top) + ", ".join(
            f"{k} {per_node[top][k] / per_node[10000][k]:.2f}x" for k in per_node[top]) + " (target <= 1.2x)."
    write_result("scaling", f"""## Scaling with graph size

Command: `python tools/bench/scaling.py --nodes {args.nodes}`
Machine: {machine()}.
Residual chains written directly as ONNX (per block: MatMul, Relu, MatMul, Add; 4x4 weights);
each size runs in a fresh process with the garbage collector paused as in the CLI.
Peak memory is the growth of the process's peak RSS over its size after imports;
the graph protobuf is the model without initializers.

| nodes | sites | import µs/node | analysis µs/node | rezero µs/node | export µs/node | peak memory | graph protobuf | memory / protobuf |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{ratio}
Target: peak memory <= 3x the graph protobuf.
""")


if __name__ == "__main__":
    main()
