"""Refit after width pruning on a CNN with quality to keep (issue 17): a small residual CNN
trained here, in a few minutes on CPU, on a synthetic task with real structure, then pruned by
`prune:ratio=R,importance=I,refit=F` with calibration images from the training set.

Task: K fixed random 7x7 patterns; an image is one of them, at a random place and contrast, in
a 32x32 field of Gaussian noise with a second, weaker pattern of another class as a distractor;
the label is the strong pattern. Detection anywhere in the image: what convolutions and global
pooling are for. Everything is seeded.

The network is built so that every kind of reader of a pruned channel is present: 3x3 convs
(read a window), 1x1 convs (a matrix per pixel) closing the two residual bottlenecks, and the
linear classifier behind global average pooling. The table says which readers each refit
changed (with the rounds of its sequential refit) and which it refused, with the pass's own
reasons.

Usage: python tools/bench/cnn_refit.py [--epochs N] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tools.bench.common import CACHE, machine, write_result  # noqa: E402

CLASSES = 8
SIZE = 24
PATCH = 7
NOISE = 1.0
TRAIN, TEST = 6000, 2000
CALIBRATION_BATCHES, CALIBRATION_BATCH = 8, 64
RATIOS = [0.3, 0.5]
IMPORTANCES = ["l2", "activation"]
REFITS = ["none", "bias", "least_squares"]


def patterns(rng: np.random.Generator) -> np.ndarray:
    """K zero-mean, unit-norm random 7x7 patterns (the classes)."""
    p = rng.standard_normal((CLASSES, PATCH, PATCH))
    p -= p.mean(axis=(1, 2), keepdims=True)
    return p / np.linalg.norm(p.reshape(CLASSES, -1), axis=1)[:, None, None] * PATCH


def images(count: int, seed: int, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`count` noisy images with their labels; the same seed gives the same set."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 1, SIZE, SIZE)).astype(np.float32) * NOISE
    y = rng.integers(0, CLASSES, count)
    distractor = (y + rng.integers(1, CLASSES, count)) % CLASSES
    for i in range(count):
        for cls, contrast in ((y[i], rng.uniform(1.2, 2.0)), (distractor[i], rng.uniform(0.3, 0.6))):
            r, c = rng.integers(0, SIZE - PATCH + 1, 2)
            x[i, 0, r : r + PATCH, c : c + PATCH] += contrast * shapes[cls]
    return x, y


def network():
    """stem 3x3 -> 3x3 stride 2 -> bottleneck (3x3 widen, 1x1 back) + skip -> 3x3 stride 2 ->
    bottleneck + skip -> 1x1 widen -> global average pool -> linear. BatchNorm after every conv."""
    import torch
    from torch import nn

    def conv(cin, cout, k, stride=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    class Bottleneck(nn.Module):
        def __init__(self, width: int, inner: int) -> None:
            super().__init__()
            self.widen = conv(width, inner, 3)
            self.back = conv(inner, width, 1, relu=False)  # a 1x1 conv reads the pruned inner channels

        def forward(self, x):
            return torch.relu(x + self.back(self.widen(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                conv(1, 16, 3),
                conv(16, 24, 3, stride=2),
                Bottleneck(24, 48),
                conv(24, 48, 3, stride=2),
                Bottleneck(48, 64),
                conv(48, 96, 1),  # read, after pooling, by the classifier
            )
            self.classifier = nn.Linear(96, CLASSES)

        def forward(self, x):
            return self.classifier(self.features(x).mean(dim=(2, 3)))

    return Net()


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, log) -> float:
    import torch

    torch.manual_seed(0)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * (len(xs) // 128)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for i in range(0, len(xs) - 127, 128):
            idx = order[i : i + 128]
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total / (len(xs) // 128):.3f} ({time.perf_counter() - start:.0f} s)"
        )
    model.eval()
    return time.perf_counter() - start


def accuracy(module, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        logits = torch.cat([module(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)])
    return float((logits.argmax(1).numpy() == y).mean())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def reader_kind(reason: str) -> str:
    """A refusal's reason in a few words, for the table."""
    if "grouped conv" in reason:
        return "grouped conv"
    if "neither a matrix" in reason or "not a conv the refit knows" in reason:
        return "weight neither a matrix nor a conv's"
    if "no bias" in reason:
        return "no bias to adjust"
    if "shared" in reason:
        return "shared weight"
    return reason.split(":", 1)[-1].strip()[:40]


