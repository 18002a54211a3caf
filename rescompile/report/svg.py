"""The residual structure as lanes: one lane per stream, one box per site, in depth order.

Sites take columns in graph order, so a stream that starts where another ends sits to
its right (a staircase for ResNet stages), and streams that run side by side (encoder and
decoder) overlap. A dashed line joins the end of a stream to the start of a later stream
its output reaches. Every name is untrusted text and goes through `esc`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

__all__ = [
    "esc",
    "clip",
    "norm_text",
    "plural",
    "lanes",
    "canvas_size",
    "render_svg",
    "site_groups",
    "unit_ranks",
    "STYLE",
]

LEFT, TOP, RIGHT = 170, 14, 190
BOX_W, BOX_H, GAP = 156, 64, 22
BAR_H = 14
LANE_PAD = 44  # room for the stream's in/out labels and the gap to the next lane
# A stream's output reaches a later stream's input within this many nodes, or they are shown apart.
_REACH_LIMIT = 400

STYLE = """
svg.lanes { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 11px; }
svg.lanes .lane-line { stroke: #9aa4b2; stroke-width: 3; }
svg.lanes .lane-label { font-weight: 600; font-size: 12px; fill: #1f2933; }
svg.lanes .lane-sub, svg.lanes .io { fill: #52606d; }
svg.lanes .link { stroke: #9aa4b2; stroke-width: 1.5; stroke-dasharray: 5 4; fill: none; }
svg.lanes .site rect.box { stroke-width: 1.5; cursor: pointer; }
svg.lanes .site.identity rect.box { fill: #dbe8f6; stroke: #4c78a8; }
svg.lanes .site.projection rect.box { fill: #fde3c8; stroke: #e07b00; }
svg.lanes .site.selected rect.box { stroke-width: 3.5; }
svg.lanes .site .name { font-weight: 600; fill: #1f2933; }
svg.lanes .site .meta { fill: #3e4c59; }
svg.lanes .bar-bg { fill: #e4e7eb; }
svg.lanes .bar-groups { fill: #59a14f; }
svg.lanes .bar-score { fill: #b07aa1; }
svg.lanes .bar-text { fill: #1f2933; font-size: 10px; }
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(text: object) -> str:
    """Text for markup (element text or a quoted attribute), in HTML and in XML alike.

    Control characters, invalid in XML and useless in a picture, become '?'."""
    return html.escape(_CONTROL.sub("?", str(text)), quote=True)


def norm_text(norm: str) -> str:
    """ "pre" -> "pre-norm", "none" -> "no norm" (a site's or a stream's `norm`)."""
    return {"none": "no norm", "mixed": "mixed norms"}.get(norm, f"{norm}-norm")


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def site_groups(report) -> dict[int, list]:
    """Channel groups touching each site's branch (by `id(site)`). Stream groups couple
    every site of a stream and are shown once per lane instead."""
    if report.groups is None:
        return {}
    out = {}
    for site in report.residuals:
        values = {id(v) for n in site.nodes for v in (*n.inputs, *n.outputs) if v is not None}
        out[id(site)] = [
            g
            for g in report.groups.groups
            if g.kind != "stream" and any(id(m.value) in values for m in g.members)
        ]
    return out


def unit_ranks(report) -> dict[int, int]:
    """Rank of each UnitScore (by `id`), 1 = lowest score = removing it changes least."""
    ordered = sorted(report.importance or (), key=lambda s: s.score)
    return {id(s): rank for rank, s in enumerate(ordered, 1)}


def _reaches(src, dst) -> bool:
    """Whether value `dst` is computed from value `src` within a few hundred nodes."""
    seen, todo = {id(src)}, [src]
    while todo and len(seen) < _REACH_LIMIT:
        value = todo.pop()
        if value is dst:
            return True
        for node in value.consumers():
            for out in node.outputs:
                if id(out) not in seen:
                    seen.add(id(out))
                    todo.append(out)
    return False


def _lane_height(report) -> int:
    bars = (report.groups is not None) + (report.importance is not None)
    return BOX_H + bars * (BAR_H + 4) + LANE_PAD


def _layout(report):
    """(column of each site by id, y of each stream's lane by index, total width, total height)."""
    column = {id(s): i for i, s in enumerate(report.residuals)}
    lane_h = _lane_height(report)
    lane_y = {st.index: TOP + 18 + k * lane_h for k, st in enumerate(report.streams)}
    width = LEFT + max(len(report.residuals), 1) * (BOX_W + GAP) + RIGHT
    height = TOP + 18 + max(len(report.streams), 1) * lane_h
    return column, lane_y, width, height


def canvas_size(report) -> tuple[int, int]:
    _, _, width, height = _layout(report)
    return width, height


def _x(col: int) -> int:
    return LEFT + col * (BOX_W + GAP)


def _site(site, index: int, x: int, y: int, groups, score_text: str | None) -> Iterator[str]:
    selectors = f"name:{site.name}  |  stream:{site.stream};depth:{site.depth}"
    tip = (
        f"{site.name}\n{site.kind}, {norm_text(site.norm)}, {site.branch_params:,} branch params\n"
        f"{len(site.nodes)} branch ops\n{selectors}" + (f"\n{score_text}" if score_text else "")
    )
    yield (
        f'<g class="site {esc(site.kind)}" data-site="{index}" data-stream="{site.stream}" '
        f'data-depth="{site.depth}" tabindex="0">'
    )
    yield f"<title>{esc(tip)}</title>"
    yield f'<rect class="box" x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/>'
    yield f'<text class="name" x="{x + 8}" y="{y + 17}">{esc(clip(site.name, 24))}</text>'
    kind = f"{site.kind} \u00b7 {norm_text(site.norm)}"
    yield f'<text class="meta" x="{x + 8}" y="{y + 34}">{esc(kind)}</text>'
    yield (
        f'<text class="meta" x="{x + 8}" y="{y + 51}">{site.branch_params:,} params \u00b7 depth '
        f"{site.depth}</text>"
    )
    if groups is not None:
        by = y + BOX_H + 4
        prunable = sum(g.params for g in groups if g.prunable)
        frac = min(prunable / site.branch_params, 1.0) if site.branch_params else 0.0
        label = f"{plural(len(groups), 'group')}, {sum(g.prunable for g in groups)} prunable"
        yield f'<rect class="bar-bg" x="{x}" y="{by}" width="{BOX_W}" height="{BAR_H}"/>'
        yield f'<rect class="bar-groups" x="{x}" y="{by}" width="{frac * BOX_W:.1f}" height="{BAR_H}"/>'
        yield f'<text class="bar-text" x="{x + 4}" y="{by + 11}">{esc(label)}</text>'
    yield "</g>"


def _score_label(score, rank: int, total: int, metric: str) -> str:
    return f"{score.unit.name}: {metric} {score.score:.4g} (rank {rank}/{total})"


def _unit_bar(score, rank: int, total: int, top: float, metric: str, column, y: int) -> Iterator[str]:
    cols = [column[id(s)] for s in score.unit.sites]
    x0, x1 = _x(min(cols)), _x(max(cols)) + BOX_W
    frac = score.score / top if top > 0 else 0.0
    label = _score_label(score, rank, total, metric)
    yield f'<g class="unit" data-unit="{esc(score.unit.name)}"><title>{esc(label)}</title>'
    yield f'<rect class="bar-bg" x="{x0}" y="{y}" width="{x1 - x0}" height="{BAR_H}"/>'
    yield f'<rect class="bar-score" x="{x0}" y="{y}" width="{frac * (x1 - x0):.1f}" height="{BAR_H}"/>'
    yield f'<text class="bar-text" x="{x0 + 4}" y="{y + 11}">{esc(clip(label, (x1 - x0) // 6))}</text></g>'


def _stream_groups(report, stream) -> str | None:
    """The stream's own width group (the widest that holds its values): prunable or fixed."""
    if report.groups is None:
        return None
    outputs = {id(s.output) for s in stream.sites}
    found = [
        g
        for g in report.groups.groups
        if g.kind == "stream" and any(id(m.value) in outputs for m in g.members)
    ]
    widest = max(found, key=lambda g: g.params, default=None)
    return widest and f"width {widest.size}: {'prunable' if widest.prunable else 'fixed'}"


def lanes(report) -> Iterator[str]:
    """The lanes' SVG elements (no <svg> wrapper)."""
    column, lane_y, _, _ = _layout(report)
    groups = site_groups(report)
    ranks = unit_ranks(report)
    scores = report.importance or ()
    top = max((s.score for s in scores), default=0.0)
    unit_of = {id(site): s for s in scores for site in s.unit.sites}
    index = {id(s): i for i, s in enumerate(report.residuals)}
    yield f'<text class="lane-sub" x="10" y="{TOP}">depth order \u2192</text>'
    ends = {}
    for stream in report.streams:
        y = lane_y[stream.index]
        cols = [column[id(s)] for s in stream.sites]
        x0, x1 = _x(min(cols)) - 14, _x(max(cols)) + BOX_W + 14
        ends[stream.index] = (x1, y + BOX_H // 2)
        mid = y + BOX_H // 2
        sub = f"{norm_text(stream.norm)} \u00b7 {plural(len(stream.sites), 'site')}"
        extra = _stream_groups(report, stream)
        yield f'<g class="lane" data-stream="{stream.index}">'
        yield f"<title>{esc(f'stream {stream.index}: {stream.input.name} -> {stream.output.name}')}</title>"
        yield f'<text class="lane-label" x="10" y="{mid - 6}">stream {stream.index}</text>'
        yield f'<text class="lane-sub" x="10" y="{mid + 9}">{esc(sub)}</text>'
        if extra:
            yield f'<text class="lane-sub" x="10" y="{mid + 23}">{esc(extra)}</text>'
        yield f'<line class="lane-line" x1="{x0}" y1="{mid}" x2="{x1}" y2="{mid}"/>'
        yield f'<circle class="lane-line" cx="{x0}" cy="{mid}" r="3"/>'
        yield f'<path class="lane-line" d="M{x1} {mid - 6} L{x1 + 8} {mid} L{x1} {mid + 6} Z"/>'
        yield f'<text class="io" x="{x0}" y="{y - 5}">in: {esc(clip(stream.input.name, 28))}</text>'
        yield f'<text class="io" x="{x1 + 12}" y="{mid + 4}">out: {esc(clip(stream.output.name, 24))}</text>'
        bar_y = y + BOX_H + 4 + (BAR_H + 4) * (report.groups is not None)
        for site in stream.sites:
            score = unit_of.get(id(site))
            score_text = score and _score_label(score, ranks[id(score)], len(scores), report.metric)
            x = _x(column[id(site)])
            yield from _site(site, index[id(site)], x, y, groups.get(id(site)), score_text)
        for score in scores:
            if score.unit.stream == stream.index:
                yield from _unit_bar(score, ranks[id(score)], len(scores), top, report.metric, column, bar_y)
        yield "</g>"
    # Each stream is joined to the latest earlier stream that feeds it (ResNet stages: a chain).
    last = {st.index: max(column[id(s)] for s in st.sites) for st in report.streams}
    for b in report.streams:
        first = min(column[id(s)] for s in b.sites)
        earlier = sorted((a for a in report.streams if last[a.index] < first), key=lambda a: -last[a.index])
        a = next((a for a in earlier if _reaches(a.output, b.input)), None)
        if a is not None:
            (xa, ya), xb, yb = ends[a.index], _x(first) - 14, lane_y[b.index] + BOX_H // 2
            yield f'<path class="link" d="M{xa + 8} {ya} C{xa + 40} {ya} {xb - 40} {yb} {xb} {yb}"/>'


def render_svg(report, title: str) -> str:
    """A standalone SVG of the lanes, with its own style (for papers and READMEs)."""
    width, height = canvas_size(report)
    body = "\n".join(lanes(report))
    if not report.residuals:
        body = f'<text class="lane-label" x="10" y="{TOP + 20}">no residual sites found</text>'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lanes" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">\n<title>{esc(title)}</title>\n'
        f"<style>{STYLE}</style>\n{body}\n</svg>\n"
    )
