"""fp16 and bf16 weights keep their dtype through import, passes and export.

numpy has no bfloat16: ONNX payloads are onnx-ir tensors (ml_dtypes arrays),
torch payloads torch tensors. Passes that rewrite payloads (`fold`, the
`compensate` options) must write them back in their own dtype, rounded once,
and leave every other weight's bytes alone. ONNX Runtime's CPU provider has
no bf16 kernels, so bf16 models are checked by running them upcast to fp32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

import rescompile
from rescompile.api import build_passes, run_passes
from rescompile.frontends.onnx import load_onnx, save_onnx

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
D, BLOCKS = 8, 2
# Weights each pass rewrites (the rest must keep their bytes); new ones start with "rescompile.".
BRANCH_WEIGHTS = {f"{w}{b}" for w in "wb" for b in range(BLOCKS)}
PIPELINES = {
    "rezero-layerscale-fold": (["rezero", "layerscale:init=0.3", "fold"], BRANCH_WEIGHTS),
    "laurel": (["laurel"], set()),
    "decay-compensate": (["decay:compensate=true"], BRANCH_WEIGHTS),
}


def _weights(dtype: np.dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = {}
    for b in range(BLOCKS):
        weights[f"ln{b}.g"] = 1 + 0.1 * rng.standard_normal(D)
        weights[f"ln{b}.b"] = 0.1 * rng.standard_normal(D)
        weights[f"w{b}"] = rng.standard_normal((D, D)) / np.sqrt(D)
        weights[f"b{b}"] = 0.1 * rng.standard_normal(D)
    weights["lnf.g"], weights["lnf.b"] = 1 + 0.1 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)
    return {k: v.astype(dtype) for k, v in weights.items()}


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A pre-norm residual stack ending in a norm: x + (LN(x) @ W + b), twice, then LN."""
    elem = ir.DataType.from_numpy(next(iter(weights.values())).dtype).value
    nodes, x = [], "x"
    for b in range(BLOCKS):
        nodes += [
            helper.make_node("LayerNormalization", [x, f"ln{b}.g", f"ln{b}.b"], [f"n{b}"], axis=-1),
            helper.make_node("MatMul", [f"n{b}", f"w{b}"], [f"m{b}"]),
            helper.make_node("Add", [f"m{b}", f"b{b}"], [f"branch{b}"]),
            helper.make_node("Add", [x, f"branch{b}"], [f"h{b}"]),
        ]
        x = f"h{b}"
    nodes.append(helper.make_node("LayerNormalization", [x, "lnf.g", "lnf.b"], ["y"], axis=-1))
    inits = [ir.serde.serialize_tensor(ir.Tensor(v, name=k)) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", elem, [2, 4, D])],
        [helper.make_tensor_value_info("y", elem, [2, 4, D])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _initializers(path) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in ir.load(path).graph.initializers.items()}


def _as_float32(path) -> bytes:
    """The model with every bf16/fp16 tensor and type widened to fp32 (exact), for ONNX Runtime."""
    model = ir.load(path)
    graph = model.graph
    values = [
        *graph.inputs,
        *graph.outputs,
        *graph.initializers.values(),
        *(out for node in graph for out in node.outputs),
    ]
    for value in values:
        if value.dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            value.dtype = ir.DataType.FLOAT
            if value.const_value is not None:
                value.const_value = ir.Tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    return ir.serde.serialize_model(model).SerializeToString()


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("source", ["file", "external-data", "onnx_ir.Model"])
def test_onnx_payloads_keep_dtype_and_bytes(tmp_path, dtype, pipeline, source):
    specs, rewritten = PIPELINES[pipeline]
    weights = _weights(DTYPES[dtype])
    src = tmp_path / "in.onnx"
    if source == "external-data":  # lazy, memory-mapped payloads
        ir.save(
            ir.serde.deserialize_model(_model(weights)),
            src,
            external_data="in.onnx.data",
            size_threshold_bytes=0,
        )
    else:
        onnx.save(_model(weights), src)
    # A file is written back into (export syncs the loaded model); a caller's model is rebuilt.
    graph = load_onnx(ir.load(src) if source == "onnx_ir.Model" else src)
    run_passes(graph, build_passes(specs))
    # Between passes too, each payload holds what its value says (not float64 awaiting export).
    assert {v.name: np.asarray(v.payload).dtype.name for v in graph.initializers.values()} == {
        v.name: v.dtype for v in graph.initializers.values()
    }
    save_onnx(graph, tmp_path / "out.onnx")
    out = _initializers(tmp_path / "out.onnx")

    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, DTYPES[dtype])
    for name, array in weights.items():
        if name in rewritten:
            continue
        assert out[name].dtype == array.dtype and out[name].tobytes() == array.tobytes(), name
    if pipeline == "rezero-layerscale-fold":
        gamma = float(np.asarray(0.3, DTYPES[dtype]))  # the factor as the model stores it
        assert not [k for k in out if k.startswith("rescompile.")], "fold drops the factors"
        for name in rewritten:  # rounded once, from the exact product
            want = (weights[name].astype(np.float64) * gamma).astype(DTYPES[dtype])
            assert out[name].dtype == want.dtype and out[name].tobytes() == want.tobytes(), name

    x = np.random.default_rng(1).standard_normal((2, 4, D)).astype(np.float32)
    reference = _run(_model({k: v.astype(np.float32) for k, v in weights.items()}).SerializeToString(), x)
    if pipeline == "rezero-layerscale-fold":  # layerscale:init=0.3 changes the function: fold must not
        reference = _run(_as_float32(_save_unfolded(tmp_path, src, specs[:-1])), x)
    widened = _run(_as_float32(tmp_path / "out.onnx"), x)
    tolerance = 1e-2 if dtype == "float16" else 5e-2  # weights rounded again by compensate/fold
    np.testing.assert_allclose(widened, reference, atol=tolerance)
    if dtype == "float16":  # ONNX Runtime runs fp16 natively
        native = _run((tmp_path / "out.onnx").read_bytes(), x.astype(np.float16))
        assert native.dtype == np.float16
        np.testing.assert_allclose(native.astype(np.float32), reference, atol=2e-2)


