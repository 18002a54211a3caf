"""Kinds and parameter slots of torch calls, read from the op table (`rescompile.ir.ops`): aten
overloads, torch functions, tensor methods and leaf modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rescompile.ir import OpKind, ParamSlots
from rescompile.ir.ops import param_slots, torch_call, torch_entry

__all__ = ["kind_of_torch_target", "torch_param_slots"]


def kind_of_torch_target(target: Any) -> OpKind:
    """Kind of a call's target, or of a leaf module given as its class."""
    info = torch_entry("call_function", target)
    return OpKind.OTHER if info is None else info.kind


def torch_param_slots(target: Any, args: tuple, is_input: Callable[[Any], bool]) -> ParamSlots | None:
    """ParamSlots (in IR input positions) for an aten op or torch function.

    Args:
        args: the call's positional arguments.
        is_input: tells whether an argument became an IR input (a tensor node).
    """
    call = torch_call("call_function", target, args, {}, is_input)
    return None if call is None else param_slots(call)
