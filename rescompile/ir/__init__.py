"""The rescompile IR: Value, Node, Graph, their invariants and the op table."""

from rescompile.ir._core import ACTIVATION, CONST, INPUT, PARAM, Graph, IRError, Node, Usage, Value
from rescompile.ir._graphview import data_inputs, to_networkx
from rescompile.ir._kinds import MIXING_FREE_KINDS, OpKind, ParamSlots
from rescompile.ir._verify import verify
from rescompile.ir.ops import (
    OpInfo,
    Role,
    axis_map,
    input_roles,
    is_pure,
    kind_of_onnx_op,
    onnx_param_slots,
    op_info,
)

__all__ = [
    "ACTIVATION",
    "CONST",
    "INPUT",
    "MIXING_FREE_KINDS",
    "PARAM",
    "Graph",
    "IRError",
    "Node",
    "OpInfo",
    "OpKind",
    "ParamSlots",
    "Role",
    "Usage",
    "Value",
    "axis_map",
    "data_inputs",
    "input_roles",
    "is_pure",
    "kind_of_onnx_op",
    "onnx_param_slots",
    "op_info",
    "to_networkx",
    "verify",
]
