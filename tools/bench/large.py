"""A model whose weights exceed 2 GB (external data) through inspect, apply and validate.

Protobuf cannot hold more than 2 GB in one message, so such a model only exists with its
weights outside the .onnx file. This builds a synthetic residual MLP (per block: LayerNorm,
MatMul, Relu, Add; float32 weights WIDTH x WIDTH) whose weights add up to `--gb` GB,
writing the data file one block at a time, then times each command in a fresh process
and reads its peak memory (ru_maxrss), next to onnx-ir load+save of the same file.

Usage: python tools/bench/large.py [--gb 2.2] [--width 4096] [--dir FOLDER] [--keep]
(about 7 GB of disk in FOLDER, default a temporary folder under .cache/bench).
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench.common import CACHE, write_result  # noqa: E402

# Run in a fresh process: the step, then its own peak RSS as one JSON line on stdout.
_STEP = """
import contextlib, io, json, resource, sys, time
step, args = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
if step == "onnx_ir":
    import onnx_ir as ir
    model = ir.load(args[0])
    ir.save(model, args[1], external_data=args[1].rsplit("/", 1)[-1] + ".data")
else:
    from rescompile.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    assert code == 0, code
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak}))
"""


def build(path: Path, gb: float, width: int) -> tuple[int, int]:
    """Write the model and its data file; returns (blocks, bytes of weights)."""
    per_block = width * width * 4
    blocks = max(1, int(np.ceil(gb * 1e9 / per_block)))
    data = path.with_name(path.name + ".data")
    rng = np.random.default_rng(0)
    nodes, inits, x, offset = [], [], "x", 0
    with open(data, "wb") as f:
        for i in range(blocks):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            f.write(w.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += w.nbytes
            inits.append(tensor)
            inits.append(oh.make_tensor(f"g{i}", TensorProto.FLOAT, [width], np.ones(width, np.float32)))
            inits.append(oh.make_tensor(f"b{i}", TensorProto.FLOAT, [width], np.zeros(width, np.float32)))
            nodes += [
                oh.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], axis=-1, name=f"ln{i}"),
                oh.make_node("MatMul", [f"n{i}", f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                oh.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
                oh.make_node("Add", [x, f"r{i}"], [f"a{i}"], name=f"add{i}"),
            ]
            x = f"a{i}"
    nodes.append(oh.make_node("Identity", [x], ["y"], name="out"))
    graph = oh.make_graph(
        nodes,
        "large",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return blocks, offset


def step(name: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _STEP, name, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weights in GB (default 2.2)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = args.dir or Path(tempfile.mkdtemp(prefix="large-", dir=CACHE))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "large.onnx"
        start = time.perf_counter()
        blocks, nbytes = build(src, args.gb, args.width)
        built = time.perf_counter() - start
        out, ref = str(work / "rezero.onnx"), str(work / "onnx_ir.onnx")
        rows = {
            "onnx_ir load+save": step("onnx_ir", str(src), ref),
            "rescompile inspect": step("cli", "inspect", str(src), "--json"),
            "rescompile apply -p rezero": step("cli", "apply", str(src), "-p", "rezero", "-o", out),
            "rescompile validate (ONNX Runtime, both models)": step("cli", "validate", str(src), out),
        }
        base = rows["onnx_ir load+save"]
        lines = [
            f"## Weights over 2 GB ({nbytes / 1e9:.2f} GB of external data)",
            "",
            f"Command: `python tools/bench/large.py --gb {args.gb:g} --width {args.width}`. "
            f"A residual MLP of {blocks} blocks (LayerNorm, MatMul {args.width}x{args.width}, Relu, Add), "
            f"written in {built:.0f} s; each row is one fresh process.",
            "",
            "| command | wall time | vs onnx_ir | peak memory | vs onnx_ir |",
            "|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['seconds']:.2f} s | {r['seconds'] / base['seconds']:.2f}x | "
                f"{r['peak_mb']:,.0f} MB | {r['peak_mb'] / base['peak_mb']:.2f}x |"
            )
        write_result("large", "\n".join(lines))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
