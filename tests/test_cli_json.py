"""apply --json: the machine-readable summary; the progress display stays off pipes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from rescompile.console import stage_progress
from tools.models import cached_onnx


def test_apply_json_reports_passes_params_macs_and_seconds(tmp_path):
    out = tmp_path / "o.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "rescompile", "apply", str(cached_onnx("gpt2")), "-p", "prune:ratio=0.3"]
        + ["-p", "drop:n=1", "-o", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert [p["pass"].split(":")[0] for p in summary["passes"]] == ["prune", "drop"]
    assert summary["passes"][1]["stats"]["removed"] == 1
    assert summary["params"]["after"] < summary["params"]["before"] == 28256
    assert summary["macs"]["after"] < summary["macs"]["before"] == 409600  # see tests/test_cost.py
    assert set(summary["seconds"]) >= {"load", "passes", "export"}
    assert summary["output"] == str(out) and out.exists()
    assert "\x1b[" not in result.stderr  # no progress display: stderr is not a terminal


def test_progress_shows_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with stage_progress() as step:
        step("loading")  # a no-op off a terminal
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    with stage_progress() as step:
        step("pass 1/1: drop")
    assert "pass 1/1: drop" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    with stage_progress(enabled=False) as step:  # --quiet
        step("loading")
    assert sys.stderr.getvalue() == ""
