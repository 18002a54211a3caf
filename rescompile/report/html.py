"""`inspect --html`: one self-contained page showing what rescompile found.

Header (model, size, site counts), the lanes of `svg.py` inline, and per site a <template>
with its branch ops, selectors, channel groups and importance, which a few lines of script
copy into the details panel on hover or click. Everything is rendered here, escaped; the
script only moves finished markup. A Content-Security-Policy allows that script alone (by
hash) and no network, so even a name that slipped through escaping could not run code.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from collections.abc import Iterator

from rescompile.report.svg import STYLE, canvas_size, esc, lanes, norm_text, site_groups, unit_ranks

__all__ = ["render_html", "name_selector"]

# Branch ops listed per site; longer branches (a whole Swin block) end with "... N more".
MAX_OPS = 60

_PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2933;
       background: #f5f7fa; }
header { padding: 14px 20px 8px; background: #fff; border-bottom: 1px solid #d9e2ec; }
h1 { font-size: 18px; margin: 0 0 6px; word-break: break-all; }
.stats span.stat { font-weight: 600; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin: 0 4px -2px 10px; }
.lanes-wrap { overflow-x: auto; background: #fff; margin: 12px 20px; border: 1px solid #d9e2ec; }
#details { margin: 0 20px 20px; padding: 12px 16px; background: #fff; border: 1px solid #d9e2ec;
           display: grid; grid-template-columns: minmax(320px, 1fr) 2fr; gap: 6px 24px; }
#details h2 { grid-column: 1 / -1; font-size: 15px; margin: 0; word-break: break-all; }
#details table { border-collapse: collapse; font-size: 13px; }
#details td { padding: 1px 10px 1px 0; vertical-align: top; word-break: break-all; }
#details code { background: #eef2f7; padding: 1px 4px; border-radius: 3px; font-size: 12px; }
#details ol { margin: 0; padding-left: 28px; font-size: 12px; columns: 2; }
#details h3 { font-size: 13px; margin: 8px 0 4px; }
#details div { font-size: 13px; }
"""

# Hover shows a site; click pins it until another click. The first site shows on load.
_SCRIPT = """
const panel = document.getElementById("details");
let pinned = false;
function show(g) {
  const t = document.getElementById("site-" + g.dataset.site);
  if (!t) return;
  panel.replaceChildren(t.content.cloneNode(true));
  document.querySelectorAll("g.site.selected").forEach((e) => e.classList.remove("selected"));
  g.classList.add("selected");
}
document.querySelectorAll("g.site").forEach((g) => {
  g.addEventListener("mouseenter", () => { if (!pinned) show(g); });
  g.addEventListener("click", () => { pinned = true; show(g); });
});
const first = document.querySelector("g.site");
if (first) show(first);
"""


def name_selector(name: str) -> str:
    """`name:GLOB` matching exactly `name`: glob characters bracketed; `,` and `;`, which end
    an option or a clause in `-p pass:sites=...`, become `?` (any one character)."""
    special = {"[": "[[]", "*": "[*]", "?": "[?]", ",": "?", ";": "?"}
    return "name:" + "".join(special.get(ch, ch) for ch in name)


def _row(key: str, value: object) -> str:
    return f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>"


