"""`rescompile demo`: the whole job on a built-in model, end to end.

Build a small pre-norm transformer in torch, export it to ONNX, find its
residual connections, rewrite them with real passes, and check the rewritten
models in ONNX Runtime against the original.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

__all__ = ["run_demo"]


def _export(path: Path) -> None:
    import torch

    from rescompile.examples import TinyTransformer, example_inputs

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs(),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["input_ids"],
            output_names=["logits"],
            verbose=False,
        )


def run_demo(out_dir: Path, console) -> None:
    from rescompile.api import inspect, load
    from rescompile.console import print_pass_stats, print_validation, site_table, summary
    from rescompile.pipeline import compile_model
    from rescompile.validation import DEFAULT_TOLERANCE, Tolerance

    out_dir.mkdir(parents=True, exist_ok=True)
    original = out_dir / "tiny_transformer.onnx"
    console.rule("1. build and export")
    console.print(
        "TinyTransformer: 4 pre-norm blocks (attention + MLP), width 32 -> ONNX (torch.onnx, dynamo)"
    )
    _export(original)
    console.print(f"wrote {original}")

    console.rule("2. inspect")
    report = inspect(original)
    console.print(site_table(report, str(original)))
    console.print(summary(report))

    bit_exact = Tolerance(0.0, 0.0)
    steps = [
        (["identity"], "round trip through the IR: must be bit-identical", bit_exact),
        (["rezero"], "learned scalar gate on every branch, init 1: same function", DEFAULT_TOLERANCE),
        (
            ["layerscale", "fold"],
            "per-channel gates, then folded into the branch weights: same function, original node count",
            DEFAULT_TOLERANCE,
        ),
        (
            ["hyper:n=4,dynamic=true"],
            "hyper-connections, 4 copies of the stream, dynamic: same function",
            DEFAULT_TOLERANCE,
        ),
        (
            ["rezero:init=0,sites=depth:4-"],
            "ReZero's init (alpha=0) on the last 4 sites: a different function",
            None,
        ),
    ]
    original_nodes = len(load(original))
    for i, (specs, what, tol) in enumerate(steps, start=3):
        console.rule(f"{i}. apply " + " ".join(f"-p {s}" for s in specs))
        console.print(what)
        target = out_dir / f"tiny_transformer.{i}-{'+'.join(s.split(':')[0] for s in specs)}.onnx"
        compiled = compile_model(
            original,
            specs,
            output=target,
            validate=True,
            compare_with_changed=True,
            tolerance=tol or DEFAULT_TOLERANCE,
        )
        print_pass_stats(console, compiled)
        console.print(
            f"{len(compiled.graph)} nodes (original {original_nodes}); onnx.checker passed; wrote {target}"
        )
        res = compiled.validation
        print_validation(console, res, expect_same=tol is not None)
        if tol is not None and not res.ok:
            raise SystemExit(f"demo: {specs} should preserve the function but does not")
        if tol is None and res.ok:
            raise SystemExit(f"demo: {specs} should change the function but does not")
        if tol == bit_exact:
            console.print("bit-identical: " + ("yes" if res.max_abs == 0.0 else "NO"))
    console.rule("done")
    console.print(f"files in {out_dir}/; try: rescompile inspect {original}")
