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
import time
from pathlib import Path

import click

from rescompile.errors import RescompileError

__all__ = ["main", "cli"]


def _console():
    from rich.console import Console
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = 160  # logs and pipes: do not squeeze tables to 80 columns
    return console


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


def _site_table(report, title: str):
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for col in ("site", "kind", "stream", "depth", "norm", "branch params", "skip", "branch"):
        table.add_column(col, justify="right" if col in ("stream", "depth", "branch params") else "left")
    for s in report.residuals:
        table.add_row(s.name, s.kind, str(s.stream), str(s.depth), s.norm, f"{s.branch_params:,}",
                      s.skip.name, s.branch.name)
    return table


def _summary(report) -> str:
    kinds = [s.kind for s in report.residuals]
    return (f"{len(kinds)} residual sites ({kinds.count('identity')} identity, "
            f"{kinds.count('projection')} projection) in {len(report.streams)} streams; "
            f"{report.nodes:,} nodes, {report.params:,} parameters")


def _torch_options(fn):
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow loading a pickled module from .pt/.pth (unpickling runs code).")(fn)
    fn = click.option("--example-inputs", "example_file", type=click.Path(path_type=Path),
                      help="A torch.save'd tuple or dict of example inputs (for .pt/.pth modules).")(fn)
    return fn


def _load_examples(path: Path | None):
    if path is None:
        return None
    if not path.exists():
        raise RescompileError(f"--example-inputs {path}: no such file")
    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RescompileError(f"--example-inputs {path}: not a torch.save'd tuple or dict of tensors "
                              f"({type(exc).__name__})") from exc


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@_torch_options
def inspect(model: Path, as_json: bool, trust_pickle: bool, example_file: Path | None) -> None:
    """Show where MODEL's residual connections are (.onnx, .pt2, or .pt/.pth with --trust-pickle)."""
    from rescompile.api import inspect as inspect_model
    report = inspect_model(model, _load_examples(example_file), trust_pickle=trust_pickle)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    console = _console()
    console.print(_site_table(report, f"{model}"))
    for stream in report.streams:
        console.print(f"stream {stream.index}: {len(stream.sites)} sites, {stream.norm}-norm, "
                      f"{stream.input.name} -> {stream.output.name}")
    console.print(_summary(report))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def _check_onnx(path: Path) -> None:
    import onnx
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError and C++ errors
        raise RescompileError(f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}") from exc


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--pass", "specs", multiple=True, required=True,
              help="A pass as NAME or NAME:key=value,...; repeat to run several in order.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
@click.option("--validate", "do_validate", is_flag=True,
              help="Compare the result with MODEL in ONNX Runtime (function-preserving passes only).")
