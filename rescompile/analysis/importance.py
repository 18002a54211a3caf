"""Depth units and how much each one matters, measured on calibration inputs.

A *unit* is what depth pruning removes: one residual branch (`out = skip + branch` becomes
`out = skip`), or a block, the consecutive branches of one layer (attention + MLP of a
transformer layer) whose whole update is removed: the block's exit is replaced by its entry.
Sites belong to one block when their weights sit under the same numbered module
(`h.3.attn`, `h.3.mlp` -> `h.3`); where parameters carry no such names, a site is its own block.

Scores are computed from values the graph computes, read through a `probe` callable
(`rescompile.frontends.probe.probe` bound to calibration batches), so analysis does not run
models itself. Lower scores mean "removing it changes less" for every metric:
- `bi`: block influence, 1 - cos(entry, exit) per token (ShortGPT, Men et al. 2024);
- `angular`: arccos(cos(entry of unit l, exit of unit l+n-1)) / pi per token, for runs of n
  consecutive units of one stream (Gromov et al. 2024);
- `norm`: ||exit - entry|| / ||entry|| per token: the unit's update relative to the stream;
- `greedy`: relative L2 change of the model's outputs with the unit switched off (SLEB's
  procedure, Song et al. 2024, with an output-change criterion), re-measured after each pick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from rescompile.analysis.residuals import ResidualAnalysis, ResidualSite
from rescompile.ir import Node, OpKind, Value
from rescompile.ir._graphview import data_inputs
from rescompile.ir.ops import Contract, axis_map

__all__ = [
    "METRICS",
    "DepthUnit",
    "UnitScore",
    "depth_units",
    "score_units",
    "best_run",
    "greedy_order",
    "combined_bypass",
]

METRICS = ("bi", "angular", "greedy", "norm")

Probe = Callable[..., Iterator[list[np.ndarray]]]
"""probe(values, bypass=None) -> per batch, the arrays of `values`."""


@dataclasses.dataclass(frozen=True, eq=False)
class DepthUnit:
    """One removable unit: its sites (consecutive, one stream), the stream value it reads
    (`entry`) and the value the stream continues with after it (`exit`).

    `bypass` is what switching the unit off means: readers of each key read its value.
    """

    name: str
    sites: tuple[ResidualSite, ...]
    entry: Value
    exit: Value
    stream: int
    index: int  # position among the stream's units
    kind: str = "block"  # "branch" or "block"

    @property
    def per_branch(self) -> bool:
        """Branch units, and blocks with a projection site (which keeps its shortcut,
        `out = proj(x)`), are removed one branch at a time: each `out = skip + branch`
        becomes `out = skip`. Other blocks are removed whole: the exit becomes the entry."""
        return self.kind == "branch" or any(s.kind == "projection" for s in self.sites)

    @property
    def baseline(self) -> Value:
        """What the stream holds in place of `exit` once the unit is gone (for a projection
        site, its shortcut `proj(x)`); metrics compare it with `exit`."""
        return self.sites[-1].skip if self.per_branch else self.entry

    @property
    def bypass(self) -> dict[Value, Value]:
        """Switching the unit off: readers of each key read its value instead."""
        if self.per_branch:
            return {s.output: s.skip for s in self.sites}
        return {self.exit: self.entry}

    @property
    def params(self) -> int:
        return sum(s.branch_params for s in self.sites)

    def to_json(self) -> dict:
        return {
            "unit": self.name,
            "sites": [s.name for s in self.sites],
            "stream": self.stream,
            "index": self.index,
            "params": self.params,
        }


@dataclasses.dataclass(frozen=True)
class UnitScore:
    unit: DepthUnit
    score: float

    def to_json(self) -> dict:
        return {**self.unit.to_json(), "score": self.score}


def _numbered_prefixes(name: str) -> set[str]:
    """`h.0.attn.c_attn.weight` -> {"h.0"}; `features.1.0.mlp.0.weight` -> {"features.1",
    "features.1.0", "features.1.0.mlp.0"}."""
    parts = name.split(".")
    return {".".join(parts[: i + 1]) for i, part in enumerate(parts[:-1]) if part.isdigit()}


def _block_key(site: ResidualSite) -> str | None:
    """The deepest numbered module holding all of the site's weights (`transformer.h.3`)."""
    common: set[str] | None = None
    for node in site.weighted:
        for value in node.inputs:
            if value is not None and value.producer is None and value.graph is not None:
                if value.graph.initializers.get(value.name) is value:
                    prefixes = _numbered_prefixes(value.name)
                    common = prefixes if common is None else common & prefixes
    return max(common, key=len) if common else None