def bench(epochs: int, log, retrain: bool = False) -> dict:
    import torch

    shapes = patterns(np.random.default_rng(1))
    x_train, y_train = images(TRAIN, 2, shapes)
    x_test, y_test = images(TEST, 3, shapes)
    model = network()
    # The trained weights are kept (keyed by everything that shapes them) so that a rerun for a
    # changed pass prunes the same network; --retrain trains again.
    key = f"c{CLASSES}s{SIZE}p{PATCH}n{NOISE}t{TRAIN}e{epochs}-{params(model)}"
    cached = CACHE / "cnn_refit" / f"net_{key}.pt"
    if cached.exists() and not retrain:
        saved = torch.load(cached)
        model.load_state_dict(saved["state"])
        model.eval()
        seconds = saved["seconds"]
        log(f"loaded the network trained earlier by this benchmark ({cached})")
    else:
        seconds = train(model, x_train, y_train, epochs, log)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "seconds": seconds}, cached)
    result = {
        "train_seconds": seconds,
        "cached": str(cached.relative_to(CACHE.parent.parent)),
        "original": accuracy(model, x_test, y_test),
        "original_train": accuracy(model, x_train[:3000], y_train[:3000]),
        "params": params(model),
        "epochs": epochs,
        "rows": [],
    }
    log(f"original: test accuracy {result['original']:.4f}")
    rng = np.random.default_rng(4)
    picks = rng.choice(TRAIN, CALIBRATION_BATCHES * CALIBRATION_BATCH, replace=False)
    calibration = [
        (torch.from_numpy(x_train[picks[i : i + CALIBRATION_BATCH]]),)
        for i in range(0, len(picks), CALIBRATION_BATCH)
    ]
    example = (torch.from_numpy(x_test[:2]),)
    logger = logging.getLogger("rescompile")
    for ratio in RATIOS:
        for importance in IMPORTANCES:
            for refit in REFITS:
                spec = f"prune:ratio={ratio},importance={importance},refit={refit}"
                start = time.perf_counter()
                records: list[str] = []
                handler = _Collect(records)
                logger.addHandler(handler)
                try:
                    from rescompile.pipeline import compile_model

                    compiled = compile_model(model, [spec], example_inputs=example, calibration=calibration)
                finally:
                    logger.removeHandler(handler)
                pruned = compiled.output
                stats = next(iter(compiled.result.stats.values()), {})
                refused = collections.Counter(reader_kind(r) for r in stats.get("refit_refused", []))
                row = {
                    "spec": spec,
                    "ratio": ratio,
                    "importance": importance,
                    "refit": refit,
                    "accuracy": accuracy(pruned, x_test, y_test),
                    "params": params(pruned) / result["params"],
                    "chosen": stats.get("refit_chosen", {}),
                    "rounds": stats.get("refit_rounds", 0),
                    "refused": dict(refused),
                    "refused_names": stats.get("refit_refused", []),
                    "seconds": time.perf_counter() - start,
                }
                result["rows"].append(row)
                log(
                    f"{spec}: {row['accuracy']:.4f} (params {row['params']:.3f}, refit {row['chosen']}, refused {row['refused']})"
                )
    assert accuracy(model, x_test, y_test) == result["original"], "a pass changed its input"
    return result


