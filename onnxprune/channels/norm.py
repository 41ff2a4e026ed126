"""Normalisations: per-channel ones (BatchNormalization, InstanceNormalization) slice their parameters; ones that
compute statistics across channels (LayerNormalization over the channel axis, GroupNormalization with several
channels per group, LpNormalization along it) would change the kept channels' values, so they block."""

from __future__ import annotations

import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, register_fix, slot_of
from onnxprune.graph.index import attr


def _per_channel(node: onnx.NodeProto, dim: Dim, params: range, name: str) -> list[Link] | Block:
    x, y = node.input[0], node.output[0]
    role, pos = slot_of(node, dim)
    axis = dim.axis if role == "out" or pos == 0 else None
    if axis == 0:
        return [Link(Dim(x, 0), Dim(y, 0))]
    if axis is not None and axis != 1:
        return Block(f"{name} computes statistics over this axis")
    if role == "out" and pos > 0:
        return Block(f"{name} training-mode outputs are not supported")
    links = [Link(Dim(x, 1), Dim(y, 1))]
    links += [Link(Dim(x, 1), Dim(node.input[i], 0)) for i in params if i < len(node.input) and node.input[i]]
    return links


@register("BatchNormalization")
def batch_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    return _per_channel(node, dim, range(1, 5), "BatchNormalization")


@register("InstanceNormalization")
def instance_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    return _per_channel(node, dim, range(1, 3), "InstanceNormalization")


@register("GroupNormalization")
def group_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    channels = ctx.index.size(node.input[0], 1)
    if channels is None or int(attr(node, "num_groups", 0)) != channels:
        return Block("GroupNormalization normalises over several channels per group")
    return _per_channel(node, dim, range(1, 3), "GroupNormalization")


@register_fix("GroupNormalization")
def group_norm_fix(node: onnx.NodeProto, index, kept, editor) -> None:
    new = kept(Dim(node.input[0], 1))
    if new is not None:
        for a in node.attribute:
            if a.name == "num_groups":
                a.i = len(new)


@register("LayerNormalization")
def layer_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    x, y = node.input[0], node.output[0]
    rank = ctx.index.rank(x)
    role, pos = slot_of(node, dim)
    if rank is None or (role == "in" and pos > 0) or (role == "out" and pos > 0):
        return Block("LayerNormalization parameters or statistics outputs cannot be pruned")
    axis = int(attr(node, "axis", -1))
    axis = axis + rank if axis < 0 else axis
    if dim.axis >= axis:
        return Block("LayerNormalization normalises over the channel axis")
    return [Link(Dim(x, dim.axis), Dim(y, dim.axis))]


@register("LpNormalization", "Softmax", "LogSoftmax", "Hardmax")
def along_axis(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    rank = ctx.index.rank(node.input[0])
    if rank is None:
        return Block(f"{node.op_type}: rank unknown")
    default = -1 if node.op_type == "LpNormalization" or ctx.index.opset >= 13 else 1
    axis = int(attr(node, "axis", default))
    axis = axis + rank if axis < 0 else axis
    coerced_2d = node.op_type != "LpNormalization" and ctx.index.opset < 13
    if dim.axis == axis or (coerced_2d and dim.axis >= axis):
        return Block(f"{node.op_type} mixes values along the channel axis")
    return [Link(Dim(node.input[0], dim.axis), Dim(node.output[0], dim.axis))]