def _blocks(sites: list[ResidualSite]) -> list[list[ResidualSite]]:
    """Consecutive sites of one layer. By weight names where every site has a numbered module
    (`h.3`); else by structure: a layer starts at each branch that attends (multiplies two
    activations, as q @ k^T does) and takes the branches after it that do not (the MLP)."""
    keys = [_block_key(site) for site in sites]
    groups: list[list[ResidualSite]] = []
    if all(keys):
        for site, key in zip(sites, keys):
            if groups and _block_key(groups[-1][-1]) == key:
                groups[-1].append(site)
            else:
                groups.append([site])
        return groups
    attends = [_attends(site) for site in sites]
    for site, starts in zip(sites, attends):
        if groups and not starts and any(attends) and _attends(groups[-1][0]):
            groups[-1].append(site)
        else:
            groups.append([site])
    return groups


def _attends(site: ResidualSite) -> bool:
    for node in site.nodes:
        amap = axis_map(node)
        for mix in amap.mixes if amap is not None else ():
            if isinstance(mix, Contract) and all(_is_activation(node.inputs[i]) for i, _ in mix.operands):
                return True
    return False


def _is_activation(value: Value | None) -> bool:
    graph = value.graph if value is not None else None
    return value is not None and graph is not None and graph.initializers.get(value.name) is not value


def _after_post_norm(site: ResidualSite) -> Value:
    """The normed value a post-norm site's stream continues with (out -> norm(out)): after one
    norm node (torch's rms_norm, ONNX's LayerNormalization) or a norm written out in elementwise
    ops and a reduction (ONNX's RMSNorm), so that both frontends end the block at the same place."""
    value = plain = site.output  # plain: reached through casts and identities only
    while len(value.consumers()) == 1 and not value.is_graph_output:
        node = value.consumers()[0]
        # A parameter-free activation before the norm (`N(relu(x + F x))`) is on the way, as
        # detection's post-norm mark has it: ONNX's written-out norm takes it in as well, so
        # torch's one norm node must end the block after it too (a fuzz finding).
        unary = node.kind is OpKind.ACTIVATION and len(data_inputs(node)) == 1
        if not (unary or node.kind in (OpKind.NORM, OpKind.CAST, OpKind.IDENTITY)) or len(node.outputs) != 1:
            break
        value = node.outputs[0]
        if node.kind is OpKind.NORM:
            return value
        if plain is node.inputs[0] and not unary:
            plain = value
    return _written_out_norm_end(value) or _written_out_norm_end(plain) or plain


_NORM_PARTS = frozenset(
    {OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.ACTIVATION, OpKind.REDUCE, OpKind.CAST}
)


def _constant(value: Value | None) -> bool:
    return (
        value is None
        or value.is_initializer
        or (value.producer is not None and value.producer.kind is OpKind.CONSTANT)
    )


def _per_channel(value: Value | None) -> bool:
    """A constant with more than one element along some axis (a norm's gain or bias)."""
    return value is not None and _constant(value) and bool(value.shape) and any(d != 1 for d in value.shape)


def _written_out_norm_end(start: Value, limit: int = 16) -> Value | None:
    """Where a norm written out from `start` ends (see `written_out_norm`), or None."""
    found = written_out_norm(start, limit)
    return found[0] if found else None


