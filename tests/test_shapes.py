"""Shape and dtype inference (rescompile.ir.shapes) against what ONNX Runtime and torch report.

Every test model is imported, its activation shapes and dtypes are erased and inferred again, and
the result is compared with the shapes ONNX Runtime computes for every intermediate value (ONNX path)
and with torch's FakeTensor metadata (torch path). A dim inferred as a symbol agrees when one size
per symbol explains every value. Pass-created nodes are checked the same way after a pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.ir import ACTIVATION, op_info
from rescompile.ir.shapes import infer_shapes
from tools.models import HF_CASES, SYNTHETIC_CASES, build

MODELS = [*HF_CASES, *SYNTHETIC_CASES]
ONNX_CASES = [(name, exporter) for name in MODELS for exporter in ("dynamo", "legacy")]
# Values left partly unknown: symbolic slices and shape values that depend on an opaque op.
MIN_COVERAGE = 0.9


def _erase(graph, nodes=None) -> dict:
    """Forget node outputs' shapes and dtypes; returns what they were, by value. Opaque nodes keep
    theirs: inference leaves them alone, as it would after a pass."""
    before = {}
    for node in graph if nodes is None else nodes:
        if op_info(node) is None:
            continue
        for value in node.outputs:
            before[value] = (value.shape, value.dtype)
            value.shape = value.dtype = None
    return before


class _Symbols:
    """One size per symbol: a symbolic dim agrees with any size, consistently."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def agree(self, inferred, actual: int) -> bool:
        if inferred is None or isinstance(inferred, int):
            return inferred is None or inferred == actual
        return self.sizes.setdefault(inferred, actual) == actual


def _ort_values(path, graph, names) -> dict[str, np.ndarray]:
    """Every named value, as ONNX Runtime computes it on random inputs."""
    import onnxruntime as ort

    from rescompile.validation import random_onnx_inputs

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds, _ = random_onnx_inputs(session)
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, feeds)))


def _compare_ort(values, actual: dict[str, np.ndarray]) -> tuple[int, int, list[str]]:
    """(values fully inferred, values compared, disagreements)."""
    symbols, full, bad = _Symbols(), 0, []
    for value in values:
        array = actual.get(value.name)
        if array is None:
            continue
        if value.shape is not None and (
            len(value.shape) != array.ndim
            or not all(symbols.agree(d, int(n)) for d, n in zip(value.shape, array.shape))
        ):
            bad.append(f"{value.name}: inferred {value.shape}, ORT {array.shape}")
        if value.dtype is not None and value.dtype != array.dtype.name:
            bad.append(f"{value.name}: inferred {value.dtype}, ORT {array.dtype.name}")
        full += value.shape is not None and None not in value.shape and value.dtype is not None
    return full, sum(1 for v in values if v.name in actual), bad


@pytest.mark.parametrize("name,exporter", ONNX_CASES)
def test_onnx_models_agree_with_ort(name, exporter, onnx_model):
    if exporter not in build(name).exporters:
        pytest.skip(f"{name} is not exported with {exporter}")
    path = onnx_model(name, exporter)
    graph = load_onnx(path)
    before = _erase(graph)
    report = infer_shapes(graph)
    assert not report.conflicts
    values = [v for node in graph for v in node.outputs if v.role == ACTIVATION]
    full, compared, bad = _compare_ort(values, _ort_values(path, graph, [v.name for v in values]))
    assert not bad, bad[:5]
    # The exporter's own shapes: every inferred dim equal where both are concrete.
    for value, (shape, dtype) in before.items():
        if value.shape is not None and shape is not None:
            assert all(
                not (isinstance(a, int) and isinstance(b, int) and a != b) for a, b in zip(value.shape, shape)
            ), (value.name, value.shape, shape)
            assert dtype is None or value.dtype in (None, dtype)
    print(f"{name}-{exporter}: {full}/{compared} values inferred, {len(report.unknown)} nodes left alone")
    assert full >= MIN_COVERAGE * compared, report.unknown[:5]


def _torch_graph(name, dynamic):
    from rescompile.pipeline import load

    case = build(name)
    return case, load(case.module, case.args, example_kwargs=case.kwargs, dynamic=dynamic)


def _evaluate(dim, sizes: dict[str, int]):
    """A torch symbolic size ('s70*s72', '((s99 - 1)//2) + 1') at the example inputs' sizes."""
    return dim if not isinstance(dim, str) else eval(dim, {"__builtins__": {}}, sizes)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", MODELS)
def test_torch_models_agree_with_fake_tensors(name, dynamic):
    """Static captures must be inferred almost entirely; dynamic ones must agree wherever a dim is
    inferred (sizes after a strided window or a symbolic concat or slice stay None: not monomials)."""
    case, graph = _torch_graph(name, dynamic)
    sizes: dict[str, int] = {}
    example = dict(zip([v.name for v in graph.inputs], [*case.args, *case.kwargs.values()]))
    for value in graph.inputs:
        for dim, size in zip(value.shape or (), getattr(example.get(value.name), "shape", ())):
            if isinstance(dim, str):
                sizes[dim] = int(size)
    before = _erase(graph)
    report = infer_shapes(graph)
    assert not report.conflicts
    tensors = [(v, shape, dtype) for v, (shape, dtype) in before.items() if shape is not None]
    full = 0
    for value, shape, dtype in tensors:
        assert value.dtype in (None, dtype), (value.name, value.dtype, dtype)
        if value.shape is None:
            continue
        assert len(value.shape) == len(shape), (value.name, value.shape, shape)
        for inferred, want in zip(value.shape, shape):
            assert inferred is None or _evaluate(inferred, sizes) == _evaluate(want, sizes), (
                value.name,
                value.shape,
                shape,
            )
        full += None not in value.shape and value.dtype is not None
    kind = "dynamic" if dynamic else "static"
    print(
        f"{name}-torch-{kind}: {full}/{len(tensors)} values inferred, {len(report.unknown)} nodes left alone"
    )
    assert dynamic or full >= MIN_COVERAGE * len(tensors), report.unknown[:5]


