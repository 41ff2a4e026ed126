"""Gemm and MatMul: contraction couples the two operands' K axes; the other axes pass to the output.

Removing index k from both operands of a contraction is exact (its products vanish), so a MatMul between two
activations (attention) is handled by the same rule as one with a constant weight.
"""

from __future__ import annotations

import onnx

from onnxprune.channels.registry import Block, Dim, Link, register
from onnxprune.graph.index import attr


@register("Gemm")
def gemm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    a, b, y = node.input[0], node.input[1], node.output[0]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    a_k, a_m = (0, 1) if ta else (1, 0)
    b_k, b_n = (1, 0) if tb else (0, 1)
    classes = [[Dim(a, a_k), Dim(b, b_k)], [Dim(a, a_m), Dim(y, 0)], [Dim(b, b_n), Dim(y, 1)]]
    if c is not None:
        c_shape = ctx.index.shape(c)
        if c_shape is None:
            return Block("Gemm bias shape unknown")
        y_shape = ctx.index.shape(y) or [None, None]
        for y_axis, c_axis in ((1, len(c_shape) - 1), (0, len(c_shape) - 2)):
            if c_axis >= 0 and c_shape[c_axis] not in (1, None) and c_shape[c_axis] == y_shape[y_axis]:
                classes[2 - (1 - y_axis)].append(Dim(c, c_axis))
            elif c_axis >= 0 and c_shape[c_axis] is None:
                return Block("Gemm bias shape unknown")
    return _links_for(dim, classes, "Gemm")


def _links_for(dim: Dim, classes: list[list[Dim]], op: str) -> list[Link] | Block:
    for members in classes:
        if dim in members:
            return [Link(members[0], other) for other in members[1:]]
    return Block(f"{op}: axis {dim.axis} of {dim.tensor} is not a channel axis")


@register("MatMul")
def matmul(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    a, b, y = node.input[0], node.input[1], node.output[0]
    ra, rb, ry = ctx.index.rank(a), ctx.index.rank(b), ctx.index.rank(y)
    if None in (ra, rb, ry):
        return Block("MatMul operand ranks unknown")
    if ra < 2 or rb < 2:
        return Block("MatMul with a 1-D operand is not supported")
    classes = [[Dim(a, ra - 1), Dim(b, rb - 2)], [Dim(a, ra - 2), Dim(y, ry - 2)], [Dim(b, rb - 1), Dim(y, ry - 1)]]
    for offset in range(3, ry + 1):  # batch axes, right-aligned, coupled where sizes are equal (not broadcast)
        members = [Dim(y, ry - offset)]
        for t, r in ((a, ra), (b, rb)):
            if r - offset >= 0 and ctx.index.size(t, r - offset) == ctx.index.size(y, ry - offset) != 1:
                members.append(Dim(t, r - offset))
        classes.append(members)
    return _links_for(dim, classes, "MatMul")
