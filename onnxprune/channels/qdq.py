"""QuantizeLinear and DequantizeLinear: an already-quantized (QDQ) model is pruned through its quantization pairs.

``y = saturate(round(x / scale) + zero_point)`` and ``x' = (y - zero_point) * scale`` work element by element, so
every axis of ``x`` is the same axis of ``y``. Per-tensor parameters (one scale) are kept as they are: removing a
channel changes no other channel's value. Per-channel parameters (a 1-D scale along ``axis``) belong to their
channel: scale and zero point are sliced with it, so a kept channel keeps exactly its own grid. Blocked quantization
(``block_size``, opset 21) groups several channels under one scale along the axis and blocks.

A DequantizeLinear of an int8 weight initializer is how a QDQ model spells a layer's weight: the links below carry
the layer's channel dims to the integer initializer, which is sliced like a float weight would be. Removing a
channel is exact in the float domain: a removed channel's dequantized weights are what masking sets to zero.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels.registry import Block, Dim, Link, normalise_axis, register, register_fix, slot_of
from onnxprune.graph.index import attr


@register("QuantizeLinear", "DequantizeLinear")
def quantize_linear(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    x, scale, y = node.input[0], node.input[1], node.output[0]
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if int(attr(node, "block_size", 0) or 0):
        return Block(f"{node.op_type} with block_size shares one scale among several channels")
    scale_shape, rank = index.shape(scale), index.rank(x)
    if scale_shape is None or rank is None:
        return Block(f"{node.op_type}: the shape of its scale or input is unknown")
    per_tensor = len(scale_shape) == 0 or (len(scale_shape) == 1 and scale_shape[0] == 1)
    axis = normalise_axis(int(attr(node, "axis", 1)), rank)
    role, pos = slot_of(node, dim)
    if role == "in" and pos > 0:  # the scale's or zero point's own axis: the channels of ``axis``
        if per_tensor or dim.axis != 0:
            return Block(f"{node.op_type}: its per-tensor scale cannot be sliced")
        dim = Dim(x, axis)
    links = [Link(Dim(x, dim.axis), Dim(y, dim.axis))]
    if not per_tensor and dim.axis == axis:
        links += [Link(Dim(x, axis), Dim(p, 0)) for p in (scale, zero) if p]
    return links


def dequantized_constant(index, name: str) -> str | None:
    """The constant a DequantizeLinear turns into ``name`` (a QDQ model's layer weight), or None: rules that need a
    constant weight (Conv's shape, for instance) accept it, since its channels are sliced like a float weight's."""
    use = index.producer.get(name)
    if use is None or use.node.op_type != "DequantizeLinear" or use.node.domain not in ("", "ai.onnx"):
        return None
    source = use.node.input[0]
    return source if index.is_constant(source) and all(index.is_constant(p) for p in use.node.input[1:] if p) else None


def dequantizing_use(index, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear that reads constant ``name`` as its data with constant parameters, or None."""
    for use in index.consumers_of(name):
        node = use.node
        if (use.index == 0 and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")
                and all(index.is_constant(p) for p in node.input[1:] if p)):
            return node
    return None


def dequantize(values: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """``(q - zero) * scale`` in float64, with per-tensor or per-channel (along ``axis``) parameters."""
    result = np.asarray(values).astype(np.float64)
    shape = [1] * result.ndim
    if result.ndim:
        shape[axis % result.ndim] = -1

    def along(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p).astype(np.float64)
        return p.reshape(shape) if p.size > 1 else p.reshape(())
    if zero is not None:
        result = result - along(zero)
    if scale is not None:
        result = result * along(scale)
    return result


def dequantized_value(index, node: onnx.NodeProto) -> np.ndarray:
    """The float weight a DequantizeLinear with constant inputs computes (per tensor or per channel)."""
    zero = index.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return dequantize(index.const_value(node.input[0]), index.const_value(node.input[1]), zero,
                      int(attr(node, "axis", 1)))


@register("MatMulNBits", domain="com.microsoft")
def matmul_nbits(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """onnxruntime's block-quantized MatMul (``com.microsoft``): ``B`` is ``[N, k_blocks, blob]``, ``scales`` and
    ``zero_points`` are ``[N, ...]`` (or the older flat ``[N * ...]``), ``bias`` is ``[N]``. An output feature owns
    row ``n`` of each, so output features are removed by slicing rows and setting ``N``. Input features are packed
    several to a byte and ``block_size`` to a scale: removing one would re-quantize its block, so they block. onnx's
    shape inference does not know this op: its output shape must be in the model (value_info), as exporters write it.
    It is not a layer kind (graph/layers.py), so it seeds no group: its rows are removed when another layer's group
    reaches its output (a residual add, a shared consumer)."""
    index = ctx.index
    a, y = node.input[0], node.output[0]
    rank = index.rank(y)
    if rank is None:
        return Block("MatMulNBits: output rank unknown")
    role, pos = slot_of(node, dim)
    features = rank - 1
    if dim.axis != features and (role == "out" or pos == 0):  # batch and sequence axes pass through
        return [Link(Dim(a, dim.axis), Dim(y, dim.axis))]
    if role == "in" and pos == 0:
        return Block(f"MatMulNBits packs its input features {int(attr(node, 'block_size', 0))} to a quantization "
                     "block; removing one would re-quantize its block")
    if len(node.input) > 4 and node.input[4]:
        return Block("MatMulNBits with g_idx (act-order) reorders its input rows")
    n = int(attr(node, "N", 0))
    links = []
    for slot, param in enumerate(node.input[1:], start=1):
        if not param:
            continue
        shape = index.shape(param)
        if not n or not shape or shape[0] % n or (len(shape) > 1 and shape[0] != n):
            return Block(f"MatMulNBits: input {slot} ({param}) has a layout this does not read")
        per_row = shape[0] // n
        if per_row == 1:
            links.append(Link(Dim(y, features), Dim(param, 0)))
        else:  # the older flat layout: row n owns entries n*per_row .. n*per_row+per_row-1
            links.append(Link(Dim(y, features), Dim(param, 0), np.repeat(np.arange(n), per_row),
                              np.arange(n * per_row)))
    return links


@register_fix("MatMulNBits", domain="com.microsoft")
def matmul_nbits_fix(node: onnx.NodeProto, index, kept, editor) -> None:
    rank = index.rank(node.output[0])
    new = kept(Dim(node.output[0], rank - 1)) if rank else None
    if new is not None:
        for a in node.attribute:
            if a.name == "N":
                a.i = len(new)
