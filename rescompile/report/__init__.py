"""Pictures of what `inspect` found: a self-contained HTML page and a standalone SVG."""

from __future__ import annotations

import os
from pathlib import Path

from rescompile.frontends._staging import staging_dir
from rescompile.report.html import render_html
from rescompile.report.svg import render_svg

__all__ = ["render_html", "render_svg", "write_html", "write_svg", "write_text"]


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    with staging_dir(path) as tmp:
        staged = tmp / path.name
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, path)


def write_html(report, path: Path, title: str) -> None:
    write_text(path, render_html(report, title))


def write_svg(report, path: Path, title: str) -> None:
    write_text(path, render_svg(report, title))
