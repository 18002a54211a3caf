"""Pass infrastructure: PassBase, PassResult, PassManager, option specs and site selection.

A pass is a small class with typed options (a dataclass), a `call(graph)` that
rewrites the IR in place and returns `PassResult(graph, modified, stats)`, and a
`preserves_function` property that may depend on its options (rezero with
init=1 preserves the function, with init=0 it does not). Passes see only the IR
and the analysis; they never import a frontend.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from rescompile.analysis.residuals import ResidualAnalysis, ResidualSite, ResidualStream, find_residuals
from rescompile.errors import RescompileError
from rescompile.ir import Graph, IRError, verify
from rescompile.ir._transaction import transaction
from rescompile.ir.shapes import infer_shapes

__all__ = [
    "PassBase",
    "PassResult",
    "PassManager",
    "PassError",
    "SiteSelector",
    "parse_spec",
    "option_table",
    "sites_option",
    "streams_option",
    "select_streams",
]

logger = logging.getLogger("rescompile")


class PassError(RescompileError):
    """A pass refused its input or failed; the message names the pass."""


@dataclasses.dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SiteSelector:
    """Which residual sites a pass applies to.

    Spec syntax (clauses joined with ';', all must hold):
    `all`, `stream:0` or `stream:0|2`, `depth:2-5` (inclusive; `depth:3-` open),
    `name:<glob>` matched against the add node's name, `kind:identity|projection`.
    """

    spec: str = "all"

    def __post_init__(self) -> None:
        self._clauses()  # validate early

    def _clauses(self) -> list[tuple[str, str]]:
        clauses = []
        for part in filter(None, (p.strip() for p in self.spec.split(";"))):
            if part == "all":
                continue
            key, sep, arg = part.partition(":")
            if not sep or key not in ("stream", "depth", "name", "kind"):
                raise RescompileError(
                    f"bad site selector {part!r}: use all, stream:N, depth:A-B, name:GLOB or kind:K"
                )
            if key == "depth":
                lo, dash, hi = arg.partition("-")
                if not lo.strip().isdigit() or (hi.strip() and not hi.strip().isdigit()):
                    raise RescompileError(f"bad depth range {arg!r}: use depth:A-B, e.g. depth:0-3")
                if hi.strip() and int(lo) > int(hi):
                    raise RescompileError(
                        f"depth range {arg!r} is empty (it selects nothing on any model); "
                        "use depth:A-B with A <= B"
                    )
            if key == "stream" and not all(s.strip().isdigit() for s in arg.split("|")):
                raise RescompileError(f"bad stream list {arg!r}: use stream:N or stream:N|M")
            clauses.append((key, arg))
        return clauses

    def __call__(self, site: ResidualSite) -> bool:
        for key, arg in self._clauses():
            if key == "stream" and site.stream not in {int(s) for s in arg.split("|")}:
                return False
            if key == "depth":
                lo, dash, hi = arg.partition("-")
                top = int(hi) if hi.strip() else (int(lo) if not dash else 1 << 62)
                if not int(lo) <= site.depth <= top:
                    return False
            if key == "name" and not fnmatch.fnmatchcase(site.name, arg):
                return False
            if key == "kind" and site.kind not in arg.split("|"):
                return False
        return True

    def select(self, analysis: ResidualAnalysis) -> list[ResidualSite]:
        return [s for s in analysis.sites if self(s)]


def sites_option() -> Any:
    """The `sites` option every site-level pass takes (see SiteSelector)."""
    return dataclasses.field(
        default="all",
        metadata={"help": "which sites: all, stream:N, depth:A-B, name:GLOB, kind:K (join with ';')"},
    )


def streams_option() -> Any:
    """The `streams` option of stream-level passes (hyper, frac, dense)."""
    return dataclasses.field(default="all", metadata={"help": "which streams: all or N|M"})


def select_streams(pass_name: str, analysis: ResidualAnalysis, spec: str) -> list:
    """The streams named by a `streams` option value ("all" or "0|2").

    Raises:
        PassError: for a malformed value, or a value other than "all" that names no stream of the model.
    """
    _check_streams_spec(pass_name, spec)
    if spec == "all":
        return list(analysis.streams)
    wanted = {int(s) for s in spec.split("|")}
    chosen = [s for s in analysis.streams if s.index in wanted]
    if not chosen:
        raise PassError(f"{pass_name}: streams={spec} matches no stream; {_model_has(analysis)}")
    return chosen


def _span(numbers: Sequence[int]) -> str:
    lo, hi = min(numbers), max(numbers)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _model_has(analysis: ResidualAnalysis, spec: str = "") -> str:
    """What the model offers a selector, for the error that says it matched nothing."""
    sites = analysis.sites
    if not sites:
        return "the model has no residual sites"
    text = (
        f"the model has {len(sites)} site{'s' * (len(sites) != 1)} in "
        f"stream{'s' * (len(analysis.streams) != 1)} {_span([s.stream for s in sites])}, "
        f"depths {_span([s.depth for s in sites])}"
    )
    if "kind:" in spec:
        text += f", kinds {'|'.join(sorted({s.kind for s in sites}))}"
    if "name:" in spec:
        text += f", named {sites[0].name!r} ... {sites[-1].name!r}"
    return text


def _check_streams_spec(pass_name: str, spec: str) -> None:
    if spec != "all" and not all(s.strip().isdigit() for s in spec.split("|")):
        raise PassError(f"{pass_name}: streams must be all or N|M, not {spec!r}")


class PassBase:
    """Base class of all passes.

    Subclasses set `name`, `summary`, an `Options` dataclass (every field with a
    default and a `help` metadata entry) and implement `call`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = dataclasses.make_dataclass("Options", [])
    in_place: ClassVar[bool] = True
    required: ClassVar[dict[str, Any]] = {}
    """Options a spec must give (no default fits every model), with an example value for docs."""
    calibration: Any = None
    """Inputs for passes that measure the model (a list of batches, a file, or None for
    random inputs); the PassManager sets it from the pipeline's `calibration`."""
    progress: Any = None
    """Called with a short description of a long pass's current step (the CLI shows it); the
    PassManager sets it from its own `progress`. Passes call `self.report(text)`."""

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except TypeError as exc:
            raise PassError(f"{self.name}: {exc}") from exc
        # Selectors are checked here, so a bad spec fails before a large model is loaded.
        if hasattr(self.options, "sites"):
            try:
                SiteSelector(self.options.sites)
            except RescompileError as exc:
                raise PassError(f"{self.name}: {exc}") from exc
        if hasattr(self.options, "streams"):
            _check_streams_spec(self.name, self.options.streams)
        self.check_options()

    def check_options(self) -> None:
        """Raise PassError for option values out of range (override as needed)."""

    def report(self, text: str) -> None:
        """Say what a long-running pass is doing now (no-op without a progress hook)."""
        if self.progress is not None:
            self.progress(text)

    @property
    def preserves_function(self) -> bool:
        return True

    def call(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def probe(self, graph: Graph):
        """`probe(values, bypass=None)`: per calibration batch, the arrays of `values` computed by
        running `graph` (ONNX Runtime or torch, as the graph came in); see
        `rescompile.frontends.probe`. The batches are drawn (or read) once per call of this method;
        `run.batches` holds them, for a pass that hands them to another."""
        from rescompile.frontends.probe import calibration_batches, probe

        batches = calibration_batches(graph, self.calibration)

        def run(values, bypass=None):
            return probe(graph, batches, values, bypass=bypass)

        run.batches = batches
        return run

    def residuals(self, graph: Graph) -> ResidualAnalysis:
        """The analysis a pass works on, with its `sites` / `streams` option checked against it.

        Every pass that reads residuals comes through here, so a selector that matches nothing
        fails before anything changes instead of silently writing an unchanged model.

        Raises:
            PassError: an explicit selector (not `all`) matches no site or stream of the model.
        """
        analysis = find_residuals(graph)
        spec = getattr(self.options, "sites", "all")
        selector = SiteSelector(spec)
        if selector._clauses() and not selector.select(analysis):
            raise PassError(f"{self.name}: sites={spec} matches no site; {_model_has(analysis, spec)}")
        if hasattr(self.options, "streams"):
            select_streams(self.name, analysis, self.options.streams)
        if not analysis.sites:
            # Not an error under the default selector: a model may simply have no residuals, and a
            # pipeline may run one pass over many models. Say so; the pass then changes nothing.
            logger.warning("%s: the model has no residual sites; nothing to rewrite", self.name)
        return analysis

    def selected_sites(self, graph: Graph) -> list[ResidualSite]:
        """Sites chosen by the `sites` option (all when the pass has no such option)."""
        analysis = self.residuals(graph)
        spec = getattr(self.options, "sites", "all")
        return SiteSelector(spec).select(analysis)

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}:{opts}" if opts else self.name


