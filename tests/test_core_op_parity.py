"""Every core op agrees in its two lowerings: ONNX (run in ONNX Runtime) and torch (_torch_core).

Passes insert core ops (ONNX names); the ONNX exporter writes them as ONNX nodes
and the torch exporter calls CORE_OPS. Each case is a one-node IR graph built
from scratch, exported both ways with the real exporters and run on the same
random inputs, with the attribute variants passes use (hyper's MatMul of a
small matrix on a batched tensor, Slice by int64 inputs on axis -2, ReduceSum
with keepdims, Reshape with 0 and -1, ...). Integer constants go through the
torch exporter's small-constant path as passes' constants do.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import fx

from rescompile.errors import RescompileError
from rescompile.frontends._onnx_export import export_model
from rescompile.frontends._torch_core import CORE_OPS
from rescompile.frontends.onnx import MAX_OPSET, MIN_OPSET
from rescompile.frontends.torch import TorchSource, _Slot, export_module
from rescompile.ir import Graph, Node, Value

RNG = np.random.default_rng(0)


def f32(*shape, low=None):
    array = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(array) + low if low is not None else array


def i64(*values):
    return np.array(values, dtype=np.int64)


@dataclasses.dataclass
class Case:
    """inputs: (array, is_constant) per node input, None for an omitted optional input."""

    id: str
    inputs: list
    attrs: dict = dataclasses.field(default_factory=dict)
    opset: int = 18
    out_dtype: str | None = None  # the output's dtype when it is not the first input's


def inp(array):
    return (array, False)


def const(array):
    return (array, True)


CASES: dict[str, list[Case]] = {
    "Add": [
        Case("same", [inp(f32(2, 3, 4)), inp(f32(2, 3, 4))]),
        Case("per-channel", [inp(f32(2, 3, 4)), const(f32(4))]),
        Case("nchw-channel", [inp(f32(2, 3, 4, 5)), const(f32(3, 1, 1))]),
        Case("scalar", [inp(f32(2, 3)), const(np.float32(1.5))]),
        Case("int", [inp(i64(1, -2, 3)), inp(i64(4, 5, -6))]),
    ],
    "Sub": [
        Case("broadcast", [inp(f32(2, 3, 4)), inp(f32(3, 1))]),
        Case("int", [inp(i64(1, -2, 3)), inp(i64(7))]),
    ],
    "Mul": [
        Case("per-channel", [inp(f32(2, 3, 4)), const(f32(4))]),
        Case("rows", [inp(f32(2, 5, 4, 6)), const(f32(4, 1))]),
        Case("scalar", [inp(f32(2, 3)), const(np.float32(2.0))]),
        Case("int", [inp(i64(1, -2, 3)), inp(i64(4, 5, -6))]),
    ],
    "Div": [
        Case("norm", [inp(f32(2, 5, 4, 3)), inp(f32(2, 5, 4, 1, low=0.5))]),
        Case("int-trunc", [inp(i64(7, -7, 9, -9)), inp(i64(2, 2, -4, -4))]),
    ],
    "MatMul": [
        Case("matrix-on-batch", [inp(f32(5, 4)), inp(f32(2, 3, 4, 8))]),
        Case("batch-on-matrix", [inp(f32(2, 3, 8)), const(f32(8, 4))]),
        Case("row-reduce", [const(f32(1, 4)), inp(f32(2, 3, 4, 8))]),
        Case("batched", [inp(f32(2, 3, 4, 5)), inp(f32(2, 3, 5, 6))]),
        Case("broadcast-batch", [inp(f32(3, 1, 4, 5)), inp(f32(2, 5, 6))]),
        Case("vectors", [inp(f32(2, 3, 4)), inp(f32(4))]),
    ],
    "Sigmoid": [Case("", [inp(f32(2, 3, 4) * 4)])],
    "Tanh": [Case("", [inp(f32(2, 3, 4) * 4)])],
    "Relu": [Case("", [inp(f32(2, 3, 4))]), Case("int", [inp(i64(-1, 0, 2))])],
    "Sqrt": [Case("", [inp(f32(2, 3, 4, low=0.0))])],
    "Max": [
        Case("eps", [inp(f32(2, 3, 1)), const(np.float32(1e-1))]),
        Case("one", [inp(f32(2, 3))]),
        Case("three", [inp(f32(2, 3)), inp(f32(3)), inp(f32(2, 1))]),
    ],
    "Slice": [
        Case("rows", [inp(f32(2, 3, 7, 4)), const(i64(1)), const(i64(5)), const(i64(-2))]),
        Case("no-axes", [inp(f32(6, 4)), const(i64(1, 0)), const(i64(4, 3))]),
        Case("clamped", [inp(f32(6, 4)), const(i64(-3)), const(i64(1 << 62)), const(i64(0))]),
        Case(
            "steps", [inp(f32(6, 8)), const(i64(0, 7)), const(i64(6, 0)), const(i64(0, 1)), const(i64(2, -3))]
        ),
        Case(
            "reverse", [inp(f32(5, 3)), const(i64(-1)), const(i64(-(1 << 62))), const(i64(0)), const(i64(-1))]
        ),
        Case("omitted-axes", [inp(f32(6, 4)), const(i64(1)), const(i64(5)), None, const(i64(2))]),
        Case("computed-bounds", [inp(f32(6, 4)), inp(i64(1)), inp(i64(3)), inp(i64(1))]),
    ],
    "Identity": [Case("", [inp(f32(2, 3))]), Case("int", [inp(i64(1, 2))])],
    "Concat": [
        Case("last", [inp(f32(2, 3)), inp(f32(2, 4)), const(f32(2, 1))], {"axis": -1}),
        Case("first", [inp(f32(1, 3)), inp(f32(2, 3))], {"axis": 0}),
        Case("int", [inp(i64(1, 2)), inp(i64(3))], {"axis": 0}),
    ],
    "Transpose": [
        Case("perm", [inp(f32(2, 3, 4, 5))], {"perm": [0, 2, 3, 1]}),
        Case("swap-last", [inp(f32(2, 3, 4))], {"perm": [0, 2, 1]}),
        Case("default", [inp(f32(2, 3, 4))]),
    ],
    "Reshape": [
        Case("split", [inp(f32(2, 3, 8)), const(i64(0, 0, 2, -1))]),
        Case("merge", [inp(f32(2, 3, 2, 4)), const(i64(0, 0, -1))]),
        Case("column", [inp(f32(6)), const(i64(-1, 1))]),
        Case("allowzero", [inp(f32(2, 3)), const(i64(3, 2))], {"allowzero": 1}),
        Case("computed-shape", [inp(f32(2, 6)), inp(i64(3, 4))]),
    ],
    "ReduceMean": [
        Case("axes-input", [inp(f32(2, 3, 4)), const(i64(-1))]),
        Case("no-keepdims", [inp(f32(2, 3, 4)), const(i64(0, 2))], {"keepdims": 0}),
        Case("all", [inp(f32(2, 3, 4))]),
        Case("all-no-keepdims", [inp(f32(2, 3, 4))], {"keepdims": 0}),
        Case("noop", [inp(f32(2, 3))], {"noop_with_empty_axes": 1}),
        Case("opset13-axes-attr", [inp(f32(2, 3, 4))], {"axes": [1], "keepdims": 1}, opset=13),
    ],
    "ReduceSum": [
        Case("norm", [inp(f32(2, 5, 4, 6)), const(i64(-1))], {"keepdims": 1}),
        Case("channel", [inp(f32(2, 3, 4, 5)), const(i64(1))], {"keepdims": 1}),
        Case("no-keepdims", [inp(f32(2, 3, 4)), const(i64(0, -1))], {"keepdims": 0}),
        Case("all", [inp(f32(2, 3, 4))]),
        Case("noop", [inp(f32(2, 3))], {"noop_with_empty_axes": 1}),
        Case("int", [inp(i64(1, 2, 3))], {"keepdims": 0}),
    ],
    "Softmax": [Case("last", [inp(f32(2, 3, 4))]), Case("axis", [inp(f32(2, 3, 4))], {"axis": 1})],
    "Gather": [
        Case("rows", [inp(f32(5, 3)), const(i64(4, 0, -1))]),
        Case("axis", [inp(f32(2, 5, 3)), const(i64(1, 3))], {"axis": -2}),
        Case("matrix", [inp(f32(5, 3)), inp(np.array([[0, 1], [4, -2]], np.int64))]),
        Case("scalar", [inp(f32(5, 3)), inp(np.array(2, np.int64))], {"axis": 0}),
    ],
    "Expand": [
        Case("batch", [inp(f32(1, 3, 1)), const(i64(2, 3, 4))]),
        Case("keeps-ones", [inp(f32(2, 3)), const(i64(1, 1))]),
        Case("rank-up", [inp(f32(3, 1)), const(i64(2, 1, 4))]),
    ],
    "Unsqueeze": [
        Case("axes", [inp(f32(2, 3)), const(i64(0, -1))]),
        Case("middle", [inp(f32(2, 3)), const(i64(1))]),
    ],
    "Squeeze": [Case("axes", [inp(f32(2, 1, 3, 1)), const(i64(1, -1))]), Case("all", [inp(f32(1, 2, 1, 3))])],
    "Cast": [
        Case("to-f16", [inp(f32(2, 3))], {"to": onnx.TensorProto.FLOAT16}, out_dtype="float16"),
        Case("to-int", [inp(f32(2, 3) * 5)], {"to": onnx.TensorProto.INT64}, out_dtype="int64"),
        Case("to-f32", [inp(i64(1, -2, 3))], {"to": onnx.TensorProto.FLOAT}, out_dtype="float32"),
        Case("to-bool", [inp(f32(2, 3).round())], {"to": onnx.TensorProto.BOOL}, out_dtype="bool"),
    ],
}


def _graph(op: str, case: Case) -> Graph:
    """A one-node IR graph, as a pass would build it, that both exporters accept."""
    graph = Graph("parity")
    inputs = []
    for i, item in enumerate(case.inputs):
        if item is None:
            inputs.append(None)
            continue
        array, is_const = item
        if is_const:
            inputs.append(graph.add_param(f"c{i}", array, dtype=array.dtype.name, trainable=False))
        else:
            inputs.append(graph.add_input(Value(f"x{i}", dtype=array.dtype.name, shape=array.shape)))
    node = Node(op, inputs, attrs=case.attrs, name="op", output_names=["y"])
    node.output.dtype = case.out_dtype or next(v.dtype for v in inputs if v is not None)
    graph.append(node)
    graph.set_outputs([node.output])
    graph.source = TorchSource(
        codegen=fx.graph.CodeGen(),
        placeholders=[v.name for v in graph.inputs],
        output_template=_Slot(0),
        buffers_persistent={},
        training=False,
        module_name="parity",
        method="torch.fx",
    )
    return graph


def _feeds(case: Case) -> list[np.ndarray]:
    return [item[0] for item in case.inputs if item is not None and not item[1]]


def _run_onnx(graph: Graph, case: Case) -> np.ndarray:
    proto = ir.serde.serialize_model(export_model(graph, default_opset=case.opset))
    # The output is declared without a shape (passes may not know it); inference fills it in.
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, _feeds(case))))[0]


def _run_torch(graph: Graph, case: Case) -> np.ndarray:
    module = export_module(graph)
    with torch.no_grad():
        return module(*(torch.from_numpy(np.array(a)) for a in _feeds(case))).numpy()


def _compare(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if np.issubdtype(want.dtype, np.floating):
        # 1e-6 relative to the output's scale: elements near zero of a sum differ by rounding.
        scale = float(np.max(np.abs(want.astype(np.float64)), initial=1.0))
        rtol = 1e-6 if want.dtype == np.float32 else 1e-3
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", sorted(CORE_OPS))
def test_core_op_agrees_in_torch_and_onnx_runtime(op):
    assert CASES.get(op), f"core op {op} has no parity case: add one to CASES"
    for case in CASES[op]:
        graph = _graph(op, case)
        want = _run_onnx(graph, case)
        got = _run_torch(_graph(op, case), case)
        try:
            _compare(got, want)
        except AssertionError as exc:
            raise AssertionError(f"{op} [{case.id}]: {exc}") from None


@pytest.mark.parametrize(
    "op, case",
    [
        ("Sub", Case("int-const", [inp(i64(1, -2, 3)), const(i64(7))])),
        ("Gather", Case("scalar-const", [inp(f32(5, 3)), const(np.array(2, np.int64))])),
    ],
)
def test_small_integer_constants_as_data(op, case):
    _compare(_run_torch(_graph(op, case), case), _run_onnx(_graph(op, case), case))


@pytest.mark.parametrize("op", sorted(CORE_OPS))
def test_every_onnx_attribute_is_a_keyword_of_the_lowering(op):
    """An attribute the lowering does not take would fail only when the module runs."""
    params = inspect.signature(CORE_OPS[op]).parameters
    for opset in range(MIN_OPSET, MAX_OPSET + 1):
        schema = onnx.defs.get_schema(op, opset)
        assert set(schema.attributes) <= set(params), (op, opset, set(schema.attributes) - set(params))


def test_every_case_names_a_core_op():
    assert not set(CASES) - set(CORE_OPS), "cases for ops that are not core ops"


def test_an_op_without_torch_lowering_is_named_in_one_line(monkeypatch):
    case = CASES["Relu"][0]
    graph = _graph("Relu", case)
    monkeypatch.delitem(CORE_OPS, "Relu")
    with pytest.raises(RescompileError) as info:
        export_module(graph)
    message = str(info.value)
    assert "\n" not in message and "Relu" in message and "op" in message


def test_a_multi_output_core_op_is_refused_in_one_line():
    graph = _graph("Relu", CASES["Relu"][0])
    split = Node("Split", [graph.inputs[0]], attrs={"axis": 0, "num_outputs": 2}, num_outputs=2, name="split")
    graph.append(split)
    graph.set_outputs([split.outputs[0]])
    with pytest.raises(RescompileError) as info:
        export_module(graph)
    assert "\n" not in str(info.value) and "Split" in str(info.value)
