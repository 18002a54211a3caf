"""rk2: a two-stage Runge-Kutta step that uses the branch's own weights twice.

x' = x + a F(x) + b F(x + c F(x)). (a, b) = (1, 0) is the original (the default); Heun
(1/2, 1/2, 1) equals (x + L(L(x)))/2 with L(x) = x + F(x) the original layer; midpoint
(0, 1, 1/2). ODE view of residual networks: Zhong et al. 2022 (arXiv 2212.06011); with
`scope=layer`, F is a whole pre-norm layer with its inner residuals, F(x) = L(x) - x, as in the
ODE Transformer (Li et al. 2022, arXiv 2203.09176). Costs twice the branch FLOPs: capacity,
not speed.

`learnable=true` makes a, b and c parameters (one each per site or layer). The second
evaluation is a clone of the branch (or layer) region with tied weights reading
x + c F(x). Refused, naming the site: projection shortcuts (F(x) does not have x's shape).
"""

from __future__ import annotations

import dataclasses

from rescompile.analysis.importance import depth_units
from rescompile.analysis.residuals import ResidualSite
from rescompile.infra import PassBase, PassError, PassResult, SiteSelector, sites_option
from rescompile.ir import Graph, Node, Value
from rescompile.ir.regions import Region, clone

from ._branch import insert_op, new_param

__all__ = ["RK2Pass"]

METHODS = {"heun": (0.5, 0.5, 1.0), "midpoint": (0.0, 1.0, 0.5)}


class RK2Pass(PassBase):
    """Replace x + F(x) with x + a F(x) + b F(x + c F(x)), F's weights shared."""

    name = "rk2"
    summary = "x + a*F(x) + b*F(x + c*F(x)) with F's weights used twice (Heun, midpoint; exact at a=1, b=0)"

    @dataclasses.dataclass
    class Options:
        a: float = dataclasses.field(default=1.0, metadata={"help": "weight of F(x)"})
        b: float = dataclasses.field(default=0.0, metadata={"help": "weight of F(x + c*F(x))"})
        c: float = dataclasses.field(default=1.0, metadata={"help": "step to the second evaluation"})
        method: str = dataclasses.field(
            default="none",
            metadata={"help": "preset a, b, c: heun (1/2, 1/2, 1), midpoint (0, 1, 1/2), none"},
        )
        learnable: bool = dataclasses.field(default=False, metadata={"help": "make a, b, c trainable"})
        scope: str = dataclasses.field(
            default="branch",
            metadata={
                "choices": ("branch", "layer"),
                "help": "F is one branch, or a whole layer (F = L(x) - x)",
            },
        )
        sites: str = sites_option()

    def check_options(self) -> None:
        o = self.options
        if o.method not in (*METHODS, "none"):
            raise PassError(f"rk2: method must be heun, midpoint or none, got {o.method!r}")
        if o.method != "none" and (o.a, o.b, o.c) != (1.0, 0.0, 1.0):
            raise PassError("rk2: give either method= or a, b, c, not both")
        if o.scope not in ("branch", "layer"):
            raise PassError(f"rk2: scope must be branch or layer, got {o.scope!r}")
        if self.coefficients[:2] == (0.0, 0.0) and not o.learnable:
            raise PassError("rk2: a = b = 0 removes the update")

    @property
    def coefficients(self) -> tuple[float, float, float]:
        o = self.options
        return METHODS.get(o.method, (o.a, o.b, o.c))

    @property
    def preserves_function(self) -> bool:
        a, b, _ = self.coefficients
        return (a, b) == (1.0, 0.0)

    def call(self, graph: Graph) -> PassResult:
        analysis = self.residuals(graph)
        selector = SiteSelector(self.options.sites)
        units = [
            u
            for u in depth_units(analysis, "branch" if self.options.scope == "branch" else "block")
            if all(map(selector, u.sites))
        ]
        if not units and analysis.sites:
            raise PassError(f"rk2: no {self.options.scope} selected")
        for site in (s for u in units for s in u.sites):
            if site.kind != "identity":
                raise PassError(
                    f"rk2: site {site.name}: a projection shortcut changes the stream's shape "
                    "(select identity sites, e.g. sites=kind:identity)"
                )
        a, b, _ = self.coefficients
        if (a, b) == (1.0, 0.0) and not self.options.learnable:
            return PassResult(graph, modified=False, stats={"steps": 0})
        moved: dict[Value, Value] = {}  # a rewritten layer's exit -> the value its readers now read
        for unit in units:
            if self.options.scope == "branch":
                self._branch_step(graph, unit.sites[0])
            else:
                moved[unit.exit] = self._layer_step(graph, unit, moved.get(unit.entry, unit.entry))
        return PassResult(graph, modified=True, stats={"steps": len(units), "scope": self.options.scope})

    def _branch_step(self, graph: Graph, site: ResidualSite) -> None:
        """The add's branch operand becomes a F(x) + b F(x + c F(x)); new ops go before the add."""
        region = Region.of_branch(site)
        x, f1 = site.fork, site.branch
        step = _Builder(self, graph, site, before=site.add)
        update = step.combine(x, f1, lambda z: clone(region, inputs={x: z}, prefix=f"rk2/{site.name}/")[f1])
        site.add.replace_input_with(1 - site.skip_index, update)

    def _layer_step(self, graph: Graph, unit, x: Value) -> Value:
        """The layer L becomes x + a (L(x) - x) + b (L(z) - z), z = x + c (L(x) - x); returns it."""
        exit = unit.exit
        region = Region.between([x], [exit])
        readers = exit.uses()
        step = _Builder(self, graph, unit.sites[-1], after=exit.producer)
        f1 = step.op("Sub", [exit, x], "f1")

        def second(z: Value) -> Value:
            twin = clone(region, inputs={x: z}, prefix=f"rk2/{unit.name}/")[exit]
            step.after = twin.producer
            return step.op("Sub", [twin, z], "f2")

        out = step.op("Add", [x, step.combine(x, f1, second)], "out")
        for node, index in readers:
            node.replace_input_with(index, out)
        if exit.is_graph_output:
            # The model ends with this layer (a torch module returning the add; ONNX often has an
            # Identity there instead): the step's result takes the output's place and its name
            # (the names swap, so both stay unique and an ONNX output keeps its name), as in loop.
            exit.name, out.name = out.name, exit.name
            graph.set_outputs([out if v is exit else v for v in graph.outputs])
        return out