def _details(report, site, groups, score, rank: int | None) -> Iterator[str]:
    selectors = [
        name_selector(site.name),
        f"stream:{site.stream};depth:{site.depth}",
        f"depth:{site.depth}",
        f"stream:{site.stream}",
    ]
    example = "rescompile apply MODEL -p " + shlex.quote(f"rezero:sites={selectors[0]}") + " -o OUT.onnx"
    yield f"<h2>{esc(site.name)}</h2><div><table>"
    yield _row("kind", site.kind)
    yield _row("stream / depth", f"{site.stream} / {site.depth}")
    yield _row("norm", norm_text(site.norm))
    yield _row("branch params", f"{site.branch_params:,}")
    yield _row("skip", site.skip.name)
    yield _row("branch", site.branch.name)
    yield _row("reads", site.fork.name)
    if score is not None:
        yield _row("importance", f"{score.unit.name}: {report.metric} {score.score:.6g}")
        yield _row("rank", f"{rank} of {len(report.importance)} (1: removing it changes least)")
    yield "</table><h3>selectors for -p PASS:sites=...</h3>"
    yield "".join(f'<div><code class="selector">{esc(s)}</code></div>' for s in selectors)
    yield f"<div>e.g. <code>{esc(example)}</code></div>"
    if groups is not None:
        yield f"<h3>channel groups ({len(groups)})</h3><table>"
        for g in groups:
            why = "prunable" if g.prunable else f"fixed: {g.reason}"
            yield _row(g.name, f"{g.kind}, {g.size} {g.unit}s, {g.params:,} params, {why}")
        yield "</table>"
    yield f"</div><div><h3>branch ops ({len(site.nodes)})</h3><ol>"
    for node in site.nodes[:MAX_OPS]:
        yield f"<li><code>{esc(node.op_type)}</code> {esc(node.name)}</li>"
    yield "</ol>"
    if len(site.nodes) > MAX_OPS:
        yield f"<div>\u2026 {len(site.nodes) - MAX_OPS} more</div>"
    yield "</div>"


def _header(report, title: str) -> Iterator[str]:
    kinds = [s.kind for s in report.residuals]

    def stat(key: str, value: int) -> str:
        return f'<span class="stat" data-stat="{key}">{value:,}</span>'

    yield f"<header><h1>{esc(title)}</h1><p class='stats'>"
    yield (
        f"{stat('nodes', report.nodes)} nodes \u00b7 {stat('params', report.params)} parameters \u00b7 "
        f"{stat('sites', len(kinds))} residual sites ({stat('identity', kinds.count('identity'))} identity, "
        f"{stat('projection', kinds.count('projection'))} projection) in "
        f"{stat('streams', len(report.streams))} streams"
    )
    if report.groups is not None:
        groups = report.groups.groups
        yield (
            f" \u00b7 {stat('groups', len(groups))} channel groups, "
            f"{stat('prunable', sum(g.prunable for g in groups))} prunable"
        )
    if report.analysis.opaque:
        yield f" \u00b7 {stat('opaque', len(report.analysis.opaque))} opaque ops stopped the search"
    yield "</p><p class='legend'>"
    yield "<i style='background:#dbe8f6;border:1px solid #4c78a8'></i>identity shortcut"
    yield "<i style='background:#fde3c8;border:1px solid #e07b00'></i>projection shortcut"
    if report.groups is not None:
        yield "<i style='background:#59a14f'></i>share of branch params in prunable groups"
    if report.importance is not None:
        yield (
            f"<i style='background:#b07aa1'></i>{esc(report.metric)} importance per unit "
            "(shorter: removing it changes less)"
        )
    yield " \u00b7 hover or click a site for its ops and selectors</p></header>"


def render_html(report, title: str) -> str:
    """The whole page as one string: no external resources, names escaped."""
    width, height = canvas_size(report)
    groups = site_groups(report)
    ranks = unit_ranks(report)
    unit_of = {id(site): s for s in report.importance or () for site in s.unit.sites}
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        f"<title>rescompile: {esc(title)}</title>",
        f"<style>{_PAGE_STYLE}{STYLE}</style></head><body>",
        *_header(report, title),
        '<div class="lanes-wrap">',
        f'<svg class="lanes" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        *(lanes(report) if report.residuals else ['<text x="10" y="30">no residual sites found</text>']),
        "</svg></div>",
        '<section id="details"><p>Hover or click a site for its branch ops and selectors.</p></section>',
    ]
    for i, site in enumerate(report.residuals):
        score = unit_of.get(id(site))
        rank = ranks[id(score)] if score is not None else None
        parts.append(f'<template id="site-{i}">')
        parts.extend(_details(report, site, groups.get(id(site)), score, rank))
        parts.append("</template>")
    parts += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(parts)
