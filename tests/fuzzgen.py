"""Random residual models that know their own residual sites: the fuzzer's generator.

A model is drawn (`programs()`, a hypothesis strategy) as a `Program`: ops in SSA form with
numpy weights, built through `Builder`, which records the ground truth as it goes (`Site`:
the add's name, kind, which operand is the skip, stream, depth and norm placement).
`to_onnx` writes the program as an ONNX graph with onnx.helper; `to_torch` builds an
nn.Module that runs the same ops with real nn.Linear / Conv2d / LayerNorm / RMSNorm /
BatchNorm2d / Embedding modules holding the same weights, so the two frontends see one model.

What is drawn: one or two chains, each on its own input (token ids, token features or an
image); per chain one to three segments of one to three blocks; between segments a weighted
transition (linear or strided conv), a projection block (the shortcut is a linear or a 1x1
conv) or an add of an unrelated tensor; norm placement per segment (pre, post, none, mixed),
LayerNorm, RMSNorm (module or decomposed) or BatchNorm, optional post-activation or scaling
between blocks; or a segment of transformer layers (an attention block then an MLP block, both
pre-norm as GPT-2 and LLaMA or both post-norm as BERT: the two-branch layers of parallel,
macaron and ladder; every segment of a token chain in the "layers" style). Branches: MLP
(linear + activation), GLU (split), concatenated linears, a bare parameter matmul, attention
with heads, grouped KV heads, fused or separate QKV, no / causal (constant) / full-shape input
mask, explicit or scaled_dot_product_attention, MLPs sharing the weights of an earlier MLP of
their chain (ALBERT-style); conv blocks: basic (grouped), bottleneck (grouped or depthwise),
depthwise-separable. Adds that are not residual: bias adds (linear in ONNX is MatMul + Add),
positional embeddings, attention masks, GELU's `1 + erf`, RMSNorm's `+ eps`, a conditioning
input, and the sum of two chains.

Ground truth rules (the documented analysis, restated for what is generated): every block add
is a site; identity when the skip is the block input, projection when the skip is a weighted
shortcut; a projection block or a weighted transition or an unrelated add starts a new stream;
a site is "pre" when its branch normalises before its first weighted op, else "post" when its
output reaches a norm through parameter-free ops before any weighted op, else "none".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

__all__ = ["Op", "Site", "Program", "Builder", "STYLES", "programs", "to_onnx", "to_torch", "feeds", "OPSET"]

OPSET = 20  # Gelu
BATCH = 2
VOCAB = 7
ACTS = ("relu", "gelu", "silu", "tanh", "sigmoid")
NORM_OPS = ("layernorm", "rmsnorm", "batchnorm")


@dataclasses.dataclass
class Op:
    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    name: str
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Site:
    """A residual add the generator made: what `inspect` must report."""

    name: str
    kind: str  # identity | projection
    skip_index: int
    stream: int
    depth: int
    norm: str  # pre | post | none


@dataclasses.dataclass
class Input:
    vid: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | int64
    symbolic_batch: bool


@dataclasses.dataclass
class Program:
    inputs: list[Input]
    ops: list[Op]
    outputs: list[int]
    shapes: dict[int, tuple[int, ...]]
    sites: list[Site]
    eps_zero: bool  # every norm has eps = 0 (decay/deepnorm compensation is exact only then)
    summary: list[str]

    def __repr__(self) -> str:
        return "Program(" + "; ".join(self.summary) + ")"

    def _repr_pretty_(self, printer, cycle) -> None:
        """The summary in hypothesis's reports (not every op and weight: @reproduce_failure
        replays an example exactly)."""
        printer.text(repr(self))


class Builder:
    """Records ops, weights and the ground truth. Value ids are ints; shapes are concrete."""

    def __init__(self, seed: int, symbolic_batch: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.symbolic_batch = symbolic_batch
        self.inputs: list[Input] = []
        self.ops: list[Op] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.summary: list[str] = []
        self._next = 0
        self._names: dict[str, int] = {}
        self._sites: list[dict] = []  # name, kind, skip_index, stream key, pre, post
        self._streams: dict[int, list[int]] = {}  # stream key -> site indices
        self._stream_key = -1
        self.eps_zero = True
        # Values that are a site's output seen through parameter-free unary ops: a norm reading
        # one of them makes that site post-norm (when it is not pre-norm).
        self._from_site: dict[int, int] = {}

    # ----- values and ops --------------------------------------------------------------------
    def _value(self, shape) -> int:
        self._next += 1
        self.shapes[self._next] = tuple(int(d) for d in shape)
        return self._next

    def _name(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return f"{base}{n}"

    def _op(self, kind, inputs, shapes, *, name=None, attrs=None, weights=None, unary=False):
        outs = tuple(self._value(s) for s in shapes)
        op = Op(kind, tuple(inputs), outs, name or self._name(kind), attrs or {}, weights or {})
        self.ops.append(op)
        if unary and inputs[0] in self._from_site:
            for out in outs:
                self._from_site[out] = self._from_site[inputs[0]]
        return outs if len(outs) > 1 else outs[0]

    def weight(self, *shape, scale: float | None = None) -> np.ndarray:
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        for d in shape[2:]:
            fan_in *= d
        s = scale if scale is not None else 1.0 / math.sqrt(max(fan_in, 1))
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def input(self, name: str, shape, dtype: str = "float32") -> int:
        vid = self._value(shape)
        self.inputs.append(Input(vid, name, tuple(shape), dtype, self.symbolic_batch))
        return vid

    # ----- weighted ops ----------------------------------------------------------------------
    def linear(self, x: int, out: int, bias: bool = True, tie: str | None = None) -> int:
        """x W^T + b; with `tie`, the weights of the earlier linear op named so (shared weights)."""
        shape = self.shapes[x]
        if tie is not None:
            return self._op("linear", [x], [shape[:-1] + (out,)], attrs={"tie": tie, "bias": bias})
        w = {"weight": self.weight(out, shape[-1])}
        if bias:
            w["bias"] = self.weight(out, scale=0.1)
        return self._op("linear", [x], [shape[:-1] + (out,)], attrs={"bias": bias}, weights=w)

    def matmul_w(self, x: int, out: int) -> int:
        shape = self.shapes[x]
        return self._op(
            "matmul_w", [x], [shape[:-1] + (out,)], weights={"weight": self.weight(shape[-1], out)}
        )

    def conv(self, x: int, out: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = False) -> int:
        b, c, h, w = self.shapes[x]
        pad = k // 2
        size = [(d + 2 * pad - k) // stride + 1 for d in (h, w)]
        weights = {"weight": self.weight(out, c // groups, k, k)}
        if bias:
            weights["bias"] = self.weight(out, scale=0.1)
        attrs = {"k": k, "stride": stride, "groups": groups, "pad": pad}
        return self._op("conv", [x], [(b, out, *size)], attrs=attrs, weights=weights)

    def embed(self, ids: int, dim: int) -> int:
        return self._op(
            "embed",
            [ids],
            [self.shapes[ids] + (dim,)],
            weights={"weight": self.weight(VOCAB, dim, scale=1.0)},
        )

    # ----- norms and activations -------------------------------------------------------------
    def _norm(self, kind: str, x: int, eps: float, weights: dict, attrs: dict | None = None) -> int:
        self.eps_zero = self.eps_zero and eps == 0.0
        site = self._from_site.get(x)
        if site is not None:
            self._sites[site]["post"] = True
        return self._op(
            kind, [x], [self.shapes[x]], attrs={"eps": eps, **(attrs or {})}, weights=weights, unary=True
        )

    def layernorm(self, x: int, eps: float) -> int:
        d = self.shapes[x][-1]
        weights = {"weight": 1 + self.weight(d, scale=0.1), "bias": self.weight(d, scale=0.1)}
        return self._norm("layernorm", x, eps, weights)

    def rmsnorm(self, x: int, eps: float, style: str) -> int:
        d = self.shapes[x][-1]
        return self._norm("rmsnorm", x, eps, {"weight": 1 + self.weight(d, scale=0.1)}, {"style": style})

    def batchnorm(self, x: int, eps: float) -> int:
        c = self.shapes[x][1]
        weights = {
            "weight": 1 + self.weight(c, scale=0.1),
            "bias": self.weight(c, scale=0.1),
            "mean": self.weight(c, scale=0.1),
            "var": (1 + np.abs(self.weight(c, scale=0.2))).astype(np.float32),
        }
        return self._norm("batchnorm", x, eps, weights)

    def norm(self, kind: str, x: int, eps: float, rms_style: str = "module") -> int:
        if kind == "batchnorm":
            return self.batchnorm(x, eps)
        if kind == "rmsnorm":
            return self.rmsnorm(x, eps, rms_style)
        return self.layernorm(x, eps)

    def act(self, x: int, fn: str, manual: bool = False) -> int:
        """`manual` writes gelu and silu out of elementary ops in both forms (else: one op each,
        except ONNX's silu, which has no op: x * sigmoid(x))."""
        return self._op("act", [x], [self.shapes[x]], attrs={"fn": fn, "manual": manual}, unary=True)

    def scale(self, x: int, c: float) -> int:
        return self._op("scale", [x], [self.shapes[x]], attrs={"c": c}, unary=True)

    def mean(self, x: int, axes: tuple[int, ...]) -> int:
        shape = tuple(d for i, d in enumerate(self.shapes[x]) if i not in axes)
        return self._op("mean", [x], [shape], attrs={"axes": axes}, unary=True)

    # ----- layout and elementwise ------------------------------------------------------------
    def add(self, a: int, b: int, name: str | None = None) -> int:
        return self._op("add", [a, b], [self.shapes[a]], name=name or self._name("add"))

    def add_param(self, x: int, shape) -> int:
        return self._op("add_param", [x], [self.shapes[x]], weights={"p": self.weight(*shape, scale=0.5)})

    def mul(self, a: int, b: int) -> int:
        return self._op("mul", [a, b], [self.shapes[a]])

    def split(self, x: int, sizes: list[int]) -> tuple[int, ...]:
        shape = self.shapes[x]
        outs = self._op("split", [x], [shape[:-1] + (s,) for s in sizes], attrs={"sizes": tuple(sizes)})
        return outs if isinstance(outs, tuple) else (outs,)

    def concat(self, xs: list[int]) -> int:
        shape = self.shapes[xs[0]]
        total = sum(self.shapes[x][-1] for x in xs)
        return self._op("concat", xs, [shape[:-1] + (total,)])

    def heads(self, x: int, h: int) -> int:
        b, t, d = self.shapes[x]
        return self._op("heads", [x], [(b, h, t, d // h)], attrs={"h": h, "dh": d // h})

    def repeat_kv(self, x: int, rep: int, style: str) -> int:
        b, h, t, dh = self.shapes[x]
        return self._op("repeat_kv", [x], [(b, h * rep, t, dh)], attrs={"rep": rep, "style": style})

    def merge_heads(self, x: int) -> int:
        b, h, t, dh = self.shapes[x]
        return self._op("merge_heads", [x], [(b, t, h * dh)])

    def attention(self, q: int, k: int, v: int, mask: int | None, causal: bool, style: str) -> int:
        t = self.shapes[q][2]
        weights = {}
        if causal:
            weights["causal"] = np.triu(np.full((t, t), -1e9, np.float32), 1)
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        shape = self.shapes[q][:3] + self.shapes[v][3:]  # the values' head width (pruned: not q's)
        return self._op("attention", inputs, [shape], attrs={"style": style}, weights=weights)

    # ----- ground truth ----------------------------------------------------------------------
    def new_stream(self) -> None:
        self._stream_key += 1

    def residual(self, skip: int, branch: int, kind: str, pre: bool, skip_first: bool) -> int:
        name = self._name("res")
        index = len(self._sites)
        self._sites.append({"name": name, "kind": kind, "pre": pre, "post": False, "key": self._stream_key})
        self._sites[-1]["skip_index"] = 0 if skip_first else 1
        self._streams.setdefault(self._stream_key, []).append(index)
        out = self.add(skip, branch, name) if skip_first else self.add(branch, skip, name)
        self._from_site[out] = index
        return out

    def finish(self, outputs: list[int]) -> Program:
        order = {key: i for i, key in enumerate(self._streams)}  # streams in order of first site
        sites = []
        for i, s in enumerate(self._sites):
            depth = self._streams[s["key"]].index(i)
            norm = "pre" if s["pre"] else "post" if s["post"] else "none"
            sites.append(Site(s["name"], s["kind"], s["skip_index"], order[s["key"]], depth, norm))
        return Program(self.inputs, self.ops, outputs, self.shapes, sites, self.eps_zero, self.summary)


# ----- the strategy ----------------------------------------------------------------------------
_WIDTHS = (4, 6, 8, 12)
_MLPS = ("mlp", "glu", "cat")  # a transformer layer's second branch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _norm_kind(draw, image: bool):
    if image:
        return "batchnorm", "module"
    kind = draw(st.sampled_from(("layernorm", "rmsnorm")))
    return kind, draw(st.sampled_from(("module", "manual"))) if kind == "rmsnorm" else "module"


class _Chain:
    """Draws one chain; holds what its blocks share (norm kind, eps, masks by head count)."""

    def __init__(self, draw, b: Builder, index: int, image: bool, style: str | None) -> None:
        self.draw, self.b, self.index, self.image, self.style = draw, b, index, image, style
        self.norm_kind, self.rms_style = draw(_norm_kind(image))
        self.eps = draw(st.sampled_from((0.0, 1e-5)))
        self.masks: dict[int, int] = {}
        self.tied = draw(st.booleans())
        self.mlps: dict[tuple, tuple[str, str]] = {}

    def norm(self, x: int) -> int:
        return self.b.norm(self.norm_kind, x, self.eps, self.rms_style)

    # ----- token branches --------------------------------------------------------------------
    def token_branch(self, h: int, out_width: int, projection: bool, kind: str | None = None) -> int:
        """A token branch of the drawn kind, or of `kind` (a layer's attention or MLP)."""
        draw, b = self.draw, self.b
        # A bare matmul beside a linear shortcut would make `W1 x + W2 x`: either side can be
        # the shortcut (the analysis takes the cheaper one), so projection blocks do not draw it.
        kinds = ("mlp", "glu", "cat", "attention") + (() if projection else ("matmul",))
        if kind is None:  # drawn here only, so that a fixed kind adds no draw to the old examples
            kind = draw(st.sampled_from(kinds))
        self.b.summary[-1] += f" {kind}"
        hidden = draw(st.sampled_from((4, 8, 12)))
        act, manual = draw(st.sampled_from(ACTS)), draw(st.booleans())
        bias = draw(st.booleans())
        if kind == "mlp":
            key = (b.shapes[h][-1], hidden, out_width, bias)
            if self.tied and key in self.mlps:  # the weights of an earlier MLP of this chain (ALBERT)
                first, second = self.mlps[key]
                self.b.summary[-1] += " (tied)"
                return b.linear(b.act(b.linear(h, hidden, bias, first), act, manual), out_width, bias, second)
            y = b.linear(h, hidden, bias)
            first = b.ops[-1].name
            y = b.linear(b.act(y, act, manual), out_width, bias)
            self.mlps[key] = (first, b.ops[-1].name)
            return y
        if kind == "glu":
            gate, up = b.split(b.linear(h, 2 * hidden, bias), [hidden, hidden])
            return b.linear(b.mul(b.act(gate, act, manual), up), out_width, bias)
        if kind == "cat":
            parts = [b.linear(h, hidden, bias), b.linear(h, draw(st.sampled_from((2, 4))), bias)]
            return b.linear(b.act(b.concat(parts), act, manual), out_width, bias)
        if kind == "matmul":  # ending in an activation: compensation and fold refuse it
            y = b.matmul_w(h, out_width)
            # A written-out GELU here ends the branch in `* 0.5`: an initializer in ONNX, a Python
            # number in torch (tests/test_fuzz.py::test_regression_branch_ending_in_a_constant_multiply).
            return b.act(y, act, manual) if draw(st.booleans()) else y
        return self.attention(h, out_width, bias)

    def attention(self, h: int, out_width: int, bias: bool) -> int:
        draw, b = self.draw, self.b
        heads = draw(st.sampled_from((1, 2, 4)))
        kv = draw(st.sampled_from(_divisors(heads)))
        dh = draw(st.sampled_from((2, 4)))
        if draw(st.booleans()):  # fused QKV, split
            q, k, v = b.split(b.linear(h, (heads + 2 * kv) * dh, bias), [heads * dh, kv * dh, kv * dh])
        else:
            q, k, v = (b.linear(h, n * dh, bias) for n in (heads, kv, kv))
        q, k, v = b.heads(q, heads), b.heads(k, kv), b.heads(v, kv)
        if kv != heads:
            style = draw(st.sampled_from(("interleave", "expand")))
            k, v = b.repeat_kv(k, heads // kv, style), b.repeat_kv(v, heads // kv, style)
        mask_kind = draw(st.sampled_from(("none", "causal", "input")))
        mask = None
        if mask_kind == "input":
            if heads not in self.masks:
                t = b.shapes[h][1]
                self.masks[heads] = b.input(f"mask{self.index}_{heads}", (BATCH, heads, t, t))
            mask = self.masks[heads]
        style = draw(st.sampled_from(("manual", "sdpa")))
        b.summary[-1] += f"(h{heads}/kv{kv} {mask_kind} {style})"
        o = b.attention(q, k, v, mask, mask_kind == "causal", style)
        return b.linear(b.merge_heads(o), out_width, bias)

    # ----- conv branches ---------------------------------------------------------------------
    def conv_branch(self, h: int, out_ch: int, stride: int) -> int:
        draw, b = self.draw, self.b
        c = b.shapes[h][1]
        kind = draw(st.sampled_from(("basic", "bottleneck", "separable")))
        b.summary[-1] += f" {kind}"
        act = draw(st.sampled_from(ACTS))
        manual = draw(st.booleans())
        if kind == "basic" or stride != 1 or out_ch != c:
            groups = draw(st.sampled_from([g for g in _divisors(c) if out_ch % g == 0]))
            y = b.act(b.batchnorm(b.conv(h, out_ch, 3, stride, groups), self.eps), act)
            return b.batchnorm(b.conv(y, out_ch, 3), self.eps)
        if kind == "bottleneck":
            mid = draw(st.sampled_from((2, 4, 6)))
            groups = draw(st.sampled_from(_divisors(mid)))
            y = b.act(b.batchnorm(b.conv(h, mid, 1), self.eps), act)
            y = b.act(b.batchnorm(b.conv(y, mid, 3, 1, groups), self.eps), act)
            return b.batchnorm(b.conv(y, c, 1), self.eps)
        k = draw(st.sampled_from((3, 5)))
        y = b.batchnorm(b.conv(h, c, k, 1, c), self.eps)  # depthwise
        y = b.act(b.conv(y, 2 * c, 1, bias=True), act, manual)
        return b.conv(y, c, 1, bias=True)

    # ----- blocks ----------------------------------------------------------------------------
    def block(
        self,
        x: int,
        placement: str,
        glue: str,
        project_to: int | None = None,
        stride: int = 1,
        kind: str | None = None,
    ) -> int:
        draw, b = self.draw, self.b
        b.summary.append(f"  {'proj ' if project_to else ''}{placement}")
        pre = placement == "pre"
        h = x
        if pre:
            h = self.norm(x)
            if self.image:
                h = b.act(h, "relu")  # pre-activation: BN -> ReLU -> conv
        if self.image:
            c = b.shapes[x][1]
            branch = self.conv_branch(h, project_to or c, stride)
        else:
            branch = self.token_branch(h, project_to or b.shapes[x][-1], project_to is not None, kind)
        if project_to is not None:
            b.new_stream()
            if self.image:
                skip = b.conv(x, project_to, 1, stride)
                skip = b.batchnorm(skip, self.eps) if draw(st.booleans()) else skip
            else:
                skip = b.linear(x, project_to, draw(st.booleans()))
            kind = "projection"
        else:
            skip, kind = x, "identity"
        out = b.residual(skip, branch, kind, pre, draw(st.booleans()))
        if placement == "post":
            out = self.norm(out)
        if glue == "act":
            out = b.act(out, draw(st.sampled_from(("relu", "gelu"))))
        elif glue == "scale":
            out = b.scale(out, 0.5)
        return out

    def segment(self, x: int, first: str) -> int:
        draw = self.draw
        if self.style == "layers" and not self.image:
            return self.layers(x, first)
        if self.style in (None, "layers"):
            # "layers" last: a new choice at the end keeps the old examples' draws (and blobs)
            style = draw(st.sampled_from(("pre", "pre", "post", "none", "mixed", "layers")))
            if style == "layers" and not self.image:
                return self.layers(x, first)
            if style == "layers":
                style = "pre"
            glue = draw(st.sampled_from(("none", "none", "act", "scale")))
        else:
            style, glue = ("pre" if self.style == "pre-pure" else "post"), "none"
        n = draw(st.integers(1, 3))
        if first != "projection":
            self.b.new_stream()
        for i in range(n):
            placement = draw(st.sampled_from(("pre", "post", "none"))) if style == "mixed" else style
            if i == 0 and first == "projection":
                width = draw(st.sampled_from(_WIDTHS if not self.image else (2, 4, 6)))
                stride = draw(st.sampled_from((1, 2))) if self.image else 1
                x = self.block(x, placement, glue, project_to=width, stride=stride)
            else:
                x = self.block(x, placement, glue)
        return x

    def layers(self, x: int, first: str) -> int:
        """One to three transformer layers on one stream: attention then MLP, both pre-norm
        (GPT-2, LLaMA: x + A(N1 x), then + M(N2 .)) or both post-norm (BERT: N1(x + A x), then
        N2(. + M .)), nothing between the blocks: two consecutive branches of one layer. After a
        projection transition the segment starts with a projection MLP block (its own unit)."""
        draw, b = self.draw, self.b
        placement = draw(st.sampled_from(("pre", "post")))
        n = draw(st.integers(1, 3))
        b.summary.append(f"  {n} {placement}-norm layers")
        if first == "projection":
            width = draw(st.sampled_from(_WIDTHS))
            x = self.block(x, placement, "none", project_to=width, kind=draw(st.sampled_from(_MLPS)))
        else:
            b.new_stream()
        for _ in range(n):
            x = self.block(x, placement, "none", kind="attention")
            x = self.block(x, placement, "none", kind=draw(st.sampled_from(_MLPS)))
        return x

    def transition(self, x: int) -> tuple[int, str]:
        draw, b = self.draw, self.b
        kinds = ("weighted",) + (() if self.style in ("pre-pure", "layers") else ("projection",))
        kind = draw(st.sampled_from(kinds + (() if self.image else ("unrelated",))))
        b.summary.append(f"  -- {kind}")
        if kind == "weighted":
            if self.image:
                y = b.conv(x, draw(st.sampled_from((2, 4, 6))), 3, draw(st.sampled_from((1, 2))))
                return (b.batchnorm(y, self.eps) if draw(st.booleans()) else y), kind
            return b.linear(x, draw(st.sampled_from(_WIDTHS))), kind
        if kind == "unrelated":  # x + W c: a conditioning input, not a residual
            shape = b.shapes[x]
            c = b.input(b._name(f"cond{self.index}_"), shape[:-1] + (draw(st.sampled_from((2, 4))),))
            return b.add(x, b.linear(c, shape[-1], False)), kind
        return x, kind

    def run(self, pooled: bool) -> int:
        draw, b = self.draw, self.b
        if self.image:
            c = draw(st.sampled_from((2, 4, 6)))
            size = draw(st.integers(2, 5))
            stem = draw(st.booleans())
            x = b.input(f"image{self.index}", (BATCH, 3 if stem else c, size, size))
            if stem:
                x = b.conv(x, c, 3, draw(st.sampled_from((1, 2))), bias=True)
            stem_text = " stem" if stem else ""
            b.summary.append(f"image c{c} {size}x{size}{stem_text} {self.norm_kind} eps{self.eps}")
        else:
            t = draw(st.integers(1, 4))
            d = draw(st.sampled_from(_WIDTHS))
            if draw(st.booleans()):
                x = b.embed(b.input(f"ids{self.index}", (BATCH, t), "int64"), d)
            else:
                x = b.input(f"tokens{self.index}", (BATCH, t, d))
            pos = draw(st.sampled_from(("none", "full", "seq")))
            if pos != "none":
                x = b.add_param(x, (1, t, d) if pos == "full" else (t, d))
            b.summary.append(f"tokens t{t} d{d} pos={pos} {self.norm_kind}/{self.rms_style} eps{self.eps}")
        first = "start"
        for s in range(draw(st.integers(1, 3))):
            if s:
                x, first = self.transition(x)
            x = self.segment(x, first)
        heads = (
            ("norm", "norm+linear") if self.style == "pre-pure" else ("none", "norm", "linear", "norm+linear")
        )
        head = draw(st.sampled_from(heads))
        b.summary.append(f"  head {head}{' pooled' if pooled else ''}")
        if "norm" in head:
            x = self.norm(x)
        if pooled:
            x = b.mean(x, (2, 3) if self.image else (1,))
            return b.linear(x, 4)
        if "linear" in head:
            x = b.conv(x, 4, 1, bias=True) if self.image else b.linear(x, 4)
        return x


STYLES = (None, "pre-pure", "post", "layers")


@st.composite
def programs(draw, max_chains: int = 2, style: str | None = None) -> Program:
    """A random residual model with its ground truth.

    Args:
        style: None draws everything; "pre-pure" makes every segment a pure pre-norm stream (no
            projection blocks, nothing between blocks, a final norm: what hyper, frac, dense and
            decay's compensation need); "post" makes every block post-norm (deepnorm's kind);
            "layers" makes the first chain's segments transformer layers (attention then MLP, pre-
            or post-norm: what parallel, macaron and ladder rewrite), a second chain may be an image.
    """
    b = Builder(draw(st.integers(0, 2**16)), symbolic_batch=draw(st.booleans()))
    n = draw(st.integers(1, max_chains))
    pooled = n > 1 and draw(st.booleans())
    outputs = []
    for i in range(n):  # the layers style's first chain is tokens (no draw: old draws stay as they were)
        image = (i > 0 or style != "layers") and draw(st.booleans())
        outputs.append(_Chain(draw, b, i, image, style).run(pooled))
    if pooled:  # the sum of two unrelated chains: not a residual
        b.summary.append("sum of chains")
        outputs = [b.add(outputs[0], outputs[1])]
    return b.finish(outputs)


def feeds(program: Program, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for inp in program.inputs:
        if inp.dtype == "int64":
            out[inp.name] = rng.integers(0, VOCAB, size=inp.shape).astype(np.int64)
        else:
            out[inp.name] = rng.standard_normal(inp.shape).astype(np.float32)
    return out


# ----- ONNX ------------------------------------------------------------------------------------
def to_onnx(program: Program):
    """The program as an onnx.ModelProto (opset 18; the batch dim symbolic when drawn so)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def v(vid: int) -> str:
        return f"v{vid}"

    def const(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, ins, outs, name, **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))

    names = {inp.vid: inp.name for inp in program.inputs}
    for op in program.ops:
        x = [names.get(i, v(i)) for i in op.inputs]
        y = [v(o) for o in op.outputs]
        n = op.name
        w = {
            k: const(f"{n}.{k}", a)
            for k, a in op.weights.items()
            if not (op.kind == "linear" and k == "weight")
        }
        if op.kind == "linear":
            if len(program.shapes[op.inputs[0]]) == 2 and "bias" in w:
                node("Gemm", [x[0], const(f"{n}.weight", op.weights["weight"]), w["bias"]], y, n, transB=1)
                continue
            tie = op.attrs.get("tie")
            wt = f"{tie}.weight_t" if tie else const(f"{n}.weight_t", op.weights["weight"].T.copy())
            if op.attrs["bias"]:
                node("MatMul", [x[0], wt], [f"{n}.mm"], n)
                node("Add", [f"{n}.mm", f"{tie}.bias" if tie else w["bias"]], y, f"{n}.bias")
            else:
                node("MatMul", [x[0], wt], y, n)
        elif op.kind == "matmul_w":
            node("MatMul", [x[0], w["weight"]], y, n)
        elif op.kind == "conv":
            a = op.attrs
            ins = [x[0], w["weight"]] + ([w["bias"]] if "bias" in w else [])
            node(
                "Conv",
                ins,
                y,
                n,
                kernel_shape=[a["k"]] * 2,
                pads=[a["pad"]] * 4,
                strides=[a["stride"]] * 2,
                group=a["groups"],
            )
        elif op.kind == "embed":
            node("Gather", [w["weight"], x[0]], y, n)
        elif op.kind == "layernorm":
            node("LayerNormalization", [x[0], w["weight"], w["bias"]], y, n, axis=-1, epsilon=op.attrs["eps"])
        elif op.kind == "rmsnorm":
            node("Mul", [x[0], x[0]], [f"{n}.sq"], f"{n}.sq")
            node("ReduceMean", [f"{n}.sq", const(f"{n}.axes", np.array([-1]))], [f"{n}.ms"], f"{n}.ms")
            node("Add", [f"{n}.ms", const(f"{n}.eps", np.float32(op.attrs["eps"]))], [f"{n}.mse"], f"{n}.eps")
            node("Sqrt", [f"{n}.mse"], [f"{n}.rms"], f"{n}.sqrt")
            node("Div", [x[0], f"{n}.rms"], [f"{n}.normed"], f"{n}.div")
            node("Mul", [f"{n}.normed", w["weight"]], y, n)
        elif op.kind == "batchnorm":
            ins = [x[0], w["weight"], w["bias"], w["mean"], w["var"]]
            node("BatchNormalization", ins, y, n, epsilon=op.attrs["eps"])
        elif op.kind == "act":
            fn = op.attrs["fn"]
            if fn in ("relu", "tanh", "sigmoid"):
                node(fn.capitalize(), x, y, n)
            elif fn == "gelu" and not op.attrs["manual"]:
                node("Gelu", x, y, n)
            elif fn == "silu":
                node("Sigmoid", x, [f"{n}.sig"], f"{n}.sig")
                node("Mul", [x[0], f"{n}.sig"], y, n)
            else:  # gelu = x * 0.5 * (1 + erf(x / sqrt 2))
                node("Div", [x[0], const(f"{n}.sqrt2", np.float32(math.sqrt(2)))], [f"{n}.d"], f"{n}.d")
                node("Erf", [f"{n}.d"], [f"{n}.erf"], f"{n}.erf")
                node("Add", [f"{n}.erf", const(f"{n}.one", np.float32(1))], [f"{n}.p1"], f"{n}.p1")
                node("Mul", [x[0], f"{n}.p1"], [f"{n}.xp"], f"{n}.xp")
                node("Mul", [f"{n}.xp", const(f"{n}.half", np.float32(0.5))], y, n)
        elif op.kind == "scale":
            node("Mul", [x[0], const(f"{n}.c", np.float32(op.attrs["c"]))], y, n)
        elif op.kind == "mean":
            node("ReduceMean", [x[0], const(f"{n}.axes", np.array(op.attrs["axes"]))], y, n, keepdims=0)
        elif op.kind == "add":
            node("Add", x, y, n)
        elif op.kind == "add_param":
            node("Add", [x[0], w["p"]], y, n)
        elif op.kind == "mul":
            node("Mul", x, y, n)
        elif op.kind == "split":
            node("Split", [x[0], const(f"{n}.sizes", np.array(op.attrs["sizes"]))], y, n, axis=-1)
        elif op.kind == "concat":
            node("Concat", x, y, n, axis=-1)
        elif op.kind == "heads":
            shape = const(f"{n}.shape", np.array([0, 0, op.attrs["h"], op.attrs["dh"]]))
            node("Reshape", [x[0], shape], [f"{n}.r"], f"{n}.r")
            node("Transpose", [f"{n}.r"], y, n, perm=[0, 2, 1, 3])
        elif op.kind == "repeat_kv":
            b_, h, t, dh = program.shapes[op.inputs[0]]
            rep = op.attrs["rep"]
            node("Unsqueeze", [x[0], const(f"{n}.axes", np.array([2]))], [f"{n}.u"], f"{n}.u")
            node("Expand", [f"{n}.u", const(f"{n}.rep", np.array([1, 1, rep, 1, 1]))], [f"{n}.e"], f"{n}.e")
            node("Reshape", [f"{n}.e", const(f"{n}.shape", np.array([0, h * rep, t, dh]))], y, n)
        elif op.kind == "merge_heads":
            node("Transpose", x, [f"{n}.t"], f"{n}.t", perm=[0, 2, 1, 3])
            node("Reshape", [f"{n}.t", const(f"{n}.shape", np.array([0, 0, -1]))], y, n)
        elif op.kind == "attention":
            q, k, vv = x[:3]
            dh = program.shapes[op.inputs[0]][-1]
            node("Transpose", [k], [f"{n}.kt"], f"{n}.kt", perm=[0, 1, 3, 2])
            node("MatMul", [q, f"{n}.kt"], [f"{n}.qk"], f"{n}.qk")
            scaled = f"{n}.s"
            node("Mul", [f"{n}.qk", const(f"{n}.scale", np.float32(1 / math.sqrt(dh)))], [scaled], scaled)
            if len(x) > 3 or "causal" in w:
                mask = x[3] if len(x) > 3 else w["causal"]
                node("Add", [scaled, mask], [f"{n}.masked"], f"{n}.mask")
                scaled = f"{n}.masked"
            node("Softmax", [scaled], [f"{n}.p"], f"{n}.softmax", axis=-1)
            node("MatMul", [f"{n}.p", vv], y, n)
        else:
            raise AssertionError(op.kind)

    def info(name, shape, dtype, symbolic):
        dims = ["batch" if symbolic and i == 0 else d for i, d in enumerate(shape)]
        elem = TensorProto.INT64 if dtype == "int64" else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [info(i.name, i.shape, i.dtype, i.symbolic_batch) for i in program.inputs]
    symbolic = any(i.symbolic_batch for i in program.inputs)
    outputs = []
    for k, vid in enumerate(program.outputs):
        nodes.append(helper.make_node("Identity", [v(vid)], [f"out{k}"], name=f"out{k}"))
        outputs.append(info(f"out{k}", program.shapes[vid], "float32", symbolic))
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# ----- torch -----------------------------------------------------------------------------------
def to_torch(program: Program):
    """The program as an nn.Module (eval mode) with the same weights; forward takes the inputs
    in `program.inputs` order and returns one tensor or a tuple."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    class FuzzModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict()
            self.extra = nn.ParameterDict()
            for op in program.ops:
                mod = self._module(op)
                if mod is not None:
                    self.layers[op.name] = mod
                elif op.kind in ("matmul_w", "add_param"):
                    self.extra[op.name] = nn.Parameter(tensor(next(iter(op.weights.values()))))
                elif op.kind == "attention" and "causal" in op.weights:
                    self.register_buffer(f"{op.name}_causal", tensor(op.weights["causal"]))
                elif op.kind == "rmsnorm":
                    self.extra[op.name] = nn.Parameter(tensor(op.weights["weight"]))

        @staticmethod
        def _module(op: Op):
            w, a = op.weights, op.attrs
            if "tie" in a:
                return None
            if op.kind == "linear":
                out, inp = w["weight"].shape
                mod = nn.Linear(inp, out, bias="bias" in w)
            elif op.kind == "conv":
                out, inp, k, _ = w["weight"].shape
                mod = nn.Conv2d(
                    inp * a["groups"], out, k, a["stride"], a["pad"], groups=a["groups"], bias="bias" in w
                )
            elif op.kind == "embed":
                mod = nn.Embedding(*w["weight"].shape)
            elif op.kind == "layernorm":
                mod = nn.LayerNorm(w["weight"].shape[0], eps=a["eps"])
            elif op.kind == "rmsnorm" and a["style"] == "module":
                mod = nn.RMSNorm(w["weight"].shape[0], eps=a["eps"])
            elif op.kind == "batchnorm":
                mod = nn.BatchNorm2d(w["weight"].shape[0], eps=a["eps"])
                mod.running_mean.copy_(tensor(w["mean"]))
                mod.running_var.copy_(tensor(w["var"]))
            else:
                return None
            with torch.no_grad():
                mod.weight.copy_(tensor(w["weight"]))
                if "bias" in w:
                    mod.bias.copy_(tensor(w["bias"]))
            return mod

        def forward(self, *args):
            env = {inp.vid: x for inp, x in zip(program.inputs, args)}
            for op in program.ops:
                xs = [env[i] for i in op.inputs]
                out = self._run(op, xs)
                for vid, value in zip(op.outputs, out if isinstance(out, tuple) else (out,)):
                    env[vid] = value
            outs = tuple(env[o] for o in program.outputs)
            return outs[0] if len(outs) == 1 else outs

        def _run(self, op: Op, xs):
            a, k = op.attrs, op.kind
            if k in ("linear", "conv", "embed", "layernorm", "batchnorm"):
                return self.layers[a.get("tie", op.name)](xs[0])
            if k == "rmsnorm":
                if a["style"] == "module":
                    return self.layers[op.name](xs[0])
                x = xs[0]
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a["eps"]) * self.extra[op.name]
            if k == "matmul_w":
                return xs[0] @ self.extra[op.name]
            if k == "add_param":
                return xs[0] + self.extra[op.name]
            if k == "act" and a["manual"]:
                x = xs[0]
                if a["fn"] == "silu":
                    return x * torch.sigmoid(x)
                if a["fn"] == "gelu":  # the ONNX form's order: (x * (erf(x / sqrt 2) + 1)) * 0.5
                    return (x * (torch.erf(x / math.sqrt(2)) + 1)) * 0.5
            if k == "act":
                return {
                    "relu": F.relu,
                    "gelu": F.gelu,
                    "silu": F.silu,
                    "tanh": torch.tanh,
                    "sigmoid": torch.sigmoid,
                }[a["fn"]](xs[0])
            if k == "scale":
                return xs[0] * a["c"]
            if k == "mean":
                return xs[0].mean(dim=a["axes"])
            if k == "add":
                return xs[0] + xs[1]
            if k == "mul":
                return xs[0] * xs[1]
            if k == "split":
                return tuple(torch.split(xs[0], list(a["sizes"]), dim=-1))
            if k == "concat":
                return torch.cat(xs, dim=-1)
            if k == "heads":
                return xs[0].unflatten(-1, (a["h"], a["dh"])).transpose(1, 2)
            if k == "repeat_kv":
                x = xs[0]
                if a["style"] == "interleave":
                    return x.repeat_interleave(a["rep"], dim=1)
                b, h, t, dh = x.shape
                return x[:, :, None].expand(b, h, a["rep"], t, dh).reshape(b, h * a["rep"], t, dh)
            if k == "merge_heads":
                return xs[0].transpose(1, 2).flatten(2)
            if k == "attention":
                q, kk, v = xs[:3]
                mask = xs[3] if len(xs) > 3 else getattr(self, f"{op.name}_causal", None)
                if a["style"] == "sdpa":
                    return F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)
                s = q @ kk.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]))
                if mask is not None:
                    s = s + mask
                return s.softmax(-1) @ v
            raise AssertionError(k)

    return FuzzModel().eval()