def written_out_norm(
    start: Value, limit: int = 16, within: Collection[Node] | None = None
) -> tuple[Value, list[Node]] | None:
    """A norm written out from `start`: its end and its nodes. The ops reading `start`
    (elementwise ones and a reduction, other inputs constant) join again into one value after a
    reduction rejoined the unreduced tensor (x * rsqrt(mean(x^2)), x - mean(x)), then through a
    per-channel affine (a multiply, an add of constants). `within`: only these readers count (a
    branch's norm, where `start` is a fork other branches also read). None when `start` does not
    begin such a pattern."""
    order = start.graph.node_order() if start.graph is not None else None
    if order is None or start.is_graph_output:
        return None

    def readers(value: Value) -> list[Node]:
        return [c for c in value.consumers() if within is None or c in within]

    reached, live, nodes, reduced, end, affine = {start}, {start}, [], False, None, []
    pending = sorted(set(readers(start)), key=order.__getitem__)
    while pending and len(nodes) < limit:
        node = pending.pop(0)
        ins = [v for v in node.inputs if v is not None]
        if node.kind not in _NORM_PARTS or len(node.outputs) != 1:
            break
        if any(v not in reached and not _constant(v) for v in ins):
            break
        nodes.append(node)
        reduced = reduced or node.kind is OpKind.REDUCE
        out = node.outputs[0]
        reached.add(out)
        live = {v for v in live | {out} if v.is_graph_output or any(c not in nodes for c in readers(v))}
        if reduced and live == {out} and node.kind is not OpKind.REDUCE:
            if end is not None:
                affine.append(node.kind)
            end = (out, list(nodes))  # everything read so far joined into one value: the norm's end
            if len(readers(out)) != 1 or out.is_graph_output:
                break
            nxt = readers(out)[0]
            # The affine is one gain then one bias, per channel: a further multiply or a scalar
            # (a scaling between blocks, which torch keeps outside its norm) is the stream's.
            if not (
                nxt.kind in (OpKind.MUL, OpKind.ADD)
                and nxt.kind not in affine
                and OpKind.ADD not in affine
                and all(v is out or _per_channel(v) for v in nxt.inputs)
            ):
                break  # past the affine: the stream goes on
        pending = sorted({c for v in live for c in readers(v) if c not in nodes}, key=order.__getitem__)
    return end


def depth_units(analysis: ResidualAnalysis, unit: str = "block") -> list[DepthUnit]:
    """The units of every stream, in stream then depth order.

    With unit="block", the sites of one layer form a unit (see `_blocks`); its exit is the
    next site's fork (so a post-norm layer's last norm belongs to it), or for a
    stream's last site its output (after the norm that follows a post-norm site).
    """
    units: list[DepthUnit] = []
    for stream in analysis.streams:
        sites = list(stream.sites)
        groups = [[site] for site in sites] if unit == "branch" else _blocks(sites)
        for index, group in enumerate(groups):
            last = group[-1]
            position = sites.index(last)
            if unit == "branch":
                exit = last.output
            elif position + 1 < len(sites):
                exit = sites[position + 1].fork
            else:
                exit = _after_post_norm(last) if last.norm == "post" else last.output
            key = _block_key(group[0]) if unit == "block" else None
            name = key if key is not None and all(_block_key(s) == key for s in group) else last.name
            units.append(DepthUnit(name, tuple(group), group[0].fork, exit, stream.index, index, unit))
    return units


def _channels_last(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis]).astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.clip(num / np.maximum(den, 1e-30), -1.0, 1.0)


