"""Normalized op kinds: the vocabulary analysis reasons in.

Frontends map their own ops onto these kinds; analysis never looks at op names.
The IR's core op set (what passes insert) uses ONNX standard op names, so the
ONNX table here doubles as the kind table for pass-created nodes.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["OpKind", "kind_of_onnx_op", "MIXING_FREE_KINDS", "ParamSlots", "onnx_param_slots"]


class OpKind(enum.Enum):
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    WEIGHTED = "weighted"      # matmul / gemm / conv / linear: mixes channels with weights
    NORM = "norm"              # layer / batch / group / rms norm
    ACTIVATION = "activation"  # elementwise nonlinearity
    LAYOUT = "layout"          # reshape / transpose / squeeze / flatten / expand
    CONCAT = "concat"
    SPLIT = "split"            # split / slice / gather along an axis
    SHAPE = "shape"            # reads only the shape of its input
    CONSTANT = "constant"
    REDUCE = "reduce"
    SOFTMAX = "softmax"
    CAST = "cast"
    IDENTITY = "identity"      # identity / dropout in inference
    OTHER = "other"


_ONNX_KINDS: dict[str, OpKind] = {
    "Add": OpKind.ADD, "Sum": OpKind.ADD, "Sub": OpKind.SUB, "Mul": OpKind.MUL, "Div": OpKind.DIV,
    "MatMul": OpKind.WEIGHTED, "Gemm": OpKind.WEIGHTED, "Conv": OpKind.WEIGHTED,
    "ConvTranspose": OpKind.WEIGHTED, "Einsum": OpKind.WEIGHTED, "MatMulInteger": OpKind.WEIGHTED,
    "QLinearMatMul": OpKind.WEIGHTED, "QLinearConv": OpKind.WEIGHTED,
    "LayerNormalization": OpKind.NORM, "BatchNormalization": OpKind.NORM,
    "GroupNormalization": OpKind.NORM, "InstanceNormalization": OpKind.NORM,
    "RMSNormalization": OpKind.NORM, "SimplifiedLayerNormalization": OpKind.NORM,
    "SkipLayerNormalization": OpKind.NORM, "LpNormalization": OpKind.NORM,
    "Relu": OpKind.ACTIVATION, "Gelu": OpKind.ACTIVATION, "FastGelu": OpKind.ACTIVATION,
    "Tanh": OpKind.ACTIVATION, "Sigmoid": OpKind.ACTIVATION, "Erf": OpKind.ACTIVATION,
    "Elu": OpKind.ACTIVATION, "Selu": OpKind.ACTIVATION, "LeakyRelu": OpKind.ACTIVATION,
    "PRelu": OpKind.ACTIVATION, "HardSigmoid": OpKind.ACTIVATION, "HardSwish": OpKind.ACTIVATION,
    "Softplus": OpKind.ACTIVATION, "Softsign": OpKind.ACTIVATION, "Mish": OpKind.ACTIVATION,
    "Swish": OpKind.ACTIVATION, "Exp": OpKind.ACTIVATION, "Log": OpKind.ACTIVATION,
    "Sqrt": OpKind.ACTIVATION, "Reciprocal": OpKind.ACTIVATION, "Neg": OpKind.ACTIVATION,
    "Abs": OpKind.ACTIVATION, "Pow": OpKind.ACTIVATION, "Clip": OpKind.ACTIVATION,
    "Sin": OpKind.ACTIVATION, "Cos": OpKind.ACTIVATION, "Celu": OpKind.ACTIVATION,
    "ThresholdedRelu": OpKind.ACTIVATION,
    "Reshape": OpKind.LAYOUT, "Transpose": OpKind.LAYOUT, "Squeeze": OpKind.LAYOUT,
    "Unsqueeze": OpKind.LAYOUT, "Flatten": OpKind.LAYOUT, "Expand": OpKind.LAYOUT,
    "Tile": OpKind.LAYOUT, "DepthToSpace": OpKind.LAYOUT, "SpaceToDepth": OpKind.LAYOUT,
    "Concat": OpKind.CONCAT,
    "Split": OpKind.SPLIT, "Slice": OpKind.SPLIT, "Gather": OpKind.SPLIT,
    "GatherElements": OpKind.SPLIT, "GatherND": OpKind.SPLIT,
    "Shape": OpKind.SHAPE, "Size": OpKind.SHAPE,
    "Constant": OpKind.CONSTANT, "ConstantOfShape": OpKind.CONSTANT,
    "ReduceMean": OpKind.REDUCE, "ReduceSum": OpKind.REDUCE, "ReduceMax": OpKind.REDUCE,
    "ReduceMin": OpKind.REDUCE, "ReduceProd": OpKind.REDUCE, "ReduceL2": OpKind.REDUCE,
    "ReduceSumSquare": OpKind.REDUCE, "GlobalAveragePool": OpKind.REDUCE,
    "AveragePool": OpKind.REDUCE, "MaxPool": OpKind.REDUCE, "GlobalMaxPool": OpKind.REDUCE,
    "Softmax": OpKind.SOFTMAX, "LogSoftmax": OpKind.SOFTMAX,
    "Cast": OpKind.CAST, "CastLike": OpKind.CAST,
    "Identity": OpKind.IDENTITY, "Dropout": OpKind.IDENTITY,
}

# Kinds that pass a tensor through without mixing it with an unrelated one:
# a residual stream may flow through them from one site to the next.
MIXING_FREE_KINDS = frozenset({
    OpKind.NORM, OpKind.ACTIVATION, OpKind.CAST, OpKind.IDENTITY, OpKind.LAYOUT,
})


def kind_of_onnx_op(op_type: str) -> OpKind:
    """Kind of an ONNX standard-domain op (OTHER when unknown)."""
    return _ONNX_KINDS.get(op_type, OpKind.OTHER)


@dataclasses.dataclass(frozen=True)
class ParamSlots:
    """Where an op keeps its parameters among its inputs, so a pass can scale the
    op's output by changing parameters without knowing the op or its frontend.

    For weighted ops the output channel c is produced by weight slice
    `weight[..., c, ...]` along `weight_out_axis` plus `bias[c]`; for norms the
    output is normalized * gain + shift, per channel.
    """

    weight: int | None = None
    weight_out_axis: int | None = None
    bias: int | None = None
    gain: int | None = None
    shift: int | None = None


def onnx_param_slots(op_type: str, attrs: dict) -> ParamSlots | None:
    """ParamSlots for ONNX standard ops (the core op set)."""
    def attr(name, default):
        value = attrs.get(name, default)
        return getattr(value, "value", value)
    if op_type == "MatMul":
        return ParamSlots(weight=1, weight_out_axis=-1)
    if op_type == "Gemm":
        if attr("transA", 0):
            return None
        return ParamSlots(weight=1, weight_out_axis=0 if attr("transB", 0) else 1, bias=2)
    if op_type in ("Conv", "ConvTranspose"):
        out_axis = 0 if op_type == "Conv" else 1
        return ParamSlots(weight=1, weight_out_axis=out_axis, bias=2) if attr("group", 1) == 1 or op_type == "Conv" else None
    if op_type in ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"):
        return ParamSlots(gain=1, shift=2)
    if op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        return ParamSlots(gain=1)
    return None