class PassManager:
    """Run passes in order, each in a transaction; with `check`, verify the IR after each pass.

    A pass that fails (by any exception, or with `check` by leaving an invalid graph) leaves
    the graph exactly as it was before that pass, and the manager raises a one-line PassError
    naming the pass, the passes that ran before it, the site where known and the reason.
    """

    def __init__(
        self,
        passes: Sequence[PassBase],
        *,
        check: bool = True,
        calibration: Any = None,
        progress: Any = None,
    ) -> None:
        self.passes = list(passes)
        self.check = check
        self.calibration = calibration
        self.progress = progress
        self.timings: dict[str, float] = {}

    @property
    def preserves_function(self) -> bool:
        return all(p.preserves_function for p in self.passes)

    def __call__(self, graph: Graph) -> PassResult:
        modified, stats = False, {}
        done: list[str] = []
        for i, pass_ in enumerate(self.passes):
            start = time.perf_counter()
            if self.progress is not None:
                head = f"pass {i + 1}/{len(self.passes)}: {pass_.name}"
                self.progress(head)
                pass_.progress = lambda text, head=head: self.progress(f"{head}: {text}")
            if self.calibration is not None:
                pass_.calibration = self.calibration
            try:
                with transaction(graph):
                    before = set(graph)
                    result = pass_.call(graph)
                    if pass_.in_place and result.graph is not graph:
                        raise PassError("claims to be in place but returned a new graph")
                    _infer_new_shapes(result.graph, before)
                    if self.check:
                        try:
                            verify(result.graph)
                        except IRError as exc:
                            raise PassError(f"left an invalid graph: {exc}") from exc
            except Exception as exc:
                raise PassError(_failure_message(pass_, done, exc)) from exc
            graph = result.graph
            key = f"{i}:{pass_.name}"
            self.timings[key] = time.perf_counter() - start
            stats[key] = result.stats
            modified = modified or result.modified
            logger.info("%s: modified=%s %s", pass_.name, result.modified, result.stats)
            done.append(pass_.name)
        return PassResult(graph, modified, stats)


