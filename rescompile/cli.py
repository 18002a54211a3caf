"""The `rescompile` command line: inspect | apply | validate | passes | demo.

Every failure the user can cause prints one line, `rescompile: error: ...`, and
exits 2 (`--debug` shows the traceback). `validate` exits 1 when the models
differ beyond tolerance. Work on ONNX files never imports torch.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from pathlib import Path

import click

from rescompile.console import (
    group_table,
    importance_table,
    make_console,
    print_pass_stats,
    print_validation,
    site_table,
    stage_progress,
    summary,
)
from rescompile.errors import RescompileError
from rescompile.validation import DEFAULT_ATOL, DEFAULT_RTOL

__all__ = ["main", "cli"]


def _parse_dims(dims: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for item in dims:
        name, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise RescompileError(f"bad --dim {item!r}: use NAME=INT, e.g. --dim batch=2")
        out[name.strip()] = int(value)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and verify the IR after every pass.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.version_option(package_name="rescompile")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """rescompile: find and rewrite the residual connections of neural networks."""
    ctx.obj = {"debug": debug}
    if verbose or debug:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


def _torch_options(fn):
    fn = click.option(
        "--dynamic-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Bound on the dynamic-shape capture of a pickled module before falling back "
        "to static shapes (default 20).",
    )(fn)
    fn = click.option(
        "--dynamic/--static",
        "dynamic",
        default=None,
        help="Capture a pickled module with dynamic dims (waits however long torch.export "
        "takes) or with the example's static shapes; default: try dynamic within "
        "--dynamic-timeout, then static with a warning.",
    )(fn)
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a pickled module from .pt/.pth (unpickling runs code).",
    )(fn)
    fn = click.option(
        "--example-inputs",
        "example_file",
        type=click.Path(path_type=Path),
        help="A torch.save'd tuple or dict of example inputs (for .pt/.pth modules).",
    )(fn)
    return fn


def _tolerance_options(fn):
    fn = click.option(
        "--rtol",
        default=DEFAULT_RTOL,
        show_default=True,
        type=float,
        help="Relative tolerance: allowed += rtol * |original|.",
    )(fn)
    fn = click.option(
        "--atol",
        default=DEFAULT_ATOL,
        show_default=True,
        type=float,
        help="Absolute tolerance, times max(1, max|original|) of each output.",
    )(fn)
    return fn


def _capture(dynamic: bool | None, timeout: float | None) -> dict:
    """--dynamic/--static and --dynamic-timeout as load() arguments (absent: the frontend's default)."""
    out = {}
    if dynamic is not None:
        out["dynamic"] = dynamic
    if timeout is not None:
        if timeout <= 0:
            raise RescompileError(f"--dynamic-timeout must be > 0 seconds, not {timeout:g}")
        out["dynamic_timeout"] = timeout
    return out


def _load_examples(path: Path | None):
    if path is None:
        return None
    if not path.exists():
        raise RescompileError(f"--example-inputs {path}: no such file")
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RescompileError(
            f"--example-inputs {path}: not a torch.save'd tuple or dict of tensors ({type(exc).__name__})"
        ) from exc


def _calibration_option(fn):
    return click.option(
        "--calibration",
        type=click.Path(path_type=Path),
        default=None,
        metavar="FILE",
        help="Inputs for measured choices (drop, --importance): a torch.save'd list of batches "
        "(tuples or dicts of tensors) or an .npz of arrays named after the model's inputs; "
        "default: random inputs (with a warning).",
    )(fn)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@click.option(
    "--importance",
    type=click.Choice(["bi", "angular", "greedy", "norm"]),
    default=None,
    help="Also score every depth unit with this drop metric (lower: removing it changes less).",
)
@click.option(
    "--unit",
    type=click.Choice(["block", "branch"]),
    default="block",
    show_default=True,
    help="For --importance.",
)
@click.option("--groups", is_flag=True, help="Also list the channel groups prune works on.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display on stderr.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a self-contained HTML picture of the streams and sites to this file.",
)
@click.option(
    "--svg", "svg_path", type=click.Path(path_type=Path), default=None, help="Also write the lanes as an SVG."
)
@_calibration_option
@_torch_options
def inspect(
    model: Path,
    as_json: bool,
    importance: str | None,
    groups: bool,
    quiet: bool,
    html_path: Path | None,
    svg_path: Path | None,
    unit: str,
    calibration: Path | None,
    trust_pickle: bool,
    example_file: Path | None,
    dynamic: bool | None,
    dynamic_timeout: float | None,
) -> None:
    """Show where MODEL's residual connections are (.onnx, .pt2, a Hugging Face folder, or .pt/.pth
    with --trust-pickle)."""
    from rescompile.api import inspect as inspect_model

    with stage_progress(enabled=not quiet) as step:
        step("loading and analysing the model")
        report = inspect_model(
            model,
            _load_examples(example_file),
            trust_pickle=trust_pickle,
            importance=importance,
            unit=unit,
            calibration=calibration,
            groups=groups,
            **_capture(dynamic, dynamic_timeout),
        )
    written = _write_pictures(report, model.name, html_path, svg_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    console = make_console()
    console.print(site_table(report, f"{model}"))
    for stream in report.streams:
        console.print(
            f"stream {stream.index}: {len(stream.sites)} sites, {stream.norm}-norm, "
            f"{stream.input.name} -> {stream.output.name}"
        )
    console.print(summary(report))
    if report.groups is not None:
        prunable = sum(g.prunable for g in report.groups.groups)
        console.print(
            group_table(report, f"channel groups: {prunable} of {len(report.groups.groups)} prunable")
        )
    if report.importance is not None:
        console.print(
            importance_table(
                report, f"{importance} importance of each {unit} (lower: removing it changes less)"
            )
        )
    opaque = report.analysis.opaque
    if opaque:
        names = ", ".join(f"{n.name} ({n.op_type})" for n in opaque[:5]) + (" ..." if len(opaque) > 5 else "")
        console.print(
            f"{len(opaque)} ops without an entry in the op table stopped the search (opaque, "
            f"not guessed through): {names}"
        )
    for path in written:
        console.print(f"wrote {path}")


def _write_pictures(report, title: str, html_path: Path | None, svg_path: Path | None) -> list[Path]:
    from rescompile.report import write_html, write_svg

    if html_path is not None:
        write_html(report, html_path, title)
    if svg_path is not None:
        write_svg(report, svg_path, title)
    return [p for p in (html_path, svg_path) if p is not None]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-p",
    "--pass",
    "specs",
    multiple=True,
    required=True,
    help="A pass as NAME or NAME:key=value,...; repeat to run several in order.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result."
)
@click.option(
    "--validate",
    "do_validate",
    is_flag=True,
    help="Compare the result with MODEL in ONNX Runtime (function-preserving passes only).",
)
@_tolerance_options
@click.option(
    "--dim", "dims", multiple=True, help="NAME=VALUE for a dynamic input dimension (for --validate)."
)
@click.option("--no-check", is_flag=True, help="Skip onnx.checker on the output.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON summary: passes, params and MACs, seconds."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display on stderr.")
@_calibration_option
@_torch_options
@click.pass_context
def apply(
    ctx,
    model: Path,
    specs,
    output: Path,
    do_validate: bool,
    atol: float,
    rtol: float,
    dims,
    no_check: bool,
    as_json: bool,
    quiet: bool,
    calibration: Path | None,
    trust_pickle: bool,
    example_file: Path | None,
    dynamic: bool | None,
    dynamic_timeout: float | None,
) -> None:
    """Rewrite MODEL with passes and write the result to OUTPUT.

    ONNX models give ONNX; torch programs (.pt2, or .pt/.pth with --trust-pickle)
    give .pt2 or .onnx, chosen by OUTPUT's suffix; a Hugging Face folder also gives a
    folder (OUTPUT without a suffix) when the result is still its model class."""
    from rescompile.pipeline import PICKLE_SUFFIXES, PT2_SUFFIX, compile_model
    from rescompile.validation import Tolerance

    if _same_file(model, output) or _same_file(Path(str(model) + ".data"), Path(str(output) + ".data")):
        raise RescompileError(f"-o {output} would overwrite the input; choose another output path")
    from rescompile.frontends.hf_folder import is_folder_output, is_hf_folder

    folder_input = is_hf_folder(model)
    torch_input = folder_input or model.suffix in (PT2_SUFFIX, *PICKLE_SUFFIXES)
    allowed = (".pt2", ".onnx") if torch_input else (".onnx",)
    if output.suffix not in allowed and not (folder_input and is_folder_output(output)):
        also = " or be a folder" if folder_input else ""
        raise RescompileError(f"-o {output}: the output must end in {' or '.join(allowed)}{also}")
    with stage_progress(enabled=not quiet) as step:
        compiled = compile_model(
            model,
            specs,
            example_inputs=_load_examples(example_file),
            trust_pickle=trust_pickle,
            **_capture(dynamic, dynamic_timeout),
            output=output,
            check=not no_check,
            verify_each_pass=ctx.obj["debug"],
            validate=do_validate,
            tolerance=Tolerance(atol, rtol),
            dims=_parse_dims(dims),
            calibration=calibration,
            require_sites=True,
            progress=step,
        )
    if as_json:
        click.echo(json.dumps(compiled.to_json(), indent=2))
        if compiled.validation is not None and not compiled.validation.ok:
            sys.exit(1)
        return
    console = make_console()
    print_pass_stats(console, compiled)
    t = compiled.timings
    console.print(
        f"wrote {output} ({len(compiled.graph):,} nodes) in {t['load'] + t['passes'] + t['export']:.2f}s "
        f"(load {t['load']:.2f}s, passes {t['passes']:.2f}s, save+check {t['export']:.2f}s)"
    )
    if do_validate:
        if compiled.validation is None:
            changed = ", ".join(p.name for p in compiled.passes if not p.preserves_function)
            console.print(f"validate: skipped, {changed} changes the function by design")
            return
        print_validation(console, compiled.validation)
        if not compiled.validation.ok:
            sys.exit(1)


@cli.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("rewritten", type=click.Path(path_type=Path))
@_tolerance_options
@click.option("--dim", "dims", multiple=True, help="NAME=VALUE for a dynamic input dimension.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def validate(
    original: Path, rewritten: Path, atol: float, rtol: float, dims, seed: int, as_json: bool
) -> None:
    """Run ORIGINAL and REWRITTEN in ONNX Runtime on the same random inputs (Hugging Face
    folders or .pt2 in torch, on the first folder's example inputs); exit 0 when every
    output is within tolerance, 1 otherwise."""
    from rescompile.api import validate as validate_models

    res = validate_models(original, rewritten, atol=atol, rtol=rtol, dims=_parse_dims(dims), seed=seed)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
    else:
        print_validation(make_console(), res)
    sys.exit(0 if res.ok else 1)


@cli.command(name="passes")
@click.option(
    "--markdown",
    "markdown_path",
    is_flag=False,
    flag_value="docs/passes.md",
    default=None,
    type=click.Path(path_type=Path),
    help="Write the passes' reference as Markdown to this file (alone: docs/passes.md).",
)
def list_passes(markdown_path: Path | None) -> None:
    """List every registered pass with its options."""
    from rich.table import Table

    from rescompile.infra import option_table
    from rescompile.passes import PASSES

    if markdown_path is not None:
        from rescompile.report import write_text
        from rescompile.report.markdown import passes_markdown

        write_text(markdown_path, passes_markdown(PASSES))
        click.echo(f"wrote {markdown_path}")
        return

    table = Table(title_justify="left", show_lines=True)
    for col in ("pass", "preserves function", "what it does", "options (default)"):
        table.add_column(col)
    for name, cls in PASSES.items():
        preserves = "yes" if cls(**cls.required).preserves_function else "no"
        opts = "\n".join(f"{o['name']}={o['default']}  {o['help']}" for o in option_table(cls)) or "-"
        table.add_row(name, preserves + " (with defaults)", cls.summary, opts)
    make_console().print(table)


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("rescompile-demo"),
    show_default=True,
    help="Folder for the demo's model files.",
)
def demo(out_dir: Path) -> None:
    """Build a small transformer, export it, inspect it, rewrite it and validate it."""
    from rescompile.demo import run_demo

    run_demo(out_dir, make_console())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    # A command is a short-lived process whose graph lives until it exits: the cyclic
    # collector would only re-scan it (see rescompile._gc).
    gc.disable()
    try:
        cli.main(args=argv, prog_name="rescompile", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("rescompile: aborted", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"rescompile: error: {exc.format_message()} (see rescompile --help)", err=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    except RescompileError as exc:
        if debug:
            raise
        click.echo(f"rescompile: error: {exc}", err=True)
        return 2
    except Exception as exc:  # a bug or an input we did not anticipate: still one line
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(
            f"rescompile: error: {type(exc).__name__}: {message[:300]} (rerun with --debug for details)",
            err=True,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
