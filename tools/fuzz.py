"""`make fuzz`: the property-based fuzzer of tests/test_fuzz.py with a large budget, and a table.

Runs the fuzz tests (the `inspect` test and one test per validated pass) in worker processes,
each with its share of the budget (tests/test_fuzz.py splits RESCOMPILE_FUZZ_EXAMPLES), under the
random hypothesis profile, then prints: runs, refusals and function checks per test, and failures
by pass and property, followed by each failure's shrunk example. Exits 1 if anything failed.

    python tools/fuzz.py --examples 10000 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _leaves(exc: BaseException):
    if isinstance(getattr(exc, "exceptions", None), (list, tuple)):  # an exception group
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _worker(key: str, examples: int, profile: str) -> tuple[str, dict, list[tuple[str, str, str]], float]:
    """Run one fuzz test; returns (key, counters, [(property, message, report)], seconds)."""
    os.environ["RESCOMPILE_FUZZ_EXAMPLES"] = str(examples)
    os.environ["RESCOMPILE_FUZZ_PROFILE"] = profile
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import logging

    import test_fuzz
    from hypothesis.reporting import with_reporter

    logging.getLogger("rescompile").setLevel(logging.ERROR)  # "no residual sites" warnings
    lines: list[str] = []
    failures = []
    start = time.perf_counter()
    try:
        with with_reporter(lambda text: lines.append(str(text))):
            if key == "detect":
                test_fuzz.test_inspect_finds_the_generated_sites()
            else:
                test_fuzz.test_pass_properties(name=key)
    except BaseException as exc:  # noqa: B036 - report everything, including hypothesis's groups
        for leaf in _leaves(exc):
            prop = getattr(leaf, "prop", "") or f"crash:{type(leaf).__name__}"
            notes = getattr(leaf, "__notes__", [])  # hypothesis puts the falsifying example here
            report = "\n".join([*lines, *map(str, notes)])
            failures.append((prop, str(leaf).splitlines()[0][:300] if str(leaf) else "", report))
    return key, dict(test_fuzz.STATS[key]), failures, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples", type=int, default=int(os.environ.get("RESCOMPILE_FUZZ_EXAMPLES", 10000))
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reasons", action="store_true", help="list why passes refused, by pass")
    parser.add_argument("--passes", default="", help="comma-separated subset (default: every validated pass)")
    parser.add_argument(
        "--profile", default="rescompile-fuzz", help="hypothesis profile (rescompile-ci: fixed)"
    )
    args = parser.parse_args(argv)

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_fuzz import KNOWN_PASSES, share

    from rescompile.passes import PASSES

    skipped = sorted(set(PASSES) - set(KNOWN_PASSES))
    keys = ["detect"] + [p for p in sorted(PASSES) if p in KNOWN_PASSES]
    everything = keys
    if args.passes:
        keys = [k for k in keys if k in args.passes.split(",")]
        if not keys:
            parser.error(f"--passes {args.passes}: no such fuzz test (tests: {', '.join(everything)})")

    # test_fuzz gives each test its share of RESCOMPILE_FUZZ_EXAMPLES over every test; a subset
    # gets the whole budget: the variable is scaled up by the shares left out.
    budget = round(args.examples * sum(map(share, everything)) / sum(map(share, keys)))
    start = time.perf_counter()
    results = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, key, budget, args.profile) for key in keys]
        for future in concurrent.futures.as_completed(futures):
            key, stats, failures, seconds = future.result()
            print(
                f"  {key}: {stats.get('runs', 0)} runs, {len(failures)} failures, {seconds:.0f} s", flush=True
            )
            results.append((key, stats, failures, seconds))
    results.sort(key=lambda r: keys.index(r[0]))

    props = sorted({p for _, _, failures, _ in results for p, _, _ in failures})
    seconds = time.perf_counter() - start
    print(f"\nfuzz: {args.examples} examples ({args.profile}), {args.jobs} jobs, {seconds:.0f} s")
    head = ["test", "runs", "refused", "fn checked", "known", "failures"] + props
    rows = []
    for key, stats, failures, _ in results:
        by_prop = Counter(p for p, _, _ in failures)
        rows.append(
            [
                key,
                stats.get("runs", 0),
                stats.get("refused", "-"),
                stats.get("preserving", "-"),
                stats.get("known", 0),
                len(failures),
            ]
            + [by_prop.get(p, 0) for p in props]
        )
    rows.append(["total"] + [sum(r[i] for r in rows if isinstance(r[i], int)) for i in range(1, len(head))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, ["-" * w for w in widths], *rows]:
        print(
            "  ".join(
                str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))
            )
        )
    print(
        "runs count every call of a test, shrinking included; refused: a pass refused the model; "
        "known: a failure of a defect with a strict-xfail regression test (test_fuzz.KNOWN_DEFECTS)"
    )
    for excuse in ("eps-zero NaN", "ill-conditioned"):  # rejected or accepted, never failures
        counts = {key: stats[excuse] for key, stats, _, _ in results if stats.get(excuse)}
        if counts:
            print(f"{excuse}: " + ", ".join(f"{key} {n}" for key, n in counts.items()))
    if skipped:
        print(f"not fuzzed (not in tests/test_fuzz.py KNOWN_PASSES): {', '.join(skipped)}")
    if args.reasons:
        for key, stats, _, _ in results:
            for why, count in sorted(stats.items()):
                if why.startswith("why: "):
                    print(f"  {key:10} {count:5}  {why[5:]}")
    failed = [(key, f) for key, _, failures, _ in results for f in failures]
    for key, (prop, message, report) in failed:
        print(f"\n=== {key}: {message if message.startswith('[') else f'[{prop}] {message}'}\n{report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
