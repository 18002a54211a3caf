"""The catalogue of bad inputs (issue 15, part 2): each kind runs the real command line.

Every case must print exactly one line, `rescompile: error: ...`, naming the problem, exit 2
without a traceback, leave every input file byte-identical (external data included), and
leave the output folder as it was: no partial output, no temporary files. A file outside
the model's folder that external data points at must never be opened (an audit hook in the
child process fails the run if it is).

docs/errors.md is this catalogue's table. The test checks each row against the message the
command really printed; after changing a message, rewrite the table with

    .venv/bin/python tests/test_bad_inputs.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"

# The child process: the real CLI entry point behind an audit hook that fails the run (exit 97)
# if the file outside the model folder is opened. argv: OUTSIDE_FILE CLI_ARGS...
_CHILD = """
import os, sys
outside = os.path.realpath(sys.argv[1])
busy = []
def hook(event, args):
    if event != "open" or busy or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    busy.append(1)
    try:
        if os.path.realpath(os.fsdecode(args[0])) == outside:
            os.write(2, b"test: the file outside the model folder was opened\\n")
            os._exit(97)
    finally:
        busy.pop()
sys.addaudithook(hook)
from rescompile.cli import main
sys.exit(main(sys.argv[2:]))
"""


# ----- tiny models ---------------------------------------------------------------------------
def residual_mlp(*, width: int = 8, blocks: int = 2, post_norm: bool = False, opset: int = 17):
    """x -> blocks of [LayerNorm] -> MatMul -> Relu -> Add(x, .) [-> LayerNorm]: pre- or post-norm."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"

    def norm(i, src, dst):
        inits.append(nh.from_array(np.ones(width, np.float32), f"g{i}"))
        inits.append(nh.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes.append(
            oh.make_node("LayerNormalization", [src, f"g{i}", f"b{i}"], [dst], axis=-1, name=f"ln{i}")
        )

    for i in range(blocks):
        inits.append(nh.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"))
        branch_in = x
        if not post_norm:
            norm(i, x, f"n{i}")
            branch_in = f"n{i}"
        nodes.append(oh.make_node("MatMul", [branch_in, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(oh.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        nodes.append(oh.make_node("Add", [x, f"r{i}"], [f"a{i}"], name=f"add{i}"))
        x = f"a{i}"
        if post_norm:
            norm(i, x, f"p{i}")
            x = f"p{i}"
    nodes.append(oh.make_node("Identity", [x], ["y"], name="out"))
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


def plain_mlp(width: int = 8):
    """MatMul -> Relu: no residual add."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((width, width)).astype(np.float32), "w")
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            oh.make_node("Relu", ["m"], ["y"], name="relu"),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[w],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def save_external(model, path: Path) -> None:
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def relocate_external(path: Path, location: str) -> None:
    """Point every external tensor of the model at `location` (written as is)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


# ----- the catalogue -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """A bad input: `setup(d)` writes the input files under d/in (the output folder is d/out,
    the file outside the model folder d/outside.bin) and returns the command line, run from d."""

    kind: str
    what: str  # the input, in words, for docs/errors.md
    setup: Callable[[Path], list[str]]
    names: str  # the part of the message that names the problem
    torch: bool = False
    limit_file_size: int | None = None


def _model(d: Path, model=None, name: str = "m.onnx") -> str:
    onnx.save(residual_mlp() if model is None else model, str(d / "in" / name))
    return f"in/{name}"


def _bytes(name: str, data: bytes) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        (d / "in" / name).write_bytes(data)
        return ["inspect", f"in/{name}"]

    return setup


def _truncated(d: Path) -> list[str]:
    data = residual_mlp().SerializeToString()
    (d / "in" / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["inspect", "in/m.onnx"]


def _opset(version: int) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        model = residual_mlp()
        model.opset_import[0].version = version
        return ["inspect", _model(d, model)]

    return setup


def _cycle(d: Path) -> list[str]:
    model = residual_mlp()
    model.graph.node[0].input[0] = "a1"  # the first norm reads the last block's output
    return ["inspect", _model(d, model)]


def _unsorted(d: Path) -> list[str]:
    model = residual_mlp()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[0], *nodes[2:]])
    return ["inspect", _model(d, model)]


def _undefined(d: Path) -> list[str]:
    model = residual_mlp()
    model.graph.node[1].input[1] = "nowhere"
    return ["inspect", _model(d, model)]


def _duplicate(d: Path) -> list[str]:
    model = residual_mlp()
    model.graph.node[4].output[0] = "n0"  # ln1 also produces n0
    model.graph.node[5].input[0] = "n0"
    return ["inspect", _model(d, model)]


def _external(mutate: Callable[[Path, Path], None], command: str = "apply") -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        path = d / "in" / "m.onnx"
        save_external(residual_mlp(), path)
        # A valid weights file outside the model folder: it must be refused, never read.
        shutil.copy(d / "in" / "m.onnx.data", d / "outside.bin")
        mutate(d, path)
        if command == "inspect":
            return ["inspect", "in/m.onnx"]
        return ["apply", "in/m.onnx", "-p", "rezero", "-o", "out/o.onnx"]

    return setup


def _symlink_out(d: Path, path: Path) -> None:
    (d / "in" / "m.onnx.data").unlink()
    (d / "in" / "m.onnx.data").symlink_to(d / "outside.bin")


def _shorten(d: Path, path: Path) -> None:
    data = (d / "in" / "m.onnx.data").read_bytes()
    (d / "in" / "m.onnx.data").write_bytes(data[: len(data) // 2])


def _apply(spec: str, model=None, output: str = "out/o.onnx") -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        return ["apply", _model(d, model), "-p", spec, "-o", output]

    return setup


def _torch_module(d: Path) -> None:
    import torch

    from tools.models import build

    case = build("residual_mlp")
    torch.save(case.module, d / "in" / "m.pt")
    torch.save(case.args, d / "in" / "inputs.pt")


def _pickle_untrusted(d: Path) -> list[str]:
    _torch_module(d)
    return ["inspect", "in/m.pt", "--example-inputs", "in/inputs.pt"]


def _pickle_not_module(d: Path) -> list[str]:
    import torch

    _torch_module(d)
    torch.save([1, 2, 3], d / "in" / "list.pt")
    return ["inspect", "in/list.pt", "--trust-pickle", "--example-inputs", "in/inputs.pt"]


def _examples_mismatch(d: Path) -> list[str]:
    import torch

    _torch_module(d)
    torch.save((torch.ones(3, 5, 7),), d / "in" / "wrong.pt")  # the model takes [*, 16]
    return ["inspect", "in/m.pt", "--trust-pickle", "--example-inputs", "in/wrong.pt", "--static"]


def _same_output(d: Path) -> list[str]:
    return ["apply", _model(d), "-p", "rezero", "-o", "in/../in/m.onnx"]


CASES = [
    Case(
        "missing_file",
        "a model path that does not exist",
        lambda d: ["inspect", "in/nope.onnx"],
        "no such file",
    ),
    Case("directory", "a directory as the model", lambda d: ["inspect", "in"], "is a directory"),
    Case("empty_file", "an empty .onnx file", _bytes("m.onnx", b""), "the file is empty"),
    Case("truncated_protobuf", "the first half of an ONNX file", _truncated, "not a readable ONNX model"),
    Case(
        "random_bytes",
        "4 KiB of random bytes named .onnx",
        _bytes("m.onnx", np.random.default_rng(0).bytes(4096)),
        "not a readable ONNX model",
    ),
    Case(
        "wrong_extension",
        "a valid ONNX model named m.txt",
        _bytes("m.txt", residual_mlp().SerializeToString()),
        "unknown model format '.txt'",
    ),
    Case("opset_too_old", "an ONNX model importing opset 7", _opset(7), "unsupported opset 7"),
    Case("opset_too_new", "an ONNX model importing opset 99", _opset(99), "unsupported opset 99"),
    Case("cycle", "a graph whose first node reads the last node's output", _cycle, "the graph has a cycle"),
    Case("unsorted_nodes", "nodes not in topological order", _unsorted, "not in topological order"),
    Case("undefined_value", "a node reading a value nothing defines", _undefined, "which is defined nowhere"),
    Case("duplicate_value_names", "two nodes producing the same value name", _duplicate, "redeclared"),
    Case(
        "external_data_missing",
        "external data file deleted",
        _external(lambda d, p: (d / "in" / "m.onnx.data").unlink(), "inspect"),
        "does not exist",
    ),
    Case(
        "external_data_parent_path",
        "external data location `../outside.bin` (the file exists)",
        _external(lambda d, p: relocate_external(p, "../outside.bin")),
        "outside the model's folder",
    ),
    Case(
        "external_data_absolute_path",
        "external data location an absolute path (the file exists)",
        _external(lambda d, p: relocate_external(p, str(d / "outside.bin"))),
        "outside the model's folder",
    ),
    Case(
        "external_data_symlink_out",
        "external data file a symlink to a file outside the folder",
        _external(_symlink_out),
        "outside the model's folder",
    ),
    Case(
        "external_data_short",
        "external data file cut to half its declared size",
        _external(_shorten),
        "is the file truncated",
    ),
    Case(
        "pickle_untrusted",
        "a pickled nn.Module without --trust-pickle",
        _pickle_untrusted,
        "--trust-pickle",
        torch=True,
    ),
    Case(
        "pickle_not_module",
        "a pickled list with --trust-pickle",
        _pickle_not_module,
        "not an nn.Module",
        torch=True,
    ),
    Case(
        "example_inputs_mismatch",
        "example inputs of the wrong shape for the module",
        _examples_mismatch,
        "check that the example inputs match forward()",
        torch=True,
    ),
    Case("unknown_pass", "`-p nosuchpass`", _apply("nosuchpass"), "unknown pass 'nosuchpass'"),
    Case("unknown_option", "`-p rezero:nope=1`", _apply("rezero:nope=1"), "unknown option 'nope'"),
    Case("option_wrong_type", "`-p rezero:init=abc`", _apply("rezero:init=abc"), "bad value 'abc' for init"),
    Case("option_out_of_range", "`-p hyper:n=0`", _apply("hyper:n=0"), "n must be >= 1"),
    Case(
        "selector_parse", "`-p rezero:sites=depth:x`", _apply("rezero:sites=depth:x"), "bad depth range 'x'"
    ),
    Case(
        "selector_matches_nothing",
        "`-p rezero:sites=stream:7` on a one-stream model",
        _apply("rezero:sites=stream:7"),
        "matches no site",
    ),
    Case(
        "output_is_input",
        "`-o` naming the input by another spelling",
        _same_output,
        "would overwrite the input",
    ),
    Case(
        "output_folder_is_file",
        "`-o` inside a path that is a file",
        _apply("rezero", output="out/keep.txt/o.onnx"),
        "is a file, not a folder",
    ),
    Case(
        "output_wrong_extension",
        "`-o out/o.txt` for an ONNX model",
        _apply("rezero", output="out/o.txt"),
        "the output must end in .onnx",
    ),
    Case(
        "disk_full",
        "a file-size limit (RLIMIT_FSIZE 8 KiB) below the output's size",
        _apply("rezero", residual_mlp(width=64)),
        "File too large",
        limit_file_size=8192,
    ),
    Case(
        "no_residual_sites",
        "`-p rezero` on a model without residual adds",
        _apply("rezero", plain_mlp()),
        "no residual sites",
    ),
    Case(
        "pass_refuses_site",
        "`-p hyper` on a post-norm model",
        _apply("hyper", residual_mlp(post_norm=True)),
        "reads the stream through LayerNormalization",
    ),
    Case(
        "drop_everything",
        "`-p drop:n=2` on a model with two blocks",
        _apply("drop:n=2", residual_mlp()),
        "would remove every one",
    ),
    Case(
        "drop_all_named",
        "`-p drop:sites=depth:0-` naming every block",
        _apply("drop:sites=depth:0-", residual_mlp()),
        "keep at least one",
    ),
    Case(
        "prune_ratio_out_of_range",
        "`-p prune:ratio=1` (removing every prunable parameter)",
        _apply("prune:ratio=1", residual_mlp()),
        "ratio must be in (0, 1)",
    ),
]


# ----- running a case ------------------------------------------------------------------------
def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (symlinks by target name), keyed by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    message: str  # the stderr line with the temporary folder written <tmp>


def run_case(case: Case, d: Path) -> tuple[Outcome, dict, dict]:
    """Set the case up in `d`, run it; returns the outcome and the hashes of d before and after."""
    for sub in ("in", "out"):
        (d / sub).mkdir()
    (d / "out" / "keep.txt").write_text("an earlier output\n")
    args = case.setup(d)
    before = _hashes(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.limit_file_size,) * 2)

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(d / "outside.bin"), *args],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit if case.limit_file_size else None,
    )
    message = proc.stderr.strip()
    for prefix in {str(d.resolve()), str(d)}:
        message = message.replace(prefix, "<tmp>")
    # The list of passes grows as passes land; the table need not follow it.
    message = re.sub(r"available: [a-z0-9_, ]+ \(", "available: ... (", message)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, message), before, _hashes(d)


def _doc_rows() -> dict[str, tuple[str, str]]:
    """kind -> (message, exit code) from docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|.*\| (.*) \| (\d+) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2).replace("\\|", "|"), m.group(3))
    return rows


@pytest.mark.parametrize("case", [pytest.param(c, id=c.kind) for c in CASES])
def test_bad_input(case: Case, tmp_path):
    if case.torch:
        pytest.importorskip("torch")
    outcome, before, after = run_case(case, tmp_path)
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rescompile: error: "), outcome.stderr
    assert case.names in lines[0]
    assert outcome.code == 2
    assert outcome.stdout == ""
    assert after == before  # inputs byte-identical, no output, no temporary files anywhere
    row = _doc_rows().get(case.kind)
    assert row == (outcome.message, "2"), (
        f"docs/errors.md is out of date for {case.kind}; rewrite it with "
        "`.venv/bin/python tests/test_bad_inputs.py`"
    )


def test_docs_list_exactly_the_catalogue():
    assert list(_doc_rows()) == [c.kind for c in CASES]
    assert len(CASES) >= 25


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_folder(tmp_path):
    """Not in the table (it cannot be produced as root): a folder without write permission."""

    def setup(d: Path) -> list[str]:
        os.chmod(d / "out", 0o555)
        return ["apply", _model(d), "-p", "rezero", "-o", "out/o.onnx"]

    try:
        outcome, before, after = run_case(Case("read_only", "", setup, ""), tmp_path)
    finally:
        os.chmod(tmp_path / "out", 0o755)
    assert outcome.code == 2 and outcome.stderr.count("\n") == 1
    assert "rescompile: error: cannot write out/o.onnx: Permission denied" in outcome.stderr
    assert after == before


# ----- docs/errors.md ------------------------------------------------------------------------
def write_doc() -> None:
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            outcome, _, _ = run_case(case, Path(tmp))
        message = outcome.message.replace("|", "\\|")
        rows.append(f"| `{case.kind}` | {case.what} | {message} | {outcome.code} |")
        print(rows[-1])
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(
        "# Errors: the catalogue of bad inputs\n\n"
        "Every input below makes `rescompile` print one line on stderr and exit 2, leaving the\n"
        "input files byte-identical and the output folder as it was (no partial output, no\n"
        "temporary files). External data that points outside the model's folder (`../`, an\n"
        "absolute path, a symlink) is refused before anything opens it. `--debug` shows the\n"
        "traceback instead. Each row is a case of `tests/test_bad_inputs.py`, run from\n"
        "a folder holding `in/` (the inputs) and `out/` (outputs); `<tmp>` is that folder. The\n"
        "test checks every message against this table; after changing a message, regenerate it\n"
        "with `.venv/bin/python tests/test_bad_inputs.py`. Still to come: a prune or drop that\n"
        "would remove everything (a row once those passes land).\n\n"
        "| kind | input | message (stderr) | exit code |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_doc()