def score_units(
    units: Sequence[DepthUnit],
    metric: str,
    probe: Probe,
    *,
    channel_axis: Callable[[Value], int],
    run: int = 1,
    outputs: Sequence[Value] = (),
    token_masks: Sequence[np.ndarray | None] = (),
) -> list[UnitScore]:
    """Each unit's score (for `angular` with run > 1: the run starting at the unit; units
    that start no full run of their stream score inf). `greedy` scores each unit alone,
    against the model's `outputs`. Per-token metrics compare vectors along `channel_axis(v)`;
    `token_masks[b]` (batch b's attention mask, 1 for real tokens) leaves padding out of the
    average where its size matches the tokens of a value (a padded batch would otherwise weigh
    in positions no sentence has)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if metric == "greedy":
        return [UnitScore(u, c) for u, c in zip(units, _output_changes(units, [], probe, outputs))]
    pairs: list[tuple[Value, Value]] = []
    for i, unit in enumerate(units):
        if metric == "angular":
            end = i + run - 1
            if end >= len(units) or units[end].stream != unit.stream:
                pairs.append((None, None))
                continue
            pairs.append((unit.baseline, units[end].exit))
        else:
            pairs.append((unit.baseline, unit.exit))
    values = list(dict.fromkeys(v for pair in pairs for v in pair if v is not None))
    position = {v: k for k, v in enumerate(values)}
    axes = [channel_axis(v) for v in values]
    sums = np.zeros(len(pairs))
    counts = np.zeros(len(pairs))
    for b, arrays in enumerate(probe(values)):
        flat = [_channels_last(a, ax) for a, ax in zip(arrays, axes)]
        mask = token_masks[b] if b < len(token_masks) else None
        for i, (a, b) in enumerate(pairs):
            if a is None:
                continue
            x, y = flat[position[a]], flat[position[b]]
            if x.shape != y.shape:  # a run across a change of width or resolution
                counts[i] = 0
                sums[i] = np.inf
                continue
            if metric == "norm":
                part = np.linalg.norm(y - x, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-30)
            elif metric == "bi":
                part = 1.0 - _cosine(x, y)
            else:
                part = np.arccos(_cosine(x, y)) / np.pi
            weight = (
                mask.reshape(-1).astype(np.float64) if mask is not None and mask.size == part.size else None
            )
            sums[i] += part.sum() if weight is None else (part * weight).sum()
            counts[i] += part.size if weight is None else weight.sum()
    scores = [float(s / c) if c and np.isfinite(s) else float("inf") for s, c in zip(sums, counts)]
    return [UnitScore(u, s) for u, s in zip(units, scores)]


def _resolve(bypass: Mapping[Value, Value]) -> dict[Value, Value]:
    """Follow chains (a removed unit reading another removed unit's exit) to the kept value."""
    out = {}
    for old in bypass:
        new = bypass[old]
        while new in bypass:
            new = bypass[new]
        out[old] = new
    return out


def combined_bypass(units: Iterable[DepthUnit]) -> dict[Value, Value]:
    merged: dict[Value, Value] = {}
    for unit in units:
        merged.update(unit.bypass)
    return _resolve(merged)


def _output_changes(
    candidates: Sequence[DepthUnit],
    removed: Sequence[DepthUnit],
    probe: Probe,
    outputs: Sequence[Value],
    reference: Sequence[np.ndarray] | None = None,
) -> list[float]:
    """Relative L2 change of the outputs with `removed` plus each candidate switched off.

    Only the output elements the model itself computes finitely count (`reference`: its flat
    outputs per batch, else probed here): an eps-0 norm of an all-zero row is NaN before any
    removal, says nothing about a unit, and would make every change NaN (and `argmin` pick the
    first unit). A removal that makes one of the counted elements non-finite changes them
    without bound: inf, as is every change when no element counts (nothing to measure)."""
    if reference is None:
        reference = _flat_outputs(probe, outputs)
    masks = [np.isfinite(ref) for ref in reference]
    if not any(mask.any() for mask in masks):
        return [float("inf")] * len(candidates)
    kept = [ref[mask].astype(np.float64) for ref, mask in zip(reference, masks)]
    den = sum(float(np.sum(ref**2)) for ref in kept)
    changes = []
    for unit in candidates:
        bypass = combined_bypass([*removed, unit])
        num = 0.0
        for ref, mask, got in zip(kept, masks, _flat_outputs(probe, outputs, bypass)):
            got = got[mask].astype(np.float64)
            if not np.isfinite(got).all():
                num = float("inf")
                break
            num += float(np.sum((got - ref) ** 2))
        changes.append(float(np.sqrt(num / max(den, 1e-30))))
    return changes


def _flat_outputs(
    probe: Probe, outputs: Sequence[Value], bypass: Mapping[Value, Value] | None = None
) -> list[np.ndarray]:
    """Per batch, every output's elements in one flat array."""
    return [np.concatenate([a.ravel() for a in arrays]) for arrays in probe(list(outputs), bypass=bypass)]


def greedy_order(
    units: Sequence[DepthUnit], count: int, probe: Probe, outputs: Sequence[Value], *, progress=None
) -> list[UnitScore]:
    """Pick `count` units one at a time, each the one whose removal (with the earlier picks)
    changes the outputs least; returns the picks with the change after each. Raises ValueError
    (with the reason) when no pick has a finite change: the model's outputs are nowhere finite
    on the calibration inputs, or every removal left makes finite outputs non-finite."""
    reference = _flat_outputs(probe, outputs)
    if not any(np.isfinite(ref).any() for ref in reference):
        raise ValueError("the model's outputs are not finite anywhere on the calibration inputs")
    removed: list[UnitScore] = []
    left = list(units)
    for _ in range(count):
        changes = _output_changes(left, [s.unit for s in removed], probe, outputs, reference)
        best = int(np.argmin(changes))
        if not np.isfinite(changes[best]):
            raise ValueError(
                f"removing any of the {len(left)} units left{' after the earlier picks' if removed else ''} "
                "makes outputs that the model computes finitely on the calibration inputs non-finite"
            )
        removed.append(UnitScore(left.pop(best), changes[best]))
        if progress is not None:
            progress()
    return removed


def best_run(scores: Sequence[UnitScore], run: int) -> list[DepthUnit]:
    """The `run` consecutive units (one stream) starting at the unit with the lowest score."""
    start = min(range(len(scores)), key=lambda i: scores[i].score)
    if not np.isfinite(scores[start].score):
        raise ValueError(f"no stream has {run} consecutive units")
    return [s.unit for s in scores[start : start + run]]
