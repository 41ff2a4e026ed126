"""Elementwise ops: every axis passes straight through; binary ops couple operands by numpy broadcasting.

A per-channel constant operand (bias, scale, PRelu slope) becomes a member and is sliced; a broadcast operand (size
1 on the axis, or a scalar) is left alone. Two activations of the same group (residual Add, SE gate Mul) are coupled.
"""

from __future__ import annotations

import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, slot_of

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Ceil",
    "Floor", "Round", "Sign", "Sin", "Cos", "Not", "Cast", "CastLike", "Identity", "Clip", "Dropout", "IsNaN",
    "IsInf", "Shrink", "Swish",
)
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Less",
          "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift")


@register(*UNARY)
def unary(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    role, pos = slot_of(node, dim)
    if role == "in" and pos != 0:
        return Block(f"{node.op_type} input {pos} is a parameter, not data")
    links = [Link(Dim(node.input[0], dim.axis), Dim(out, dim.axis)) for out in node.output if out]
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        pass  # the mask output has the data's shape: coupled like the data
    return links


@register(*BINARY)
def broadcast(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    y = node.output[0]
    ry = index.rank(y)
    if ry is None:
        return Block(f"{node.op_type} output rank unknown")
    role, pos = slot_of(node, dim)
    if role == "in":
        r = index.rank(dim.tensor)
        if r is None:
            return Block(f"{node.op_type} operand rank unknown")
        y_axis = dim.axis + ry - r
    else:
        y_axis = dim.axis
    size = index.size(y, y_axis)
    if size is None:
        return Block(f"{node.op_type}: size of axis {y_axis} unknown")
    links = []
    for name in node.input:
        if not name:
            continue
        r = index.rank(name)
        if r is None:
            return Block(f"{node.op_type} operand rank unknown")
        axis = y_axis - (ry - r)
        if axis < 0:
            continue
        s = index.size(name, axis)
        if s == size and s != 1:
            links.append(Link(Dim(y, y_axis), Dim(name, axis)))
        elif s not in (1,):
            return Block(f"{node.op_type}: operand {name} has unknown or mismatched size on the channel axis")
    return links
