"""The rescompile IR: Value, Node, Graph and their invariants."""

from rescompile.ir._core import ACTIVATION, CONST, INPUT, PARAM, Graph, IRError, Node, Usage, Value
from rescompile.ir._graphview import data_inputs, to_networkx
from rescompile.ir._kinds import MIXING_FREE_KINDS, OpKind, ParamSlots, kind_of_onnx_op, onnx_param_slots
from rescompile.ir._verify import verify

__all__ = [
    "ACTIVATION", "CONST", "INPUT", "PARAM", "Graph", "IRError", "Node", "Usage", "Value",
    "OpKind", "MIXING_FREE_KINDS", "kind_of_onnx_op", "ParamSlots", "onnx_param_slots", "verify", "to_networkx", "data_inputs",
]