class _Builder:
    """Inserts one step's ops in order, before a node or after a moving anchor."""

    def __init__(
        self, rk2: RK2Pass, graph: Graph, site: ResidualSite, *, before: Node | None = None, after=None
    ) -> None:
        self.rk2, self.graph, self.site, self.before, self.after = rk2, graph, site, before, after

    def op(self, op_type: str, inputs: list[Value], role: str) -> Value:
        where = {"before": self.before} if self.before is not None else {"after": self.after}
        out = insert_op(
            self.graph, op_type, inputs, pass_name=self.rk2.name, name=f"{self.site.name}/{role}", **where
        )
        if self.before is None:
            self.after = out.producer
        return out

    def scaled(self, value: Value, role: str, coefficient: float) -> Value | None:
        """coefficient * value; None for a fixed 0, the value itself for a fixed 1."""
        learnable = self.rk2.options.learnable
        if not learnable and coefficient in (0.0, 1.0):
            return value if coefficient == 1.0 else None
        factor = new_param(self.graph, self.rk2.name, self.site, role, coefficient, trainable=learnable)
        return self.op("Mul", [value, factor], f"{role}_mul")

    def combine(self, x: Value, f1: Value, evaluate) -> Value:
        """a f1 + b F(x + c f1), with F(z) = evaluate(z)."""
        a, b, c = self.rk2.coefficients
        first = self.scaled(f1, "a", a)
        second = None
        if b != 0.0 or self.rk2.options.learnable:
            step = self.scaled(f1, "c", c)
            z = x if step is None else self.op("Add", [x, step], "z")
            second = self.scaled(evaluate(z), "b", b)
        terms = [t for t in (first, second) if t is not None]
        return terms[0] if len(terms) == 1 else self.op("Add", terms, "sum")
