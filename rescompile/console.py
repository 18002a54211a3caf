"""Console output shared by the CLI and the demo: site tables, summaries, validation tables.

rich is imported lazily: `rescompile --help` and JSON output do not pay for it.
"""

from __future__ import annotations

import contextlib

__all__ = ["make_console", "site_table", "summary", "print_validation", "print_pass_stats"]


@contextlib.contextmanager
def stage_progress(enabled: bool = True):
    """Yield `step(description)`: a spinner on stderr naming the current stage, with the time
    spent, for work that can take a while (loading, capture, each pass, calibration, export).
    Shown only when stderr is a terminal; it leaves no trace in pipes, logs or `--json`."""
    import sys

    if not enabled or not sys.stderr.isatty():
        yield lambda description: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def step(description: str) -> None:
            progress.update(task, description=description)

        yield step


def make_console():
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = 160  # logs and pipes: do not squeeze tables to 80 columns
    return console


def site_table(report, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("site", "kind", "stream", "depth", "norm", "branch params", "skip", "branch"):
        table.add_column(col, justify="right" if col in ("stream", "depth", "branch params") else "left")
    for s in report.residuals:
        table.add_row(
            s.name,
            s.kind,
            str(s.stream),
            str(s.depth),
            s.norm,
            f"{s.branch_params:,}",
            s.skip.name,
            s.branch.name,
        )
    return table


def summary(report) -> str:
    kinds = [s.kind for s in report.residuals]
    return (
        f"{len(kinds)} residual sites ({kinds.count('identity')} identity, "
        f"{kinds.count('projection')} projection) in {len(report.streams)} streams; "
        f"{report.nodes:,} nodes, {report.params:,} parameters"
    )


def print_validation(console, res, *, expect_same: bool = True) -> None:
    """Print per-output differences and one verdict line.

    With `expect_same=False` (a pass that changes the function by design), differing
    outputs are the expected result and are not shown as a failure."""
    from rich.table import Table

    table = Table(title_justify="left")
    for col in (
        "output",
        "shape",
        "max abs diff",
        "diff / max|original|",
        "diff / tolerance",
        "worst element",
        "ok" if expect_same else "differs",
    ):
        table.add_column(col)
    for o in res.outputs:
        worst = (
            "-"
            if o.worst is None or o.max_abs == 0
            else f"{list(o.worst[0])}: {o.worst[1]:.6g} -> {o.worst[2]:.6g}"
        )
        if expect_same:
            verdict = "yes" if o.ok else "[red]NO[/red]"
        else:
            verdict = "yes, as expected" if not o.ok else "no"
        table.add_row(
            o.name,
            "x".join(map(str, o.shape)),
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.ratio:.3g}",
            worst,
            verdict,
        )
    console.print(table)
    dims = f" (dims {res.dims})" if res.dims else ""
    if expect_same:
        verdict = "within" if res.ok else "NOT within"
        console.print(f"validate: outputs {verdict} tolerance {res.tolerance}{dims}")
    else:
        verdict = (
            "differ from the original, as expected"
            if not res.ok
            else "still equal the original, though the passes change the function"
        )
        console.print(f"validate: outputs {verdict}{dims}")


def _short(value) -> str:
    """Per-unit tables (drop's scores) are for `inspect --importance`; here only their size."""
    return f"<{len(value)} entries>" if isinstance(value, dict) else str(value)


def importance_table(report, title: str):
    """Each depth unit's score, lowest (most removable) marked by rank."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("rank", "unit", "stream", "index", "sites", "params", f"{report.metric} score"):
        table.add_column(col, justify="left" if col in ("unit", "sites") else "right")
    ranks = {id(s): r for r, s in enumerate(sorted(report.importance, key=lambda s: s.score), 1)}
    for s in report.importance:
        u = s.unit
        table.add_row(
            str(ranks[id(s)]),
            u.name,
            str(u.stream),
            str(u.index),
            ", ".join(site.name for site in u.sites),
            f"{u.params:,}",
            f"{s.score:.6g}",
        )
    return table


def group_table(report, title: str):
    """The channel groups prune works on: prunable ones first, then why the others are not."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("group", "kind", "size", "unit", "params", "prunable", "why not"):
        table.add_column(col, justify="right" if col in ("size", "params") else "left")
    rows = sorted(report.groups.rows(), key=lambda r: not r["prunable"])
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            str(r["size"]),
            r["unit"],
            f"{r['params']:,}",
            "yes" if r["prunable"] else "no",
            r["reason"] or "",
        )
    return table


def print_pass_stats(console, compiled) -> None:
    """One line per pass: what it changed and how long it took."""
    for key, stats in compiled.result.stats.items():
        name = key.split(":", 1)[1]
        detail = ", ".join(f"{k}={_short(v)}" for k, v in stats.items()) or "no change"
        console.print(f"{name}: {detail} ({compiled.pass_timings[key]:.2f}s)")