PASS_CASES = [
    *[
        ("gpt2", spec)
        for spec in (
            "rezero",
            "hyper:n=4",
            "hyper:n=2,dynamic=true",
            "laurel:variant=lr,rank=4",
            "laurel:variant=pa",
            "layerscale",
            "gate",
            "frac",
            "dense",
        )
    ],
    ("llama", "hyper:n=4"),
    ("preact_cnn", "hyper:n=4"),
    ("preact_cnn", "dense"),
    ("residual_cnn", "rezero"),
    ("residual_cnn", "layerscale"),
]


@pytest.mark.parametrize("name,spec", PASS_CASES)
def test_pass_created_nodes_agree_with_ort(name, spec, onnx_model, tmp_path):
    from rescompile.api import build_passes, run_passes

    graph = load_onnx(onnx_model(name))
    old = set(graph)
    run_passes(graph, build_passes([spec]))
    created = [node for node in graph if node not in old]
    assert created
    _erase(graph, created)
    report = infer_shapes(graph, only=created)
    assert not report.conflicts and not report.unknown, report.unknown[:5]
    path = tmp_path / "pass.onnx"
    save_onnx(graph, path)
    values = [v for node in created for v in node.outputs]
    full, compared, bad = _compare_ort(values, _ort_values(path, graph, [v.name for v in values]))
    assert not bad, bad[:5]
    assert full == compared == len(values)


def _small_graph():
    """x (s0, 4, 8) -> Reshape [0, -1] -> MatMul W (32, 6) -> Custom (opaque)."""
    from rescompile.ir import Graph, Node, Value

    graph = Graph()
    x = graph.add_input(Value("x", dtype="float32", shape=("s0", 4, 8)))
    target = graph.add_param("target", np.array([0, -1], dtype=np.int64), dtype="int64", trainable=False)
    weight = graph.add_param("w", np.zeros((32, 6), dtype=np.float32), dtype="float32")
    reshape = graph.append(Node("Reshape", [x, target]))
    matmul = graph.append(Node("MatMul", [reshape.output, weight]))
    custom = graph.append(Node("Custom", [matmul.output], domain="example"))
    graph.set_outputs([custom.output])
    return graph, reshape, matmul, custom


def test_symbolic_dims_stay_symbolic_and_opaque_ops_are_listed():
    graph, reshape, matmul, custom = _small_graph()
    custom.output.shape = ("s0", 6)
    report = infer_shapes(graph)
    assert reshape.output.shape == ("s0", 32) and matmul.output.shape == ("s0", 6)
    assert matmul.output.dtype == "float32"
    assert custom.output.shape == ("s0", 6) and custom.output.dtype is None
    assert report.inferred == 2 and report.total == 3 and not report.conflicts
    assert report.unknown == [f"{custom.name} (Custom): opaque: no entry in the op table"]


def test_known_shapes_are_kept_and_conflicts_reported():
    graph, reshape, matmul, _ = _small_graph()
    reshape.output.shape = (2, 32)  # more precise than the inferred ('s0', 32): kept
    matmul.output.shape = (2, 7)  # contradicts the weight: reported, not overwritten
    report = infer_shapes(graph, only=[reshape, matmul])
    assert reshape.output.shape == (2, 32)
    assert matmul.output.shape == (2, 7)
    assert [(c.value, c.what, c.inferred) for c in report.conflicts] == [
        (matmul.output.name, "shape", (2, 6))
    ]


def test_dtypes_follow_casts_and_comparisons():
    from rescompile.ir import Graph, Node, Value

    graph = Graph()
    x = graph.add_input(Value("x", dtype="bfloat16", shape=(2, 3)))
    doubled = graph.append(Node("Add", [x, x]))
    cast = graph.append(Node("Cast", [doubled.output], attrs={"to": 1}))
    equal = graph.append(Node("Equal", [cast.output, cast.output]))
    shape = graph.append(Node("Shape", [equal.output]))
    graph.set_outputs([shape.output])
    assert not infer_shapes(graph).unknown
    got = [(n.output.dtype, n.output.shape) for n in (doubled, cast, equal, shape)]
    assert got == [("bfloat16", (2, 3)), ("float32", (2, 3)), ("bool", (2, 3)), ("int64", (2,))]


def test_pass_manager_rejects_a_pass_whose_new_node_contradicts_its_op(onnx_model):
    """PassManager infers the shapes of the nodes a pass creates; a hand-set shape the op cannot
    produce is a pass bug: the pass fails and the graph is left as it was."""
    from rescompile.frontends.onnx import load_onnx
    from rescompile.infra import PassBase, PassError, PassManager, PassResult
    from rescompile.ir import Node

    class WrongShape(PassBase):
        name = "wrongshape"
        summary = "adds x * 1 with a wrong hand-set shape"

        def call(self, graph):
            x = graph.outputs[0]
            one = graph.add_param("one", np.ones((), np.float32), dtype="float32", trainable=False)
            node = Node("Mul", [x, one])
            graph.append(node)
            node.outputs[0].shape, node.outputs[0].dtype = (7, 7, 7), "float32"
            return PassResult(graph, True)

    graph = load_onnx(onnx_model("residual_mlp"))
    count = len(graph)
    with pytest.raises(PassError, match=r"wrongshape: .*with shape \(7, 7, 7\), but its op gives"):
        PassManager([WrongShape()])(graph)
    assert len(graph) == count and "one" not in graph.initializers
