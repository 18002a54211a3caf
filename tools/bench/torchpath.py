"""The torch path (issue 6): `rescompile.apply(model, ["rezero"], inputs)` on
GPT-2 (12 layers, seq 128) relative to `torch.export.export` alone.

rescompile captures with dynamic dims (Dim.AUTO) so the rewritten module
accepts other batch sizes and lengths; both export settings are reported.

Usage: python tools/bench/torchpath.py [--repeat N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.common import machine, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers as T

    import rescompile
    from rescompile.frontends.torch import _auto_dynamic_shapes, _quiet

    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = T.GPT2Model(T.GPT2Config(n_layer=12, use_cache=False)).eval()
    kwargs = {"input_ids": torch.randint(0, 50257, (1, 128))}
    shapes = _auto_dynamic_shapes(model, (), kwargs)

    def static():
        with _quiet():
            torch.export.export(model, (), kwargs, strict=False)

    def dynamic():
        with _quiet():
            torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)

    def apply():
        rescompile.apply(model, ["rezero"], kwargs)

    def apply_static():
        rescompile.apply(model, ["rezero"], kwargs, dynamic=False)

    fns = {
        "torch.export (static)": static,
        "torch.export (dynamic dims)": dynamic,
        "rescompile.apply rezero": apply,
        "rescompile.apply rezero, dynamic=False": apply_static,
    }
    times = {k: [] for k in fns}
    apply()  # warm-up: first-call costs of torch.export
    for _ in range(args.repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = med["rescompile.apply rezero"], med["rescompile.apply rezero, dynamic=False"]
    rows = "\n".join(f"| {k} | {v:.2f} s |" for k, v in med.items())
    verdict = (
        f"Like for like: apply (dynamic dims) / torch.export (dynamic dims) = "
        f"**{a / med['torch.export (dynamic dims)']:.2f}x**; apply (dynamic=False) / torch.export (static) = "
        f"**{b / med['torch.export (static)']:.2f}x**; the default apply / static torch.export = "
        f"{a / med['torch.export (static)']:.2f}x (dynamic capture costs more inside torch.export itself)."
    )
    write_result(
        "torchpath",
        f"""## The torch path

Command: `python tools/bench/torchpath.py --repeat {args.repeat}`
Machine: {machine()}.
GPT-2 (12 layers, n_embd 768, batch 1, seq 128); medians of {args.repeat} interleaved runs after one warm-up.
`rescompile.apply` = capture (torch.export with dynamic dims) + import + analysis + rezero + GraphModule build.

| step | median |
|---|---|
{rows}

{verdict}

Target: apply <= 1.3x torch.export.export alone on the same model.
""",
    )


if __name__ == "__main__":
    main()