def _save_unfolded(tmp_path, src, specs):
    graph = load_onnx(src)
    run_passes(graph, build_passes(specs))
    save_onnx(graph, tmp_path / "unfolded.onnx")
    return tmp_path / "unfolded.onnx"


def test_an_unchanged_onnx_model_keeps_every_payload_byte(tmp_path):
    for dtype in DTYPES.values():
        weights = _weights(dtype)
        onnx.save(_model(weights), tmp_path / "in.onnx")
        graph = load_onnx(tmp_path / "in.onnx")
        run_passes(graph, build_passes(["identity"]))
        save_onnx(graph, tmp_path / "out.onnx")
        out = _initializers(tmp_path / "out.onnx")
        assert {k: (v.dtype, v.tobytes()) for k, v in out.items()} == {
            k: (v.dtype, v.tobytes()) for k, v in weights.items()
        }


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks, self.norm = nn.Sequential(_Block(), _Block()), nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(self.blocks(x))


def _stack(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    module = _Stack().to(dtype).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms' gains and shifts away from 1 and 0
    return module


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_payloads_keep_dtype_through_layerscale_and_fold(dtype):
    module = _stack(dtype)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 4, D, dtype=dtype)
    out = rescompile.apply(module, ["layerscale", "fold"], (x,))
    params = dict(out.named_parameters())
    assert set(params) == set(dict(module.named_parameters()))
    assert all(p.dtype == dtype for p in params.values())
    with torch.no_grad():
        assert torch.equal(out(x), module(x))  # gamma = 1: folding changes no bit
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items()), "the original is untouched"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_fold_rounds_once_to_the_weights_dtype(dtype):
    module = _stack(dtype)
    x = torch.randn(2, 4, D, dtype=dtype)
    out = rescompile.apply(module, ["layerscale:init=0.3", "fold"], (x,))
    gamma = torch.tensor(0.3, dtype=dtype).double()
    for name, param in module.named_parameters():
        folded = out.get_parameter(name)
        want = (param.double() * gamma).to(dtype) if name.split(".")[-2] == "fc" else param
        assert folded.dtype == dtype and torch.equal(folded, want), name
    scaled = _stack(dtype)
    with torch.no_grad():
        for block in scaled.blocks:
            block.fc.weight.mul_(0.3)
            block.fc.bias.mul_(0.3)
        atol = 5e-2 if dtype == torch.bfloat16 else 1e-2
        np.testing.assert_allclose(out(x).float(), scaled(x).float(), atol=atol)


def test_torch_bf16_new_parameters_export():
    module = _stack(torch.bfloat16)
    x = torch.randn(2, 4, D, dtype=torch.bfloat16)
    out = rescompile.apply(module, ["rezero"], (x,))
    assert all(p.dtype == torch.bfloat16 for p in out.parameters())
