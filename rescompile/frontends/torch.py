"""torch <-> rescompile IR.

Import: `torch.export.export` (non-strict) captures the module; its unlifted
GraphModule (`ep.module()`) has parameters as `get_attr` nodes under their
original names and pytree input/output specs, the same shape that
`torch.fx.symbolic_trace` (the fallback) produces, so one importer serves both.
Each fx node becomes an IR node of domain "torch" that keeps its fx op, target
and an argument template (fx nodes replaced by input slots, constant arguments
by references to node attributes), so export is lossless. Constant arguments
(eps, normalized_shape, groups, split sizes, dims) are node attributes under
their schema names, and `scaled_dot_product_attention` gets `num_heads`. An op
that returns a tuple read through getitems (native_layer_norm, split, unbind,
max_pool2d_with_indices, var_mean...) becomes one node with one output per
element, unused ones included; export indexes the tuple again. Parameters and
buffers become initializers holding the original tensors (no copy).

Export: a fresh `torch.fx.GraphModule` whose parameters and buffers keep their
fully qualified names; new parameters made by passes become `nn.Parameter`s
under `rescompile.<pass>.<site>.<role>`. Nodes that passes insert use the IR's
core op set (ONNX names) and are mapped to torch functions here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import operator
import re
import warnings
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy for astype("bfloat16")
import numpy as np
import torch
from torch import fx, nn

from rescompile.errors import RescompileError
from rescompile.frontends._torch_core import CORE_OPS
from rescompile.frontends._torch_kinds import kind_of_torch_target
from rescompile.ir import CONST, PARAM, Graph, Node, OpKind, Value
from rescompile.ir.ops import Role, input_roles

__all__ = [
    "TorchSource",
    "capture",
    "import_graph_module",
    "import_module",
    "export_module",
    "load_pt2",
    "normalize_example_inputs",
]


@dataclasses.dataclass
class TorchSource:
    """What export needs that the IR does not model."""

    codegen: Any  # the pytree codegen of the captured graph (in/out specs)
    placeholders: list[str]  # placeholder names, in order
    output_template: Any  # output structure with _Slot(i) for graph.outputs[i]
    buffers_persistent: dict[str, bool]
    training: bool
    module_name: str
    method: str  # "torch.export" or "torch.fx"
    example_args: tuple = ()
    example_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Stands for input `index` of the IR node in an argument template."""

    index: int


@dataclasses.dataclass(frozen=True)
class _Attr:
    """Stands for attribute `name` of the IR node in an argument template, so that a pass that
    changes the attribute (a split size, normalized_shape) changes the exported call too."""

    name: str


