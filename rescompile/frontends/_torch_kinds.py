"""Normalized kinds for torch ops: aten overloads, torch functions, tensor
methods and leaf modules, looked up by their base name."""

from __future__ import annotations

from typing import Any

from rescompile.ir import OpKind, ParamSlots

__all__ = ["kind_of_torch_target", "torch_param_slots", "base_name"]

_NAMES: dict[OpKind, tuple[str, ...]] = {
    OpKind.ADD: ("add", "add_", "iadd", "__add__", "__iadd__", "__radd__"),
    OpKind.SUB: ("sub", "sub_", "rsub", "__sub__", "__rsub__"),
    OpKind.MUL: ("mul", "mul_", "__mul__", "__rmul__"),
    OpKind.DIV: ("div", "div_", "truediv", "__truediv__"),
    OpKind.WEIGHTED: ("linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "conv1d", "conv2d", "conv3d",
                      "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "einsum", "matmul_", "__matmul__",
                      "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                      "Bilinear"),
    OpKind.NORM: ("layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm",
                  "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                  "_native_batch_norm_legit_functional", "group_norm", "native_group_norm",
                  "rms_norm", "_fused_rms_norm", "instance_norm", "normalize",
                  "LayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "RMSNorm",
                  "InstanceNorm1d", "InstanceNorm2d"),
    OpKind.ACTIVATION: ("relu", "relu_", "gelu", "silu", "silu_", "tanh", "sigmoid", "softplus", "elu",
                        "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "mish", "pow", "rsqrt",
                        "sqrt", "exp", "log", "neg", "abs", "sin", "cos", "erf", "clamp", "clamp_min",
                        "reciprocal", "square", "__pow__",
                        "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Softplus", "ELU", "LeakyReLU",
                        "Hardswish", "Mish", "NewGELUActivation", "GELUActivation", "SiLUActivation"),
    OpKind.LAYOUT: ("view", "reshape", "_unsafe_view", "transpose", "t", "permute", "unsqueeze", "squeeze",
                    "expand", "expand_as", "flatten", "contiguous", "unflatten", "movedim", "view_as",
                    "repeat", "Flatten", "Unflatten"),
    OpKind.IDENTITY: ("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "clone", "alias",
                      "detach", "lift_fresh_copy", "Dropout", "Identity"),
    OpKind.CAST: ("to", "_to_copy", "type_as", "float", "half", "bfloat16", "type"),
    OpKind.CONCAT: ("cat", "concat", "concatenate", "stack"),
    OpKind.SPLIT: ("split", "split_with_sizes", "chunk", "slice", "select", "index", "getitem", "narrow",
                   "unbind", "embedding", "gather", "index_select", "tensor_split", "Embedding"),
    OpKind.SHAPE: ("sym_size", "size", "dim", "sym_numel", "numel"),
    OpKind.SOFTMAX: ("softmax", "_softmax", "log_softmax", "_log_softmax", "Softmax"),
    OpKind.REDUCE: ("mean", "sum", "amax", "amin", "max_pool2d", "max_pool2d_with_indices", "avg_pool2d",
                    "adaptive_avg_pool2d", "adaptive_avg_pool1d", "_adaptive_avg_pool2d", "var", "var_mean",
                    "std", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"),
    OpKind.CONSTANT: ("zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like", "scalar_tensor",
                      "new_ones", "new_zeros", "empty"),
}
_TABLE = {name: kind for kind, names in _NAMES.items() for name in names}


def base_name(target: Any) -> str:
    """'linear' for aten.linear.default, torch.nn.functional.linear and 'linear' methods."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return target.__name__
    return getattr(target, "__name__", type(target).__name__)


def kind_of_torch_target(target: Any) -> OpKind:
    return _TABLE.get(base_name(target), OpKind.OTHER)


# Argument positions in the op's signature (aten and torch.nn.functional agree).
_SLOTS = {
    "linear": ParamSlots(weight=1, weight_out_axis=0, bias=2),
    "addmm": ParamSlots(weight=2, weight_out_axis=1, bias=0),
    "mm": ParamSlots(weight=1, weight_out_axis=1),
    "matmul": ParamSlots(weight=1, weight_out_axis=-1),
    "conv1d": ParamSlots(weight=1, weight_out_axis=0, bias=2),
    "conv2d": ParamSlots(weight=1, weight_out_axis=0, bias=2),
    "conv3d": ParamSlots(weight=1, weight_out_axis=0, bias=2),
    "convolution": ParamSlots(weight=1, weight_out_axis=0, bias=2),
    "layer_norm": ParamSlots(gain=2, shift=3),
    "group_norm": ParamSlots(gain=2, shift=3),
    "rms_norm": ParamSlots(gain=2),
    "batch_norm": ParamSlots(gain=1, shift=2),
    "_native_batch_norm_legit_no_training": ParamSlots(gain=1, shift=2),
}


def torch_param_slots(target: Any, args: tuple, is_input) -> ParamSlots | None:
    """ParamSlots (in IR input positions) for an aten op or torch function.

    Args:
        args: the call's positional arguments.
        is_input: tells whether an argument became an IR input (a tensor node).
    """
    slots = _SLOTS.get(base_name(target))
    if slots is None:
        return None
    position, count = {}, 0
    for arg_index, arg in enumerate(args):
        if is_input(arg):
            position[arg_index] = count
            count += 1

    def remap(arg_index):
        return None if arg_index is None else position.get(arg_index)
    return ParamSlots(weight=remap(slots.weight), weight_out_axis=slots.weight_out_axis,
                      bias=remap(slots.bias), gain=remap(slots.gain), shift=remap(slots.shift))