class _Collect(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def markdown(r: dict, command: str, load: tuple, took: float) -> str:
    lines = [
        "| prune ratio | importance | refit=none | refit=bias | refit=least_squares | params kept | readers refit (least_squares) | readers refused (least_squares) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {(row["ratio"], row["importance"], row["refit"]): row for row in r["rows"]}
    for ratio in RATIOS:
        for importance in IMPORTANCES:
            cells = [rows[ratio, importance, f] for f in REFITS]
            ls = rows[ratio, importance, "least_squares"]
            chosen = ", ".join(f"{n} {k}" for k, n in sorted(ls["chosen"].items())) or "none"
            chosen += f" ({ls['rounds']} rounds)" if ls["rounds"] else ""
            refused = ", ".join(f"{n} ({k})" for k, n in sorted(ls["refused"].items())) or "none"
            lines.append(
                f"| {ratio} | {importance} | "
                + " | ".join(f"{c['accuracy']:.4f}" for c in cells)
                + f" | {cells[0]['params']:.3f} | {chosen} | {refused} |"
            )
    bias_rows = [row for row in r["rows"] if row["refit"] == "bias"]
    bias_refused = sorted({n for row in bias_rows for n in row["refused_names"]})
    ls_refused = sorted(
        {n for row in r["rows"] if row["refit"] == "least_squares" for n in row["refused_names"]}
    )
    return "\n".join(
        [
            "## Refit after pruning a trained CNN (prune refit=none|bias|least_squares)",
            "",
            f"Command: `{command}` ({took:.0f} s)",
            f"Machine: {machine()}; load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load[0])}, "
            f"at end {', '.join(f'{x:.1f}' for x in load[1])}.",
            "",
            f"Task: {CLASSES} classes, each a fixed random {PATCH}x{PATCH} pattern placed at a random position "
            f"and contrast (1.2-2.0) in {SIZE}x{SIZE} Gaussian noise (sigma {NOISE}), with a weaker pattern of "
            f"another class (contrast 0.3-0.6) as a distractor; {TRAIN} training and {TEST} test images, "
            f"seeded. Network: 3x3 conv 16, 3x3 conv 24 stride 2, bottleneck (3x3 conv 48, 1x1 conv 24) + "
            f"skip, 3x3 conv 48 stride 2, bottleneck (3x3 conv 64, 1x1 conv 48) + skip, 1x1 conv 96, global "
            f"average pool, linear {CLASSES}; BatchNorm after every conv; {r['params']} parameters; trained "
            f"with AdamW + one-cycle, {r['epochs']} epochs, in the benchmark ({r['train_seconds']:.0f} s; the "
            f"weights are kept in {r['cached']} and reused by later runs unless --retrain).",
            "",
            f"Original: test accuracy **{r['original']:.4f}** (train {r['original_train']:.4f}; chance "
            f"{1 / CLASSES:.3f}).",
            "",
            f"Pruned with `rescompile.pipeline.compile_model(model, ['prune:ratio=R,importance=I,refit=F'], "
            f"example_inputs, calibration=batches)`, the default target (conv channels; the residual "
            f"streams stay), {CALIBRATION_BATCHES} calibration batches of {CALIBRATION_BATCH} training "
            f"images. The refit fits every reader of pruned channels (the 3x3 and 1x1 convs by least "
            f"squares on im2col patches, the classifier) to the original model's output of that reader, "
            f"its input from the model pruned, and re-fit, upstream: in rounds, each after the readers "
            f"upstream of it. Test accuracy:",
            "",
            *lines,
            "",
            "Readers the refit refused (least_squares): " + ("; ".join(ls_refused) or "none") + ".",
            "",
            "Readers the refit refused (bias): " + ("; ".join(bias_refused) or "none") + ".",
            "",
            reading(r),
        ]
    )


def reading(r: dict) -> str:
    rows = {(row["ratio"], row["importance"], row["refit"]): row["accuracy"] for row in r["rows"]}
    parts = []
    for ratio in RATIOS:
        for importance in IMPORTANCES:
            base = rows[ratio, importance, "none"]
            parts.append(
                f"{importance} {ratio}: {base:.3f} -> bias {rows[ratio, importance, 'bias']:.3f}, "
                f"least_squares {rows[ratio, importance, 'least_squares']:.3f}"
            )
    return (
        f"Reading: the original reaches {r['original']:.3f}; pruned without refit and with each refit: "
        + "; ".join(parts)
        + "."
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--retrain", action="store_true", help="train again, not reuse the cached network")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    load_start = os.getloadavg()
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    r = bench(args.epochs, log, args.retrain)
    command = "python tools/bench/cnn_refit.py"
    if args.epochs != 5 or args.threads != min(2, os.cpu_count() or 1):
        command += f" --epochs {args.epochs} --threads {args.threads}"
    write_result(
        "cnn_refit", markdown(r, command, (load_start, os.getloadavg()), time.perf_counter() - start)
    )


if __name__ == "__main__":
    main()
