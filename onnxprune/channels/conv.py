"""Conv and ConvTranspose: the producers and consumers of channels.

Conv weight is ``[O, C/group, k...]``. Plain convs couple input channels with weight columns and output channels
with weight rows and bias. Depthwise convs (one input channel per group) pass channels through: input ``c`` owns
outputs ``c*m .. c*m+m-1`` and the ``group`` attribute shrinks with it. Other grouped convs must keep equal counts per
group, so channel ``j`` of every group is removed together (a strided coupling) and ``group`` stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels.qdq import dequantized_constant
from onnxprune.channels.registry import Block, Dim, Link, register, register_fix
from onnxprune.graph.index import GraphIndex, attr


def _weight_shape(node: onnx.NodeProto, index: GraphIndex) -> list[int] | None:
    if len(node.input) < 2 or not (index.is_constant(node.input[1]) or dequantized_constant(index, node.input[1])):
        return None
    return index.shape(node.input[1])


@register("Conv")
def conv(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    w_shape = _weight_shape(node, index)
    if w_shape is None:
        return Block("Conv weight is computed at run time")
    x, w, y = node.input[0], node.input[1], node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if dim.axis != 1 and dim.tensor != w and dim.tensor != bias:
        if dim.axis == 0 and dim.tensor in (x, y):
            return [Link(Dim(x, 0), Dim(y, 0))]
        return Block("Conv mixes spatial positions; only channel axes can be pruned through it")
    group = int(attr(node, "group", 1))
    out_ch, in_per_group = int(w_shape[0]), int(w_shape[1])
    in_ch = in_per_group * group
    out_per_group = out_ch // group
    out_links = [Link(Dim(y, 1), Dim(w, 0))] + ([Link(Dim(w, 0), Dim(bias, 0))] if bias else [])
    if group > 1 and in_per_group > 1:  # grouped: remove channel j of every group at once
        out_links.append(Link(Dim(y, 1), Dim(y, 1), None, np.arange(out_ch) % out_per_group))
    role = "out" if dim.tensor in (y, bias) or dim == Dim(w, 0) else "in"
    if role == "out" and not (group > 1 and in_per_group == 1):
        return out_links
    if group == 1:
        return [Link(Dim(x, 1), Dim(w, 1))]
    if in_per_group == 1:  # depthwise (with channel multiplier): input c <-> outputs c*m..c*m+m-1
        link = Link(Dim(x, 1), Dim(y, 1), np.repeat(np.arange(in_ch), out_per_group), np.arange(out_ch))
        return [link] + out_links
    return [Link(Dim(x, 1), Dim(w, 1), None, np.arange(in_ch) % in_per_group)]


@register_fix("Conv")
def conv_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    w_shape = index.shape(node.input[1])
    group = int(attr(node, "group", 1))
    if group > 1 and w_shape is not None and int(w_shape[1]) == 1:
        new_in = kept(Dim(node.input[0], 1))
        if new_in is not None:
            _set_int_attr(node, "group", len(new_in))


def _set_int_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


@register("ConvTranspose")
def conv_transpose(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    w_shape = _weight_shape(node, index)
    if w_shape is None:
        return Block("ConvTranspose weight is computed at run time")
    if int(attr(node, "group", 1)) != 1:
        return Block("grouped ConvTranspose is not supported")
    if attr(node, "output_shape") is not None:
        return Block("ConvTranspose with output_shape attribute is not supported")
    x, w, y = node.input[0], node.input[1], node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if dim.tensor in (x, y) and dim.axis == 0:
        return [Link(Dim(x, 0), Dim(y, 0))]
    if dim.tensor in (x, y) and dim.axis != 1:
        return Block("ConvTranspose mixes spatial positions")
    if dim == Dim(x, 1) or dim == Dim(w, 0):
        return [Link(Dim(x, 1), Dim(w, 0))]
    return [Link(Dim(y, 1), Dim(w, 1))] + ([Link(Dim(w, 1), Dim(bias, 0))] if bias else [])
