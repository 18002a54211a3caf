"""`inspect --html/--svg` and `passes --markdown`.

The markup checks (escaping, counts, atomic writes, docs/passes.md up to date) always run. The
browser checks load the page in Debian's headless `chromium` (installed by .ci/run) and read
the rendered DOM; they are skipped, saying why, only when no chromium is found.

`python tests/test_report.py` regenerates docs/report.png (the README's screenshot) from the
demo model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rescompile.api import inspect
from rescompile.cli import main
from rescompile.errors import RescompileError
from rescompile.report import render_html, render_svg, write_html
from rescompile.report.html import name_selector

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = '"><img src=x onerror=alert(2)>[0]*?,;'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's `chromium` with apt)"
)


def _hostile_model(path: Path) -> Path:
    """x -> [x + W relu(x)] twice; the two residual adds carry names that are markup."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r0"], name="relu0"),
        helper.make_node("MatMul", ["r0", "w0"], ["b0"], name="mm0"),
        helper.make_node("Add", ["x", "b0"], ["h"], name=SCRIPT_NAME),
        helper.make_node("Relu", ["h"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w1"], ["b1"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["out"], name=IMG_NAME),
    ]
    weights = [numpy_helper.from_array(np.full((4, 4), 0.1, np.float32), n) for n in ("w0", "w1")]
    graph = helper.make_graph(
        nodes,
        "<b>graph</b>",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path.write_bytes(model.SerializeToString())
    return path


class _Elements(HTMLParser):
    """Start tags with their attributes, and the text, of an HTML document."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


@pytest.fixture
def hostile(tmp_path):
    path = _hostile_model(tmp_path / "hostile.onnx")
    return path, inspect(path)


def test_html_shows_markup_in_names_as_text(hostile):
    _, report = hostile
    assert [s.name for s in report.residuals] == [SCRIPT_NAME, IMG_NAME]
    page = render_html(report, "<i>model</i>")
    assert SCRIPT_NAME not in page and "<img" not in page and "<i>model" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;i&gt;model&lt;/i&gt;" in page
    doc = _Elements(page)
    assert len(doc.having("script")) == 1 and not doc.having("img") and not doc.having("i", "model")
    assert len(doc.having("g", "site")) == 2 and len(doc.having("g", "lane")) == 1
    assert SCRIPT_NAME in "".join(doc.text)  # as text, after unescaping
    # Only our script may run, and nothing may be fetched.
    csp = next(a["content"] for t, a in doc.tags if a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_svg_is_wellformed_and_escapes_names(hostile):
    _, report = hostile
    svg = render_svg(report, "<i>model</i>")
    root = ET.fromstring(svg)  # well-formed XML, names and all
    ns = "{http://www.w3.org/2000/svg}"
    sites = [g for g in root.iter(f"{ns}g") if "site" in g.get("class", "").split()]
    assert len(sites) == 2 and root.find(f"{ns}title").text == "<i>model</i>"
    assert SCRIPT_NAME in sites[0].find(f"{ns}title").text
    assert not list(root.iter(f"{ns}script")) and not list(root.iter(f"{ns}img"))


def test_name_selector_selects_exactly_that_site(hostile):
    from rescompile.infra import SiteSelector, parse_spec
    from rescompile.passes import PASSES

    _, report = hostile
    for site in report.residuals:
        selector = name_selector(site.name)
        assert SiteSelector(selector).select(report.analysis) == [site]
        assert parse_spec(f"rezero:sites={selector}", PASSES).options.sites == selector


def test_counts_lanes_bars_and_links_on_a_two_stream_cnn(onnx_model):
    """residual_cnn: stream 0 (two identity sites), then a projection starts stream 1."""
    report = inspect(onnx_model("residual_cnn"), groups=True, importance="norm", unit="branch")
    doc = _Elements(render_html(report, "residual_cnn"))
    stats = {a["data-stat"]: a for a in doc.having("span", "stat")}
    assert set(stats) >= {"nodes", "params", "sites", "identity", "projection", "streams", "groups"}
    assert len(doc.having("g", "site")) == 4 and len(doc.having("g", "lane")) == 2
    assert len(doc.having("g", "projection")) == 1 and len(doc.having("g", "identity")) == 3
    assert len(doc.having("g", "unit")) == len(report.importance) == 4
    assert len(doc.having("rect", "bar-groups")) == 4
    assert len(doc.having("path", "link")) == 1  # stream 0's end reaches stream 1's start
    assert len(doc.having("template")) == 4
    page = render_html(report, "residual_cnn")
    for key, value in [("nodes", report.nodes), ("sites", 4), ("projection", 1), ("streams", 2)]:
        assert f'data-stat="{key}">{value:,}<' in page


def test_cli_writes_both_files_atomically(hostile, tmp_path):
    path, _ = hostile
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.html").write_text("old")
    assert main(["inspect", str(path), "--html", str(out / "r.html"), "--svg", str(out / "r.svg")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["r.html", "r.svg"]  # no temporary files left
    assert (out / "r.html").read_text().startswith("<!DOCTYPE html>")
    ET.fromstring((out / "r.svg").read_text())


def test_write_failure_is_one_line_and_leaves_nothing(hostile, tmp_path):
    _, report = hostile
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RescompileError, match="cannot write"):
        write_html(report, blocker / "r.html", "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hostile.onnx"]


def _chromium(*args: str, user_dir: Path) -> str:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_dir}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_chromium
def test_browser_renders_sites_lanes_and_names_as_text(hostile, tmp_path):
    path, _ = hostile
    page = tmp_path / "report.html"
    assert main(["inspect", str(path), "--html", str(page)]) == 0
    dom = _Elements(_chromium("--dump-dom", page.as_uri(), user_dir=tmp_path / "profile"))
    assert len(doc_sites := dom.having("g", "site")) == 2 and len(dom.having("g", "lane")) == 1
    # The page's script ran (it selected the first site and filled the details panel) and the
    # names stayed text: no element came from them.
    assert "selected" in doc_sites[0]["class"]
    assert len(dom.having("script")) == 1 and not dom.having("img")
    assert SCRIPT_NAME in "".join(dom.text)
    assert len(dom.having("h2")) >= 1 + 2  # the panel's copy of site 0, and the two templates


@needs_chromium
def test_browser_screenshot(hostile, tmp_path):
    path, _ = hostile
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["inspect", str(path), "--html", str(page)]) == 0
    _chromium(f"--screenshot={shot}", "--window-size=1400,900", page.as_uri(), user_dir=tmp_path / "p")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 1400


# ----- docs/passes.md ---------------------------------------------------------------------------
def test_docs_passes_md_is_generated_from_the_passes():
    from rescompile.passes import PASSES
    from rescompile.report.markdown import passes_markdown

    committed = (ROOT / "docs" / "passes.md").read_text()
    assert committed == passes_markdown(PASSES), (
        "docs/passes.md is out of date: run `rescompile passes --markdown` in the repository root"
    )


def test_passes_md_says_under_which_options_a_pass_preserves_the_function():
    from rescompile.passes import PASSES
    from rescompile.report.markdown import passes_markdown

    text = passes_markdown(PASSES)
    section = {m.group(1): m.group(2) for m in re.finditer(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S)}
    assert set(section) == set(PASSES)
    assert "yes with the defaults; not with `init=0`" in section["rezero"]
    assert "no with the defaults; yes with" in section["decay"] and "`compensate=true`" in section["decay"]
    assert "no: it changes the function by design" in section["drop"]
    assert "| `alpha_min` | float | `0.5` |" in section["decay"]
    assert "rescompile apply model.onnx -p rezero -o out.onnx --validate" in section["rezero"]


def test_every_pass_docstring_names_its_paper():
    """Year and arXiv id (with the authors) in each pass module's docstring (docs/passes.md shows them);
    identity and fold are compiler utilities, not from a paper."""
    from rescompile.passes import PASSES

    for name, cls in PASSES.items():
        if name in ("identity", "fold"):
            continue
        doc = sys.modules[cls.__module__].__doc__
        assert re.search(r"arXiv \d{4}\.\d{4,5}", doc), f"{name}: no arXiv id"
        assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: no year"


def _regenerate_screenshot() -> None:
    """docs/report.png: the demo's model with channel groups and importance, in chromium."""
    import tempfile

    from rescompile.demo import _export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny_transformer.onnx"
        _export(model)
        page = tmp / "report.html"
        assert main(["inspect", str(model), "--groups", "--importance", "bi", "--html", str(page)]) == 0
        shot = ROOT / "docs" / "report.png"
        _chromium(f"--screenshot={shot}", "--window-size=1400,900", page.as_uri(), user_dir=tmp / "p")
        print(f"wrote {shot}")


if __name__ == "__main__":
    _regenerate_screenshot()