@click.option("--atol", default=1e-5, show_default=True, help="Tolerance for --validate.")
@click.option("--dim", "dims", multiple=True, help="NAME=VALUE for a dynamic input dimension (for --validate).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker on the output.")
@_torch_options
@click.pass_context
def apply(ctx, model: Path, specs, output: Path, do_validate: bool, atol: float, dims, no_check: bool,
          trust_pickle: bool, example_file: Path | None) -> None:
    """Rewrite MODEL with passes and write the result to OUTPUT.

    ONNX models give ONNX; torch programs (.pt2, or .pt/.pth with --trust-pickle)
    give .pt2 or .onnx, chosen by OUTPUT's suffix."""
    from rescompile.api import PICKLE_SUFFIXES, PT2_SUFFIX, build_passes, load
    from rescompile.frontends import is_torch_graph
    from rescompile.infra import PassManager
    if _same_file(model, output) or _same_file(Path(str(model) + ".data"), Path(str(output) + ".data")):
        raise RescompileError(f"-o {output} would overwrite the input; choose another output path")
    torch_input = model.suffix in (PT2_SUFFIX, *PICKLE_SUFFIXES)
    allowed = (".pt2", ".onnx") if torch_input else (".onnx",)
    if output.suffix not in allowed:
        raise RescompileError(f"-o {output}: the output must end in {' or '.join(allowed)}")
    passes = build_passes(specs)  # fail on a bad spec before loading a large model
    dim_values = _parse_dims(dims)
    examples = _load_examples(example_file)
    console = _console()
    t0 = time.perf_counter()
    graph = load(model, examples, trust_pickle=trust_pickle)
    t1 = time.perf_counter()
    manager = PassManager(passes, check=ctx.obj["debug"])
    result = manager(graph)
    t2 = time.perf_counter()
    from rescompile.ir import verify
    verify(graph)
    if is_torch_graph(graph):
        from rescompile.frontends.torch import save_program
        save_program(graph, output)
    else:
        from rescompile.frontends.onnx import save_onnx
        save_onnx(graph, output, check=None if no_check else _check_onnx)
    t3 = time.perf_counter()
    for key, stats in result.stats.items():
        name = key.split(":", 1)[1]
        detail = ", ".join(f"{k}={v}" for k, v in stats.items()) or "no change"
        console.print(f"{name}: {detail} ({manager.timings[key]:.2f}s)")
    console.print(f"wrote {output} ({len(graph):,} nodes) in {t3 - t0:.2f}s "
                  f"(load {t1 - t0:.2f}s, passes {t2 - t1:.2f}s, save+check {t3 - t2:.2f}s)")
    if do_validate:
        if not manager.preserves_function:
            changed = ", ".join(p.name for p in passes if not p.preserves_function)
            console.print(f"validate: skipped, {changed} changes the function by design")
            return
        if is_torch_graph(graph):
            from rescompile.frontends.torch import compare_modules, example_inputs_of, export_module
            reference = export_module(load(model, examples, trust_pickle=trust_pickle))
            args, kwargs = example_inputs_of(graph)
            res = compare_modules(reference, export_module(graph), args, kwargs=kwargs, atol=atol)
        else:
            from rescompile.validation import compare_onnx
            res = compare_onnx(model, output, atol=atol, dims=dim_values)
        _print_validation(console, res)
        if not res.ok:
            sys.exit(1)


def _print_validation(console, res) -> None:
    from rich.table import Table
    table = Table(title_justify="left")
    for col in ("output", "shape", "max abs diff", "max rel diff", "ok"):
        table.add_column(col)
    for o in res.outputs:
        table.add_row(o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                      "yes" if o.ok else "NO")
    console.print(table)
    verdict = "within" if res.ok else "NOT within"
    console.print(f"validate: outputs {verdict} atol={res.atol:g}" +
                  (f" (dims {res.dims})" if res.dims else ""))


@cli.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("rewritten", type=click.Path(path_type=Path))
@click.option("--atol", default=1e-5, show_default=True)
@click.option("--rtol", default=0.0, show_default=True)
@click.option("--dim", "dims", multiple=True, help="NAME=VALUE for a dynamic input dimension.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def validate(original: Path, rewritten: Path, atol: float, rtol: float, dims, seed: int, as_json: bool) -> None:
    """Run ORIGINAL and REWRITTEN in ONNX Runtime on the same random inputs;
    exit 0 when every output is within tolerance, 1 otherwise."""
    from rescompile.api import validate as validate_models
    res = validate_models(original, rewritten, atol=atol, rtol=rtol, dims=_parse_dims(dims), seed=seed)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
    else:
        _print_validation(_console(), res)
    sys.exit(0 if res.ok else 1)


@cli.command(name="passes")
def list_passes() -> None:
    """List every registered pass with its options."""
    from rich.table import Table

    from rescompile.infra import option_table
    from rescompile.passes import PASSES
    table = Table(title_justify="left", show_lines=True)
    for col in ("pass", "preserves function", "what it does", "options (default)"):
        table.add_column(col)
    for name, cls in PASSES.items():
        preserves = "yes" if cls().preserves_function else "no"
        opts = "\n".join(f"{o['name']}={o['default']}  {o['help']}" for o in option_table(cls)) or "-"
        table.add_row(name, preserves + " (with defaults)", cls.summary, opts)
    _console().print(table)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("rescompile-demo"),
              show_default=True, help="Folder for the demo's model files.")
def demo(out_dir: Path) -> None:
    """Build a small transformer, export it, inspect it, rewrite it and validate it."""
    from rescompile.demo import run_demo
    run_demo(out_dir, _console())


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
        click.echo(f"rescompile: error: {type(exc).__name__}: {message[:300]} (rerun with --debug for details)",
                   err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
