"""Large benchmark models, built once into .cache/bench."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tools.bench.common import CACHE


def residual_chain(blocks: int, width: int = 4, path: Path | None = None) -> Path:
    """A residual MLP written directly as ONNX (no torch): per block
    x + MatMul(Relu(MatMul(x, W1)), W2), 4 nodes, 2 small weights."""
    import onnx_ir as ir

    path = path or CACHE / f"chain-{blocks}.onnx"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, width]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, current = [], [], x
    for b in range(blocks):
        w1 = ir.Value(
            name=f"b{b}.w1",
            const_value=ir.tensor(rng.standard_normal((width, width)).astype(np.float32) * 0.1),
        )
        w2 = ir.Value(
            name=f"b{b}.w2",
            const_value=ir.tensor(rng.standard_normal((width, width)).astype(np.float32) * 0.1),
        )
        for w in (w1, w2):
            w.shape, w.type = ir.Shape([width, width]), ir.TensorType(ir.DataType.FLOAT)
        inits += [w1, w2]
        h = ir.node("MatMul", [current, w1], name=f"b{b}.fc1")
        r = ir.node("Relu", h.outputs, name=f"b{b}.act")
        o = ir.node("MatMul", [r.outputs[0], w2], name=f"b{b}.fc2")
        a = ir.node("Add", [current, o.outputs[0]], name=f"b{b}.add")
        for n, suffix in ((h, "h"), (r, "r"), (o, "o"), (a, "y")):
            n.outputs[0].name = f"b{b}.{suffix}"
            n.outputs[0].shape = ir.Shape([1, width])
            n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes += [h, r, o, a]
        current = a.outputs[0]
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 18}, name="chain")
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(ir.Model(graph, ir_version=10, producer_name="rescompile-bench"), path)
    return path


def gpt2_large_export(layers: int = 48) -> Path:
    """GPT-2 with 48 layers, n_embd 768 (about 1.4 GB of weights), dynamo export."""
    path = CACHE / f"gpt2-{layers}.onnx"
    if path.exists():
        return path
    import logging

    import torch
    import transformers as T

    from tools.models import ModelCase, export_onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = T.GPT2Model(T.GPT2Config(n_layer=layers, use_cache=False)).eval()
    case = ModelCase("gpt2", model, (), {"input_ids": torch.randint(0, 50257, (1, 128))}, sites=2 * layers)
    print(f"exporting GPT-2 ({layers} layers) once into {path} ...", file=sys.stderr)
    return export_onnx(case, path)