def _infer_new_shapes(graph: Graph, before: set) -> None:
    """Shapes and dtypes of the nodes a pass created, from the op table. Where the pass also set
    one by hand and the two disagree, the pass built something other than it meant: fail."""
    created = [node for node in graph if node not in before]
    if not created:
        return
    report = infer_shapes(graph, only=created)
    if report.conflicts:
        c = report.conflicts[0]
        raise PassError(f"{c.node} makes {c.value} with {c.what} {c.existing}, but its op gives {c.inferred}")


def _failure_message(pass_: PassBase, done: list[str], exc: Exception) -> str:
    """One line: `pass NAME (after ...): site SITE: reason`, the exception type named for
    anything but a rescompile error (an IR rule broken, a bug, a numpy error)."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else ""
    prefix = f"{pass_.name}: "
    while reason.startswith(prefix):  # passes name themselves; say it once
        reason = reason[len(prefix) :]
    if not isinstance(exc, RescompileError):
        reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    where = _failing_site(exc)
    if where and where[1] not in reason:
        reason = f"{where[0]}: {reason}"
    after = f" (after {', '.join(done)})" if done else ""
    return f"pass {pass_.name}{after}: {reason}"


def _failing_site(exc: BaseException) -> tuple[str, str] | None:
    """The residual site (or stream) the pass was working on when it raised, if known, as
    ("site NAME", what a message naming it contains).

    Read from the innermost traceback frame with a local `site` (or `stream`), the names
    passes and their helpers use, so they need not thread the site into every message
    they or the IR raise.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        site, stream = frame.f_locals.get("site"), frame.f_locals.get("stream")
        if isinstance(site, ResidualSite):
            return f"site {site.name}", site.name
        if isinstance(stream, ResidualStream):
            return (f"stream {stream.index}",) * 2
    return None


# ----- option specs --------------------------------------------------------------------
_OPTION_TYPES = {"bool": bool, "int": int, "float": float, "str": str}  # option annotations as strings
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(pass_name: str, field: dataclasses.Field, text: str) -> Any:
    hint = _OPTION_TYPES.get(field.type, field.type) if isinstance(field.type, str) else field.type
    choices = field.metadata.get("choices")
    try:
        if hint is bool:
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            value: Any = low in _TRUE
        elif hint is int:
            value = int(text)
        elif hint is float:
            value = float(text)
        else:
            value = text
    except ValueError as exc:
        raise PassError(f"{pass_name}: bad value {text!r} for {field.name} ({exc})") from exc
    if choices and value not in choices:
        raise PassError(
            f"{pass_name}: {field.name} must be one of {', '.join(map(str, choices))}, not {text!r}"
        )
    return value


def parse_spec(spec: str, table: Mapping[str, type[PassBase]]) -> PassBase:
    """Build a pass from `name` or `name:key=value,key=value`.

    Raises:
        PassError: unknown pass, unknown option or bad value (one line, lists what is valid).
    """
    name, _, rest = spec.strip().partition(":")
    if name not in table:
        raise PassError(
            f"unknown pass {name!r}; available: {', '.join(sorted(table))} (see `rescompile passes`)"
        )
    cls = table[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq:
            raise PassError(f"{name}: option {item!r} needs a value, as in {item}=...")
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PassError(f"{name}: unknown option {key!r}; valid options: {valid}")
        options[key] = _convert(name, fields[key], text)
    return cls(**options)


def option_table(cls: type[PassBase]) -> list[dict[str, Any]]:
    """Options of a pass as rows: name, type, default, help."""
    rows = []
    for f in dataclasses.fields(cls.Options):
        hint = f.type if isinstance(f.type, str) else f.type.__name__
        rows.append(
            {
                "name": f.name,
                "type": hint,
                "default": f.default,
                "choices": f.metadata.get("choices"),
                "help": f.metadata.get("help", ""),
            }
        )
    return rows
