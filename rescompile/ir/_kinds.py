"""Normalized op kinds: the vocabulary analysis reasons in.

Frontends map their own ops onto these kinds through the op table (`rescompile.ir.ops`); analysis
never looks at op names.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["MIXING_FREE_KINDS", "OpKind", "ParamSlots"]


class OpKind(enum.Enum):
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    WEIGHTED = "weighted"  # matmul / gemm / conv / linear: mixes channels with weights
    NORM = "norm"  # layer / batch / group / rms norm
    ACTIVATION = "activation"  # elementwise nonlinearity
    LAYOUT = "layout"  # reshape / transpose / squeeze / flatten / expand
    CONCAT = "concat"
    SPLIT = "split"  # split / slice / gather along an axis
    SHAPE = "shape"  # reads only the shape of its input
    CONSTANT = "constant"
    REDUCE = "reduce"
    SOFTMAX = "softmax"
    CAST = "cast"
    IDENTITY = "identity"  # identity / dropout in inference
    OTHER = "other"


# Kinds that pass a tensor through without mixing it with an unrelated one:
# a residual stream may flow through them from one site to the next.
MIXING_FREE_KINDS = frozenset(
    {
        OpKind.NORM,
        OpKind.ACTIVATION,
        OpKind.CAST,
        OpKind.IDENTITY,
        OpKind.LAYOUT,
    }
)


@dataclasses.dataclass(frozen=True)
class ParamSlots:
    """Where an op keeps its parameters among its inputs, so a pass can scale the
    op's output by changing parameters without knowing the op or its frontend.

    For weighted ops the output channel c is produced by weight slice
    `weight[..., c, ...]` along `weight_out_axis` plus `bias[c]`; for norms the
    output is normalized * gain + shift, per channel. Derived from the op table's
    input roles (`rescompile.ir.ops.param_slots`).
    """

    weight: int | None = None
    weight_out_axis: int | None = None
    bias: int | None = None
    gain: int | None = None
    shift: int | None = None
