"""The command line: tables, JSON, apply/validate round trips, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from rescompile.cli import main
from rescompile.validation import random_onnx_inputs, run_onnx


def run(*args):
    """Run the real console entry point in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "rescompile", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_inspect_json_and_table(onnx_model, capsys):
    path = onnx_model("resnet50")
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["residuals"]) == 16 and len(data["streams"]) == 4  # one per stage
    assert sum(r["kind"] == "projection" for r in data["residuals"]) == 4
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16 residual sites (12 identity, 4 projection) in 4 streams" in out
    assert "projection" in out and "branch params" in out


def test_apply_identity_is_bit_identical_and_input_untouched(onnx_model, tmp_path):
    src = onnx_model("llama")
    before = src.read_bytes()
    out = tmp_path / "rt.onnx"
    code, stdout, stderr = run(
        "apply", src, "-p", "identity", "-o", out, "--validate", "--atol", "0", "--rtol", "0"
    )
    assert code == 0, stderr
    assert "validate: outputs within tolerance atol=0 (x max|want|) rtol=0" in stdout  # bit-exact
    assert src.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    feeds, _ = random_onnx_inputs(str(src), seed=5)
    a, b = run_onnx(str(src), feeds), run_onnx(str(out), feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_apply_chain_and_validate_skips_non_preserving(onnx_model, tmp_path, capsys):
    out = tmp_path / "g.onnx"
    code = main(
        [
            "apply",
            str(onnx_model("gpt2")),
            "-p",
            "rezero",
            "-p",
            "rezero:init=0,sites=stream:0",
            "-o",
            str(out),
            "--validate",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "rezero: sites=4" in text and "validate: skipped, rezero changes the function" in text
    code = main(["validate", str(onnx_model("gpt2")), str(out)])
    assert code == 1 and "NOT within" in capsys.readouterr().out


def test_validate_json_and_dims(onnx_model, tmp_path, capsys):
    src = onnx_model("gpt2")
    assert main(["validate", str(src), str(src), "--json", "--dim", "batch=3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["outputs"][0]["max_abs"] == 0.0


def test_passes_lists_every_pass_with_options(capsys):
    from rescompile.passes import PASSES

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in PASSES:
        assert name in out
    assert "init=1.0" in out and "sites=all" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["inspect", "missing.onnx"], "no such file"),
        (["apply", "{src}", "-p", "nosuchpass", "-o", "{tmp}/o.onnx"], "unknown pass 'nosuchpass'"),
        (["apply", "{src}", "-p", "rezero:nope=1", "-o", "{tmp}/o.onnx"], "unknown option 'nope'"),
        (["apply", "{src}", "-p", "rezero:init=abc", "-o", "{tmp}/o.onnx"], "bad value 'abc' for init"),
        (["apply", "{src}", "-p", "rezero:sites=depth:x", "-o", "{tmp}/o.onnx"], "bad depth range"),
        (["apply", "{src}", "-p", "identity", "-o", "{src}"], "would overwrite the input"),
        (["inspect", "{tmp}/garbage.onnx"], "not a readable ONNX model"),
        (["inspect", "{tmp}"], "is a directory"),
        (["validate", "{src}"], "Missing argument"),
        (["bogus"], "No such command"),
    ],
)
def test_errors_are_one_line_with_exit_2(onnx_model, tmp_path, args, message):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x01garbage" * 50)
    src = onnx_model("plain_mlp", "legacy")
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    code, stdout, stderr = run(*args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rescompile: error:"), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr + stdout


def test_onnx_work_does_not_import_torch(onnx_model, tmp_path):
    src, out = str(onnx_model("gpt2")), str(tmp_path / "o.onnx")
    code = (
        "import sys; from rescompile.cli import main\n"
        f"assert main(['inspect', {src!r}, '--json']) == 0\n"
        f"assert main(['apply', {src!r}, '-p', 'rezero', '-o', {out!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_apply_compensated_depthscale_then_fold_keeps_function_and_size(onnx_model, tmp_path, capsys):
    import onnx as _onnx

    src = onnx_model("llama")
    out = tmp_path / "d.onnx"
    assert (
        main(
            [
                "apply",
                str(src),
                "-p",
                "depthscale:compensate=true",
                "-p",
                "fold",
                "-o",
                str(out),
                "--validate",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "depthscale: sites=4" in text and "fold: folded=4" in text and "outputs within" in text
    assert len(_onnx.load(str(out), load_external_data=False).graph.node) == len(
        _onnx.load(str(src), load_external_data=False).graph.node
    )


def test_bad_selectors_fail_before_loading(capsys):
    # The model path does not exist: the spec error must come first.
    assert main(["apply", "missing.onnx", "-p", "hyper:streams=x", "-o", "o.onnx"]) == 2
    assert "hyper: streams must be all or N|M, not 'x'" in capsys.readouterr().err
    assert main(["apply", "missing.onnx", "-p", "gate:sites=stream:a", "-o", "o.onnx"]) == 2
    assert "gate: bad stream list 'a'" in capsys.readouterr().err