def normalize_example_inputs(example_inputs: Any, example_kwargs: dict | None = None):
    """Accept a tensor, a tuple of args, or a dict of keyword inputs."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        return (), kwargs
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **kwargs}
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), kwargs
    return (example_inputs,), kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def _auto_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Every dim of every tensor input marked Dim.AUTO (torch.export keeps a dim
    dynamic where the model allows it), keyed by forward()'s parameter names."""
    from torch.utils import _pytree as pytree

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    auto = torch.export.Dim.AUTO

    def spec(t):
        return {i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None

    return {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}


DYNAMIC_CAPTURE_TIMEOUT_S = 20.0
"""How long `dynamic="auto"` lets torch.export solve symbolic shapes before capturing static
shapes instead (torchvision Swin-T on 2 busy cores: 1420 s dynamic, 23 s static)."""

logger = logging.getLogger("rescompile.torch")


class _CaptureTimeout(BaseException):
    """Raised by the alarm in the middle of torch.export; a BaseException so that torch's own
    `except Exception` handlers do not swallow it."""


# Where the alarm may interrupt torch.export: the symbolic shape solver, whose state dies with
# the failed export. Elsewhere (imports, cleanup in __exit__) it waits for the solver.
_SOLVER_MODULES = ("sympy", "torch.utils._sympy", "torch.fx.experimental.symbolic_shapes")
_RETRY_S = 0.05


def _in_solver(frame) -> bool:
    """The innermost frame is the shape solver's, and no import or __exit__ is on the stack."""
    if not frame.f_globals.get("__name__", "").startswith(_SOLVER_MODULES):
        return False
    while frame is not None:
        if frame.f_code.co_name == "__exit__" or frame.f_code.co_filename.startswith("<frozen importlib"):
            return False
        frame = frame.f_back
    return True


@contextlib.contextmanager
def _time_bound(seconds: float | None):
    """Raise _CaptureTimeout in this thread after `seconds`, at the next point where the
    shape solver runs (SIGALRM: the solver is Python, so the handler runs between bytecodes).
    Interrupting an import or a context manager's exit would leave torch's global state
    broken for the static capture that follows. No bound off the main thread or without
    SIGALRM; a Python handler and timer already installed are restored, with the time they had
    left."""
    import signal
    import threading
    import time

    main = threading.current_thread() is threading.main_thread()
    # getsignal() is None for a handler installed outside Python, which could not be restored.
    usable = hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is not None
    if seconds is None or not main or not usable:
        yield
        return

    def fire(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)  # again until the bound ends, should torch swallow it
        if _in_solver(frame):
            raise _CaptureTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    outer_left, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-6))
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            left = max(outer_left - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def capture(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    dynamic: bool | str = "auto",
    dynamic_timeout: float | None = None,
) -> tuple[fx.GraphModule, str]:
    """Capture `module` as a GraphModule.

    torch.export (non-strict) with dynamic dims first, so the rewritten module
    accepts other batch sizes and sequence lengths; then torch.export with static
    shapes; then torch.fx.symbolic_trace.

    Args:
        dynamic: "auto" bounds the dynamic attempt by `dynamic_timeout` (symbolic shape
            solving can take minutes, e.g. on Swin) and then captures static shapes, with
            one warning; True waits for it however long it takes; False captures the
            example shapes only.
        dynamic_timeout: seconds for "auto"; default DYNAMIC_CAPTURE_TIMEOUT_S.
    """
    if not isinstance(module, nn.Module):
        raise RescompileError(f"expected an nn.Module, got {type(module).__name__}")
    from torch.utils import _pytree as pytree

    if dynamic not in (True, False, "auto"):
        raise RescompileError(f"dynamic={dynamic!r}: use True, False or 'auto'")
    name = type(module).__name__
    shapes = _auto_dynamic_shapes(module, args, kwargs) if dynamic else None
    if shapes is not None:
        bound = (
            (DYNAMIC_CAPTURE_TIMEOUT_S if dynamic_timeout is None else dynamic_timeout)
            if dynamic == "auto"
            else None
        )
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        marks = [(t, dict(vars(t))) for t in tensors]
        try:
            with _quiet(), _time_bound(bound):
                return torch.export.export(
                    module, args, kwargs, dynamic_shapes=shapes, strict=False
                ).module(), "torch.export"
        except _CaptureTimeout:
            # One line: the CLI shows it through logging's last-resort handler (or -v's format).
            logger.warning(
                "rescompile: warning: dynamic-shape capture of %s stopped after %g s; captured "
                "the example's static shapes instead (dynamic=True waits, dynamic=False skips it)",
                name,
                bound,
            )
        except Exception:
            pass  # some models only export with static shapes
        # A failed torch.export leaves its dim markers (_dynamo_*) on the input tensors, and
        # the static capture would read them and make those dims dynamic again.
        for tensor, attrs in marks:
            for key in vars(tensor).keys() - attrs.keys():
                delattr(tensor, key)
            vars(tensor).update(attrs)
    try:
        with _quiet():
            ep = torch.export.export(module, args, kwargs, strict=False)
            return ep.module(), "torch.export"
    except Exception as export_error:
        try:
            with _quiet():
                gm = fx.symbolic_trace(module)
                _functionalize_leaf_modules(gm)
                _propagate_shapes(gm, args, kwargs)
            return gm, "torch.fx"
        except Exception as fx_error:
            raise RescompileError(
                f"cannot capture {name}: torch.export failed ({_first_line(export_error)}) and "
                f"torch.fx.symbolic_trace failed ({_first_line(fx_error)}); check that the example "
                "inputs match forward() and that forward() has no data-dependent control flow"
            ) from fx_error


def _leaf_call(gm: fx.GraphModule, node: fx.Node, mod: nn.Module):
    """(function, args) computing `mod(x)` from its parameters, or None if unknown."""
    import torch.nn.functional as F

    def attr(name):
        return gm.graph.get_attr(f"{node.target}.{name}") if getattr(mod, name, None) is not None else None

    x = node.args[0]
    if isinstance(mod, nn.Linear):
        return F.linear, (x, attr("weight"), attr("bias"))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(mod.kernel_size)]
        return conv, (x, attr("weight"), attr("bias"), mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm, (x, mod.normalized_shape, attr("weight"), attr("bias"), mod.eps)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training and mod.track_running_stats:
        return F.batch_norm, (
            x,
            attr("running_mean"),
            attr("running_var"),
            attr("weight"),
            attr("bias"),
            False,
            0.0,
            mod.eps,
        )
    if isinstance(mod, nn.Embedding):
        return F.embedding, (x, attr("weight"), mod.padding_idx)
    return None


def _functionalize_leaf_modules(gm: fx.GraphModule) -> None:
    """Rewrite calls of Linear/Conv/LayerNorm/BatchNorm/Embedding modules into
    functional calls on `get_attr` parameters (same names), as torch.export
    graphs have them, so analysis sees the weights. Other modules stay calls."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            call = _leaf_call(gm, node, mod)
            if call is None:
                continue
            new = gm.graph.call_function(call[0], call[1])
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Record example values in node.meta["val"] for fx-traced graphs, as torch.export does."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [p.target for p in placeholders]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    missing = [n for n in names[len(args) :] if n not in bound]
    if missing and any(p.args == () for p in placeholders if p.target in missing):
        raise RescompileError(f"example inputs are missing {missing}")

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*[bound.get(n, p.args[0] if p.args else None) for n, p in zip(names, placeholders)])


def import_module(
    module: nn.Module,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    *,
    dynamic: bool | str = "auto",
    dynamic_timeout: float | None = None,
) -> Graph:
    """Capture and import an nn.Module (see `capture` for `dynamic` and `dynamic_timeout`)."""
    args, kwargs = normalize_example_inputs(example_inputs, example_kwargs)
    if not args and not kwargs:
        raise RescompileError(f"{type(module).__name__}: example_inputs are needed to trace an nn.Module")
    gm, method = capture(module, args, kwargs, dynamic=dynamic, dynamic_timeout=dynamic_timeout)
    graph = import_graph_module(
        gm, method=method, module_name=type(module).__name__, training=module.training
    )
    graph.source.example_args, graph.source.example_kwargs = args, kwargs
    return graph


def load_pt2(path) -> Graph:
    """Import a program saved with `torch.export.save`."""
    try:
        with _quiet():
            ep = torch.export.load(str(path))
    except Exception as exc:
        raise RescompileError(
            f"{path}: not a readable torch.export program ({_first_line(exc)}); if it takes or returns "
            "custom classes (e.g. Hugging Face ModelOutput), export it with return_dict=False"
        ) from exc
    graph = import_graph_module(ep.module(), method="torch.export", module_name=str(path), training=False)
    if ep.example_inputs is not None:
        graph.source.example_args, graph.source.example_kwargs = ep.example_inputs
    return graph


def _dim(d: Any) -> int | str:
    """A static dim as int (also a SymInt that is really a constant), else its symbol."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(d) if isinstance(d, int) or is_concrete_int(d) else str(d)


def _val_info(val: Any) -> tuple[str | None, tuple | None]:
    if isinstance(val, torch.Tensor):
        return str(val.dtype).replace("torch.", ""), tuple(_dim(d) for d in val.shape)
    return None, None


def _resolve_attr(gm: nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _node_kind(n: fx.Node, gm: fx.GraphModule, kinds: dict[fx.Node, OpKind]) -> OpKind:
    if n.op == "call_module":
        return kind_of_torch_target(type(_resolve_attr(gm, n.target)))
    if n.target is operator.getitem:
        source = n.args[0]
        # Picking output 0 of a tuple-returning op (norms, pooling with indices) passes
        # the tensor through; indexing a tensor or a split's list selects channels.
        if (
            isinstance(source, fx.Node)
            and isinstance(source.meta.get("val"), (tuple, list))
            and kinds.get(source) is not OpKind.SPLIT
        ):
            return OpKind.IDENTITY
        return OpKind.SPLIT
    return kind_of_torch_target(n.target)


def _tuple_picks(n: fx.Node) -> dict[fx.Node, int] | None:
    """{getitem user: output index} when `n` returns a flat tuple or list read only through
    constant-index getitems (native_layer_norm, split, max_pool2d_with_indices, var_mean...):
    the IR node then gets one output per element, unused ones included, as ONNX ops have."""
    val = n.meta.get("val")
    if not isinstance(val, (tuple, list)) or not val or not n.users:
        return None
    picks = {}
    for user in n.users:
        if user.target is not operator.getitem or user.args[0] is not n or not isinstance(user.args[1], int):
            return None
        picks[user] = user.args[1] % len(val)
    return picks


def _argument_names(target: Any) -> list[str] | None:
    """Positional parameter names of an aten op (its schema) or a Python function."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments]
    if not callable(target) or isinstance(target, str):
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for param in params:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        names.append(param.name)
    return names


# Attributes the importer itself sets on a torch node; never argument names.
_TEMPLATE_KEYS = frozenset({"fx_op", "target", "args", "kwargs", "module", "returns_tuple"})


def _lift_attributes(n: fx.Node, args_t: tuple, kwargs_t: dict, attrs: dict) -> tuple[tuple, dict]:
    """Move constant arguments (eps, normalized_shape, groups, split sizes, dims...) into
    `attrs` under their parameter names, where analysis and passes read them, leaving _Attr
    references in the template. Arguments that hold a tensor or a symbolic size stay there."""

    def liftable(name, value):
        nodes: list[fx.Node] = []
        fx.node.map_arg(value, nodes.append)
        return name not in _TEMPLATE_KEYS and value is not None and not nodes

    names = _argument_names(n.target) if n.op == "call_function" else None
    args_t, kwargs_t = list(args_t), dict(kwargs_t)
    for i, (name, value) in enumerate(zip(names or (), n.args)):
        if liftable(name, value):
            attrs[name], args_t[i] = value, _Attr(name)
    for name, value in n.kwargs.items():
        if liftable(name, value):
            attrs[name], kwargs_t[name] = value, _Attr(name)
    if "scaled_dot_product" in str(n.target) and isinstance(n.args[0], fx.Node):
        query = n.args[0].meta.get("val")
        if isinstance(query, torch.Tensor) and query.dim() == 4 and isinstance(_dim(query.shape[1]), int):
            attrs.setdefault("num_heads", int(query.shape[1]))  # (batch, heads, length, head_dim)
    return tuple(args_t), kwargs_t


def import_graph_module(
    gm: fx.GraphModule, *, method: str = "torch.fx", module_name: str = "", training: bool = False
) -> Graph:
    """Convert a GraphModule (from torch.export's `ep.module()` or torch.fx) into the IR."""
    graph = Graph(module_name or "main")
    env: dict[fx.Node, Value] = {}
    kinds: dict[fx.Node, OpKind] = {}
    persistent: dict[str, bool] = {}
    placeholders: list[str] = []
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    for mod_name, mod in gm.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            persistent[f"{mod_name}.{b}" if mod_name else b] = False
    initializer_by_target: dict[str, Value] = {}
    output_template: Any = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            dtype, shape = _val_info(n.meta.get("val"))
            value = graph.add_input(Value(n.name, dtype=dtype, shape=shape))
            if n.args:
                value.meta["torch.default"] = n.args[0]
            placeholders.append(n.name)
            env[n] = value
        elif n.op == "get_attr":
            if n.target in initializer_by_target:
                env[n] = initializer_by_target[n.target]
                continue
            payload = _resolve_attr(gm, n.target)
            if isinstance(payload, nn.Module):
                # The body of a higher-order op (autocast or grad-mode regions): kept opaque.
                value = Value(n.target, payload=payload, role=CONST)
                value.meta["torch.kind"] = "module"
            elif isinstance(payload, torch.Tensor):
                role = PARAM if n.target in params and payload.requires_grad else CONST
                dtype, shape = _val_info(payload)
                value = Value(n.target, dtype=dtype, shape=shape, payload=payload, role=role)
                value.meta["torch.kind"] = (
                    "parameter" if n.target in params else "buffer" if n.target in buffers else "constant"
                )
            else:
                raise RescompileError(
                    f"attribute {n.target!r} is a {type(payload).__name__}; "
                    "only tensors and submodules are supported"
                )
            graph.add_initializer(value)
            if value.name != n.target:
                raise RescompileError(f"duplicate attribute name {n.target!r}")
            initializer_by_target[n.target] = value
            env[n] = value
        elif n.op in ("call_function", "call_method", "call_module"):
            if n in env:
                continue  # a getitem of a multi-output node: already that node's output
            inputs: list[Value] = []

            def slot(arg: fx.Node, inputs: list[Value] = inputs) -> _Slot:
                inputs.append(env[arg])
                return _Slot(len(inputs) - 1)

            args_t = fx.node.map_arg(n.args, slot)
            kwargs_t = fx.node.map_arg(n.kwargs, slot)
            kinds[n] = _node_kind(n, gm, kinds)
            attrs = {"fx_op": n.op, "target": n.target}
            args_t, kwargs_t = _lift_attributes(n, args_t, kwargs_t, attrs)
            attrs.update(args=args_t, kwargs=kwargs_t)
            if n.op == "call_module":
                attrs["module"] = _resolve_attr(gm, n.target)
            op_type = (
                n.target
                if isinstance(n.target, str)
                else str(getattr(n.target, "_name", None) or getattr(n.target, "__name__", n.target))
            )
            picks = _tuple_picks(n)
            if picks is None:
                vals, names = [n.meta.get("val")], [n.name]
            else:
                attrs["returns_tuple"] = True
                named: dict[int, str] = {}
                for user, index in picks.items():
                    named.setdefault(index, user.name)  # outputs keep the names of the getitems they replace
                vals = n.meta["val"]
                names = [named.get(i, f"{n.name}_out{i}") for i in range(len(vals))]
            node = Node(
                op_type,
                inputs,
                domain="torch",
                attrs=attrs,
                kind=kinds[n],
                name=n.name,
                num_outputs=len(names),
                output_names=names,
            )
            for out, val in zip(node.outputs, vals):
                out.dtype, out.shape = _val_info(val)
            if "nn_module_stack" in n.meta:
                node.meta["torch.module_path"] = next(reversed(n.meta["nn_module_stack"].values()))[0]
            graph.append(node)
            if picks is None:
                env[n] = node.outputs[0]
            else:
                env.update((user, node.outputs[index]) for user, index in picks.items())
        elif n.op == "output":
            outputs: list[Value] = []

            def out_slot(arg: fx.Node, outputs: list[Value] = outputs) -> _Slot:
                outputs.append(env[arg])
                return _Slot(len(outputs) - 1)

            output_template = fx.node.map_arg(n.args[0], out_slot)
            graph.set_outputs(outputs)
    # Parameters and buffers the graph does not read (e.g. BatchNorm's
    # num_batches_tracked) still belong to the module's state.
    for target, tensor in {**buffers, **params}.items():
        if target not in initializer_by_target and not target.startswith("_guards_fn"):
            kind = "parameter" if target in params else "buffer"
            role = PARAM if kind == "parameter" and tensor.requires_grad else CONST
            dtype, shape = _val_info(tensor)
            value = Value(target, dtype=dtype, shape=shape, payload=tensor, role=role)
            value.meta["torch.kind"] = kind
            graph.add_initializer(value)
    graph.source = TorchSource(
        codegen=gm.graph._codegen,
        placeholders=placeholders,
        output_template=output_template,
        buffers_persistent=persistent,
        training=training,
        module_name=module_name,
        method=method,
    )
    return graph


# ----- export -----------------------------------------------------------------------------
def _tensor(payload: Any, dtype: str | None) -> torch.Tensor:
    if isinstance(payload, torch.Tensor):
        return payload
    if hasattr(payload, "numpy") and not isinstance(payload, np.ndarray):
        payload = payload.numpy()
    array = np.asarray(payload)
    if dtype is not None and array.dtype.name != dtype:
        array = array.astype(dtype)
    if array.dtype.name == "bfloat16":  # numpy's bfloat16 is ml_dtypes': torch reads its bits
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _attr_path(name: str) -> list[str]:
    """Attribute names for a dotted parameter name: identifiers, never keywords."""
    import keyword

    parts = [re.sub(r"\W", "_", p) or "_" for p in name.split(".")]
    return [p + "_" if keyword.iskeyword(p) else p for p in parts]


def _owner(root: nn.Module, parts: list[str]) -> nn.Module:
    """The submodule that will hold attribute `parts[-1]`, creating empty ones on the way."""
    owner = root
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    return owner


def _register(root: nn.Module, name: str, tensor: torch.Tensor, kind: str, persistent: bool) -> str:
    parts = _attr_path(name)
    owner = _owner(root, parts)
    leaf = parts[-1]
    if kind == "parameter":
        param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=True)
        owner.register_parameter(leaf, param)
    else:
        owner.register_buffer(leaf, tensor, persistent=persistent)
    return ".".join(parts)


def export_module(graph: Graph) -> fx.GraphModule:
    """Build a trainable GraphModule from the IR.

    Original parameters and buffers keep their names and tensors (shared, not
    copied); new initializers become parameters (role param) or buffers.

    Raises:
        RescompileError: the graph holds an op that has no torch form here.
    """
    source = graph.source
    if not isinstance(source, TorchSource):
        raise RescompileError("this graph did not come from torch; export it to ONNX instead")
    root = nn.Module()
    fxg = fx.Graph()
    env: dict[Value, fx.Node] = {}
    for value, name in zip(graph.inputs, source.placeholders):
        default = value.meta.get("torch.default", inspect.Parameter.empty)
        env[value] = fxg.placeholder(name, default_value=default)
    for value in graph.initializers.values():
        kind = value.meta.get("torch.kind") or ("parameter" if value.role == PARAM else "buffer")
        if kind == "module":
            target = _register_module(root, value.name, value.payload)
        else:
            tensor = _tensor(value.payload, value.dtype)
            target = _register(
                root, value.name, tensor, kind, source.buffers_persistent.get(value.name, True)
            )
        env[value] = fxg.get_attr(target)
    for node in graph:
        ins = [env[v] if v is not None else None for v in node.inputs]
        if node.domain == "torch":

            def fill(s, node=node, ins=ins):
                return (
                    ins[s.index]
                    if isinstance(s, _Slot)
                    else node.attrs[s.name]
                    if isinstance(s, _Attr)
                    else s
                )

            args = fx.node.map_aggregate(node.attrs["args"], fill)
            kwargs = fx.node.map_aggregate(node.attrs["kwargs"], fill)
            op = node.attrs["fx_op"]
            if op == "call_module":
                path = _register_module(root, node.attrs["target"], node.attrs["module"])
                fx_node = fxg.create_node(op, path, args, kwargs, name=node.name)
            else:
                fx_node = fxg.create_node(op, node.attrs["target"], args, kwargs, name=node.name)
        elif node.domain in ("", "ai.onnx") and node.op_type in CORE_OPS and len(node.outputs) == 1:
            attrs = {k: getattr(v, "value", v) for k, v in node.attrs.items()}
            # Shape-like constants (axes, shapes, slice bounds) go in as Python values, not buffers;
            # integer constants that are data (Gather indices, an operand of Sub) stay tensors.
            roles = input_roles(node) or ()
            args = tuple(
                _python_constant(v)
                if i < len(roles) and roles[i] in _SHAPE_ROLES and _is_small_int_const(v)
                else x
                for i, (v, x) in enumerate(zip(node.inputs, ins))
            )
            # named as the IR node, so probes and readers of the exported graph find it
            fx_node = fxg.create_node("call_function", CORE_OPS[node.op_type], args, attrs, name=node.name)
        else:
            raise RescompileError(
                f"node {node.name!r} ({node.domain or 'onnx'}::{node.op_type}) has no torch "
                "form; export this model to ONNX instead"
            )
        if node.attrs.get("returns_tuple"):
            for i, out in enumerate(node.outputs):
                if out.uses() or out.is_graph_output:
                    env[out] = fxg.create_node("call_function", operator.getitem, (fx_node, i), name=out.name)
        else:
            env[node.outputs[0]] = fx_node
    fxg.output(
        fx.node.map_aggregate(
            source.output_template, lambda s: env[graph.outputs[s.index]] if isinstance(s, _Slot) else s
        )
    )
    fxg._codegen = source.codegen
    gm = fx.GraphModule(root, fxg, class_name="RescompiledModule")
    gm.train(source.training)
    return gm


_SHAPE_ROLES = frozenset({Role.SHAPE, Role.AXES, Role.STARTS, Role.ENDS, Role.STEPS, Role.SIZES})


def _is_small_int_const(value: Value | None) -> bool:
    return (
        value is not None
        and value.role == CONST
        and value.dtype is not None
        and value.dtype.startswith(("int", "uint"))
        and np.size(np.asarray(_tensor(value.payload, None))) <= 8
    )


def _python_constant(value: Value) -> list[int]:
    return [int(x) for x in np.asarray(_tensor(value.payload, None)).reshape(-1)]


def _register_module(root: nn.Module, target: str, module: nn.Module) -> str:
    parts = _attr_path(target)
    owner = _owner(root, parts)
    if not hasattr(owner, parts[-1]):
        owner.add_module(parts[-1], module)
    return ".".join(parts)


# ----- files and comparison -----------------------------------------------------------------
def load_pickled_module(path, *, trust_pickle: bool) -> nn.Module:
    """Load a module saved with `torch.save(model)`; refuse without explicit trust.

    Unpickling runs arbitrary code, so it needs `trust_pickle`. A file that holds
    only a state dict is refused: the weights alone do not say what the network is.
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise RescompileError(f"{path}: no such file")
    try:
        with _quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        obj = None  # not loadable without unpickling code: a pickled module (or garbage)
    if isinstance(obj, dict):
        raise RescompileError(
            f"{path} holds a state dict (weights only), not a model: build the model in "
            "Python, load_state_dict, and pass the module to rescompile.apply, "
            "or save it with torch.export.save as .pt2"
        )
    if not trust_pickle:
        raise RescompileError(
            f"{path} is a pickled module; loading it runs code from the file. "
            "Pass --trust-pickle if you trust it, or save it as .pt2 with torch.export.save"
        )
    try:
        with _quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RescompileError(
            f"{path}: cannot unpickle ({_first_line(exc)}); the classes it needs must be importable"
        ) from exc
    if not isinstance(obj, nn.Module):
        raise RescompileError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj.eval()


def example_inputs_of(graph: Graph) -> tuple[tuple, dict]:
    source = graph.source
    if not isinstance(source, TorchSource) or (not source.example_args and not source.example_kwargs):
        raise RescompileError(
            "no example inputs are known for this program; save it with "
            "torch.export.save from an ExportedProgram that has them, or pass "
            "--example-inputs"
        )
    return source.example_args, source.example_kwargs


def save_program(graph: Graph, path) -> None:
    """Write the rewritten torch graph as `.pt2` (torch.export.save) or `.onnx`
    (torch.onnx.export, dynamo), atomically."""
    import os
    from pathlib import Path

    from rescompile.frontends._staging import staging_dir

    path = Path(path)
    args, kwargs = example_inputs_of(graph)
    module = export_module(graph).eval()
    with staging_dir(path) as tmpdir:
        try:
            target = tmpdir / path.name
            with _quiet(), torch.no_grad():
                if path.suffix == ".pt2":
                    ep = torch.export.export(module, args, kwargs, strict=False)
                    torch.export.save(ep, str(target))
                elif path.suffix == ".onnx":
                    torch.onnx.export(module, args, str(target), kwargs=kwargs, dynamo=True, verbose=False)
                else:
                    raise RescompileError(f"-o {path}: write .pt2 or .onnx")
            for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):  # model file last
                os.replace(f, tmpdir.parent / f.name)
        except (RescompileError, OSError):
            raise
        except Exception as exc:
            raise RescompileError(f"cannot write {path}: {_first_line(exc)}") from exc


def compare_modules(
    original: nn.Module,
    rewritten: nn.Module,
    inputs: Any,
    *,
    kwargs: dict | None = None,
    atol: float = 1e-5,
    rtol: float = 0.0,
):
    """Run two modules on the same inputs; compare every tensor in their outputs."""
    from torch.utils import _pytree as pytree

    from rescompile.validation import ValidationResult, diff

    if inputs is None and not kwargs:
        raise RescompileError("validate needs inputs for nn.Modules (a tensor, tuple or dict)")
    args, kwargs = normalize_example_inputs(inputs, kwargs)
    with torch.no_grad():
        a = original(*args, **kwargs)
        b = rewritten(*args, **kwargs)
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if len(leaves_a) != len(leaves_b):
        raise RescompileError(f"the modules return {len(leaves_a)} and {len(leaves_b)} tensors")
    diffs = []
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            diffs.append(
                diff(f"output[{i}]", x.detach().float().numpy(), y.detach().float().numpy(), atol, rtol)
            )
    return ValidationResult(tuple(diffs), atol, rtol, {})
