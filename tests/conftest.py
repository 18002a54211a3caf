"""Shared fixtures: ONNX exports of the test models, made once per cache folder.

Exports are cached under .cache/models (or $RESCOMPILE_MODEL_CACHE) so that the
pytest-xdist workers and repeated runs share them; each file is written
atomically, so concurrent workers never see a partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RESCOMPILE_MODEL_CACHE", ROOT / ".cache" / "models"))


def pytest_addoption(parser):
    parser.addoption(
        "--tolerance-margin",
        type=float,
        default=None,
        metavar="K",
        help="fail a test whose numerical checks use more than 1/K of the tolerance "
        "(and print the worst diff/tolerance ratio of each test)",
    )


@pytest.fixture(autouse=True)
def _tolerance_margin(request, record_property):
    """Record the worst diff/tolerance ratio of the test's assert_close / assert_ok checks; with
    --tolerance-margin K, a ratio above 1/K fails the test (the suite must hold at tolerance / K)."""
    from rescompile import validation

    validation.observed_ratios.clear()
    yield
    if validation.observed_ratios:
        worst = max(validation.observed_ratios)
        record_property("tolerance_ratio", worst)
        margin = request.config.getoption("--tolerance-margin")
        if margin and worst > 1.0 / margin:
            pytest.fail(f"diff / tolerance = {worst:.3g} > 1/{margin:g}: too close to the tolerance")


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--tolerance-margin"):
        return
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == "tolerance_ratio" and getattr(report, "when", "") == "teardown":
                    rows.append((value, report.nodeid))
    rows.sort(reverse=True)
    terminalreporter.section("diff / tolerance, worst first")
    for value, nodeid in rows:
        terminalreporter.write_line(f"{value:9.4f}  {nodeid}")
    if rows:
        terminalreporter.write_line(
            f"worst ratio {rows[0][0]:.4f} over {len(rows)} tests "
            f"(margin 1/{config.getoption('--tolerance-margin'):g})"
        )


@pytest.fixture(scope="session")
def onnx_model():
    """onnx_model(name, exporter="dynamo") -> Path of a cached ONNX export."""
    from tools.models import cached_onnx

    def get(name: str, exporter: str = "dynamo") -> Path:
        return cached_onnx(name, exporter, CACHE)

    return get


@pytest.fixture
def model_copy(onnx_model, tmp_path):
    """A private copy (model + external data) that a test may modify or delete."""

    def get(name: str, exporter: str = "dynamo") -> Path:
        src = onnx_model(name, exporter)
        for f in src.parent.glob(src.name + "*"):
            shutil.copy(f, tmp_path / f.name)
        return tmp_path / src.name

    return get


@pytest.fixture
def assert_preserves(onnx_model, tmp_path):
    """assert_preserves(name, spec): the pass keeps the function of test model `name`
    in both frontends (ONNX Runtime vs the original export; torch vs the original module)."""
    import torch
    from torch.utils import _pytree as pytree

    import rescompile
    from rescompile.api import build_passes, run_passes
    from rescompile.frontends.onnx import load_onnx, save_onnx
    from rescompile.validation import assert_close, assert_ok, compare_onnx
    from tools.models import build

    def check(name: str, spec: str) -> None:
        src = onnx_model(name)
        graph = load_onnx(src)
        run_passes(graph, build_passes([spec]))
        save_onnx(graph, tmp_path / "preserved.onnx")
        assert_ok(compare_onnx(str(src), str(tmp_path / "preserved.onnx")))
        case = build(name)
        module = rescompile.apply(case.module, [spec], case.args, example_kwargs=case.kwargs)
        with torch.no_grad():
            want = pytree.tree_leaves(case.module(*case.args, **case.kwargs))[0]
            got = pytree.tree_leaves(module(*case.args, **case.kwargs))[0]
        assert_close(got, want)

    return check
