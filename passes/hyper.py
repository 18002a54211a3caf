"""hyper: hyper-connections (Zhu et al. 2024, arXiv 2409.19606).

Each selected residual stream x becomes n parallel copies H (shape [..., n, d],
channels last; NCHW streams are transposed to channels-last and back). Residual
site k on the stream, with branch T_k (its pre-norm included), becomes

    h_in  = A_m^T H          width connection: the branch reads a mix of the copies
    H_new = B^T T_k(h_in) + A_r^T H    depth connection

computed as one MatMul [A_m | A_r]^T H split into its rows (the parameter
`static_alpha` has the package's layout [n, 1 + n]).

static: A_m (n x 1) one-hot on k mod n, A_r = I_n, B = 1 (the authors' init).
dynamic=true adds input-dependent terms as in the paper's Algorithm 2 (and the
`hyper-connections` package): with Hn = RMSNorm(H) per copy (gain 1 + g, g = 0),
A_m += s_a tanh(Hn W_m), A_r += s_a tanh(Hn W_r), B += s_b tanh(Hn W_b),
W = 0 and s = 0.01 at init. The stream starts as n copies of its input and ends
with their mean (reduce=mean, exact) or sum (reduce=sum, the paper's; exact only
before a scale-invariant norm). Any other reader of a stream value reads the
reduced copies. With these inits the function is preserved exactly.

Refused, naming the site: streams that are not pure, i.e. where a norm or an
activation sits on the stream between sites (post-norm transformers,
post-activation ResNets: the authors' init has no exact mapping there), streams
whose shape changes, skips that a rewrite already scaled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rescompile.analysis.residuals import ResidualSite, ResidualStream
from rescompile.infra import PassBase, PassError, PassResult, select_streams, streams_option
from rescompile.ir import Graph, Node, Value

from ._branch import channel_axis, channel_count, insert_op
from ._streams import require_pure_stream

__all__ = ["HyperConnectionsPass"]


class _Builder:
    """Inserts core ops at a cursor (each new op goes right after the previous one)."""

    def __init__(self, graph: Graph, prefix: str, after: Node | None) -> None:
        self.graph, self.prefix, self.cursor = graph, prefix, after
        self.count = 0

    def op(
        self,
        op_type: str,
        inputs: list[Value],
        *,
        dtype: str | None,
        shape: tuple | None,
        attrs: dict | None = None,
        name: str = "",
    ) -> Value:
        self.count += 1
        pass_name, where = self.prefix.split("/", 1)
        out = insert_op(
            self.graph,
            op_type,
            inputs,
            after=self.cursor,
            pass_name=pass_name,
            name=f"{where}/{name or op_type.lower()}{self.count}",
            attrs=attrs,
        )
        out.dtype, out.shape = dtype, shape
        self.cursor = out.producer
        return out

    def const(self, name: str, array, *, trainable: bool, dtype: str) -> Value:
        array = np.asarray(array, dtype=dtype)
        pass_name, where = self.prefix.split("/", 1)
        return self.graph.add_param(
            f"rescompile.{pass_name}.{where}.{name}", array, dtype=dtype, trainable=trainable
        )


class HyperConnectionsPass(PassBase):
    """Replace each selected pre-norm residual stream by n hyper-connected copies."""

    name = "hyper"
    summary = "hyper-connections: n copies of each stream mixed by learned width/depth connections"

    @dataclasses.dataclass
    class Options:
        n: int = dataclasses.field(default=4, metadata={"help": "expansion rate (copies of the stream)"})
        dynamic: bool = dataclasses.field(default=False, metadata={"help": "add input-dependent connections"})
        reduce: str = dataclasses.field(
            default="mean",
            metadata={"choices": ("mean", "sum"), "help": "how the copies are merged at the stream's end"},
        )
        streams: str = streams_option()

    def check_options(self) -> None:
        if self.options.n < 1:
            raise PassError("hyper: n must be >= 1")

    @property
    def preserves_function(self) -> bool:
        return self.options.reduce == "mean" or self.options.n == 1

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        streams = select_streams(self.name, analysis, self.options.streams)
        for stream in streams:
            self._check(stream)
        for stream in streams:
            self._rewrite(graph, stream)
        return PassResult(
            graph,
            modified=bool(streams),
            stats={"streams": len(streams), "sites": sum(len(s.sites) for s in streams)},
        )

    def _check(self, stream: ResidualStream) -> None:
        require_pure_stream(self.name, stream)

    # Layout hooks (overridden by frac): rows of H, their width, rows the branch reads.
    layout = "copies"

    def _rows(self) -> int:
        return self.options.n

    def _reduce_weight(self) -> float:
        return 1.0 / self.options.n if self.options.reduce == "mean" else 1.0

    def _rewrite(self, graph: Graph, stream: ResidualStream) -> None:
        x0 = stream.input
        copies = self.layout == "copies"
        rows = self._rows()
        dtype = x0.dtype or "float32"
        rank, axis, d = len(x0.shape), channel_axis(x0), channel_count(x0)
        width = d if copies else d // rows  # width of one row of H
        split_rows = 1 if copies else rows  # rows a d-vector splits into
        to_last = [i for i in range(rank) if i != axis] + [axis]
        from_last = list(np.argsort(to_last))
        last_shape = tuple(x0.shape[i] for i in to_last)  # [..., d]
        lead = last_shape[:-1]
        h_shape = lead + (rows, width)  # H: [..., rows, width]
        keep = [0] * (rank - 1)  # Reshape: 0 copies a dim

        b = _Builder(graph, f"{self.name}/s{stream.index}", x0.producer)  # right after the stream input
        shape_split = b.const("split_shape", keep + [split_rows, -1], trainable=False, dtype="int64")
        shape_merge = b.const("merge_shape", keep + [-1], trainable=False, dtype="int64")

        def last(value: Value, builder: _Builder) -> Value:
            if to_last == list(range(rank)):
                return value
            return builder.op("Transpose", [value], attrs={"perm": to_last}, dtype=dtype, shape=last_shape)

        def back(value: Value, builder: _Builder) -> Value:
            if to_last == list(range(rank)):
                return value
            return builder.op(
                "Transpose", [value], attrs={"perm": [int(i) for i in from_last]}, dtype=dtype, shape=x0.shape
            )

        def split(value: Value, builder: _Builder) -> Value:
            return builder.op("Reshape", [value, shape_split], dtype=dtype, shape=lead + (split_rows, width))

        def merge(value: Value, builder: _Builder) -> Value:
            return builder.op("Reshape", [value, shape_merge], dtype=dtype, shape=lead + (d,))

        def swap_last_two(value: Value, shape: tuple, builder: _Builder) -> Value:
            perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
            return builder.op(
                "Transpose",
                [value],
                attrs={"perm": perm},
                dtype=dtype,
                shape=shape[:-2] + (shape[-1], shape[-2]),
            )

        def reduce(h: Value, builder: _Builder, tag: str) -> Value:
            if not copies:
                return back(merge(h, builder), builder)
            w = builder.const(
                f"{tag}.reduce", np.full((1, rows), self._reduce_weight()), trainable=False, dtype=dtype
            )
            merged = builder.op("MatMul", [w, h], dtype=dtype, shape=lead + (1, width), name="reduce")
            return back(merge(merged, builder), builder)

        row_axis = b.const("row_axis", [-2], trainable=False, dtype="int64")
        row_slices = [
            b.const(f"row_{i}", [v], trainable=False, dtype="int64")
            for i, v in enumerate((0, split_rows, split_rows + rows))
        ]

        # Expand: H0 = `rows` copies of the stream input, or its `rows` fractions.
        h = split(last(x0, b), b)
        if copies:
            ones = b.const("expand", np.ones((rows, 1)), trainable=False, dtype=dtype)
            h = b.op("Mul", [h, ones], dtype=dtype, shape=h_shape, name="expand")
        self._redirect_outside(graph, x0, stream.sites[0], h, reduce, b, "input", self.name)

        for k, site in enumerate(stream.sites):
            # Width ops go right after H is made (before the branch starts), depth ops before the add.
            sb = _Builder(graph, f"{self.name}/{site.name}", h.producer)
            alpha_t, beta = self._connections(
                sb, h, k, rows, split_rows, width, dtype, h_shape, swap_last_two
            )
            # One MatMul builds the branch input rows and the mixed rows together, as the
            # package's single einsum does; two slices split them.
            mixed = sb.op(
                "MatMul", [alpha_t, h], dtype=dtype, shape=lead + (split_rows + rows, width), name="mix"
            )
            h_in = sb.op(
                "Slice",
                [mixed, row_slices[0], row_slices[1], row_axis],
                dtype=dtype,
                shape=lead + (split_rows, width),
                name="width",
            )
            h_mixed = sb.op(
                "Slice",
                [mixed, row_slices[1], row_slices[2], row_axis],
                dtype=dtype,
                shape=h_shape,
                name="rows",
            )
            branch_input = back(merge(h_in, sb), sb)
            # The branch reads h_in wherever it read the stream value.
            inside = set(site.nodes)
            for usage in site.fork.uses():
                if usage.node in inside:
                    usage.node.replace_input_with(usage.index, branch_input)
            sb.cursor = site.add._prev
            out = split(last(site.branch, sb), sb)
            written = sb.op("Mul", [beta, out], dtype=dtype, shape=h_shape, name="depth")
            h_next = sb.op("Add", [h_mixed, written], dtype=dtype, shape=h_shape, name="update")
            following = stream.sites[k + 1] if k + 1 < len(stream.sites) else None
            self._redirect_outside(graph, site.output, following, h_next, reduce, sb, f"d{k}", self.name)
            h = h_next
        for site in reversed(stream.sites):
            graph.remove(site.add)

    def _connections(
        self,
        b: _Builder,
        h: Value,
        k: int,
        rows: int,
        read_rows: int,
        width: int,
        dtype: str,
        h_shape,
        swap_last_two,
    ):
        """(alpha^T, B): alpha^T ([read_rows + rows, rows], per position when dynamic)
        multiplies H = [..., rows, width]; B ([rows, 1]) weights the branch output.

        `static_alpha` is laid out as the package's: [rows, read_rows + rows] =
        [A_w | A_r], row s = source row. A_w is one-hot on k mod n for copies (the
        authors' init) and the identity for fractions; A_r is the identity; B = 1."""
        if self.layout == "copies":
            a_w = np.zeros((rows, 1))
            a_w[k % rows, 0] = 1.0
        else:
            a_w = np.eye(rows)
        cols = read_rows + rows
        static = b.const(
            "static_alpha", np.concatenate([a_w, np.eye(rows)], axis=1), trainable=True, dtype=dtype
        )
        beta = b.const("static_beta", np.ones((rows, 1)), trainable=True, dtype=dtype)
        if not self.options.dynamic:
            return swap_last_two(static, (rows, cols), b), beta
        lead = h_shape[:-2]
        # The package's RMSNorm, Hn = H / max(||H||, 1e-12) * sqrt(width) * (1 + g) per row,
        # feeds only the two small matmuls Hn W, so it is computed as
        # (H (s * W)) / max(||H||, 1e-12) with s = sqrt(width) (1 + g): the same function,
        # without two elementwise ops (and their gradients) on the [..., rows, width] tensor.
        sq = b.op("Mul", [h, h], dtype=dtype, shape=h_shape)
        axes = b.const("norm_axes", [-1], trainable=False, dtype="int64")
        ss = b.op("ReduceSum", [sq, axes], attrs={"keepdims": 1}, dtype=dtype, shape=lead + (rows, 1))
        norm = b.op("Sqrt", [ss], dtype=dtype, shape=lead + (rows, 1))
        norm = b.op(
            "Max",
            [norm, b.const("norm_eps", 1e-12, trainable=False, dtype=dtype)],
            dtype=dtype,
            shape=lead + (rows, 1),
        )
        gain = b.const("norm_gain", np.zeros(width), trainable=True, dtype=dtype)
        gain = b.op(
            "Add", [gain, b.const("one", 1.0, trainable=False, dtype=dtype)], dtype=dtype, shape=(width,)
        )
        gain = b.op(
            "Mul",
            [gain, b.const("sqrt_d", np.sqrt(width), trainable=False, dtype=dtype)],
            dtype=dtype,
            shape=(width,),
        )
        gain = b.op(
            "Reshape",
            [gain, b.const("column", [-1, 1], trainable=False, dtype="int64")],
            dtype=dtype,
            shape=(width, 1),
        )

        def dynamic(weight_name, scale_name, n_cols, static_value):
            w = b.const(weight_name, np.zeros((width, n_cols)), trainable=True, dtype=dtype)
            scale = b.const(scale_name, 1e-2, trainable=True, dtype=dtype)
            w = b.op("Mul", [w, gain], dtype=dtype, shape=(width, n_cols))
            z = b.op("MatMul", [h, w], dtype=dtype, shape=lead + (rows, n_cols))
            z = b.op("Div", [z, norm], dtype=dtype, shape=lead + (rows, n_cols), name="normed")
            z = b.op("Tanh", [z], dtype=dtype, shape=lead + (rows, n_cols))
            z = b.op("Mul", [z, scale], dtype=dtype, shape=lead + (rows, n_cols))
            return b.op("Add", [z, static_value], dtype=dtype, shape=lead + (rows, n_cols))

        alpha = dynamic("dynamic_alpha", "dynamic_alpha_scale", cols, static)  # [..., rows, cols]
        beta = dynamic("dynamic_beta", "dynamic_beta_scale", 1, beta)  # [..., rows, 1]
        return swap_last_two(alpha, lead + (rows, cols), b), beta

    @staticmethod
    def _redirect_outside(graph, value, following: ResidualSite | None, h, reduce, b, tag, pass_name) -> None:
        """Readers of a stream value other than the stream itself (the next site's add and
        branch) read the reduced copies instead."""
        keep = set(following.nodes) | {following.add} if following is not None else set()
        outside = [u for u in value.uses() if u.node not in keep and u.node.meta.get("pass") != pass_name]
        is_output = value.is_graph_output
        if not outside and not is_output:
            return
        merged = reduce(h, b, tag)
        for usage in outside:
            usage.node.replace_input_with(usage.index, merged)
        if is_output:
            graph.set_outputs([merged if v is value else v for v in graph.outputs])
