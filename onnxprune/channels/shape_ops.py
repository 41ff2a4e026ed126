"""Ops that move channels between positions: Concat and Split (offsets), Slice, Squeeze/Unsqueeze/Transpose (axis
renumbering), Gather on another axis, and Shape when only other axes are read (Flatten, Reshape and Expand are in
reshape.py). Each maps indices exactly or blocks; nothing is guessed."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, register_fix, slot_of
from onnxprune.graph.index import GraphIndex, attr

INT_MAX = 2**62


def axis_attr(node: onnx.NodeProto, rank: int, default: int = 0) -> int:
    """The node's ``axis`` attribute, non-negative."""
    axis = int(attr(node, "axis", default))
    return axis + rank if axis < 0 else axis


# -- Concat -----------------------------------------------------------------------------------------------------------

@register("Concat")
def concat(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    y = node.output[0]
    rank = index.rank(y)
    if rank is None:
        return Block("Concat rank unknown")
    axis = axis_attr(node, rank)
    inputs = [n for n in node.input if n]
    if dim.axis != axis:
        return [Link(Dim(y, dim.axis), Dim(name, dim.axis)) for name in inputs]
    sizes = [index.size(name, axis) for name in inputs]
    if None in sizes:
        return Block("Concat input sizes unknown")
    links, offset = [], 0
    for name, n in zip(inputs, sizes):
        if n:
            links.append(Link(Dim(name, axis), Dim(y, axis), np.arange(n), np.arange(offset, offset + n)))
        offset += n
    return links


# -- Split ------------------------------------------------------------------------------------------------------------

def _split_sizes(node: onnx.NodeProto, index: GraphIndex, axis: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = index.const_value(node.input[1])
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    if attr(node, "split") is not None:
        return [int(v) for v in attr(node, "split")]
    total = index.size(node.input[0], axis)
    count = int(attr(node, "num_outputs", len(node.output)))
    if total is None:
        return None
    chunk = math.ceil(total / count)
    return [min(chunk, total - k * chunk) for k in range(count)]


@register("Split")
def split(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    x = node.input[0]
    rank = index.rank(x)
    role, pos = slot_of(node, dim)
    if rank is None or (role == "in" and pos != 0):
        return Block("Split rank unknown or split sizes are data")
    axis = axis_attr(node, rank)
    outputs = list(node.output)
    if dim.axis != axis:
        return [Link(Dim(x, dim.axis), Dim(out, dim.axis)) for out in outputs if out]
    sizes = _split_sizes(node, index, axis)
    if sizes is None:
        return Block("Split sizes are computed at run time")
    links, offset = [], 0
    for out, n in zip(outputs, sizes):
        if out and n:
            links.append(Link(Dim(x, axis), Dim(out, axis), np.arange(offset, offset + n), np.arange(n)))
        offset += n
    return links


@register_fix("Split")
def split_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    rank = index.rank(node.input[0])
    axis = axis_attr(node, rank)
    old = _split_sizes(node, index, axis)
    new = [len(kept(Dim(out, axis))) if kept(Dim(out, axis)) is not None else n for out, n in zip(node.output, old)]
    if new == old:
        return
    if index.opset >= 13:
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)
        editor.set_input_value(node, 1, np.array(new, dtype=np.int64))
    else:
        for a in list(node.attribute):
            if a.name == "split":
                node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute("split", new))


# -- Slice ------------------------------------------------------------------------------------------------------------

def _slice_params(node: onnx.NodeProto, index: GraphIndex) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} normalised against the input shape, or None when not constant."""
    shape = index.shape(node.input[0])
    values = []
    for pos in range(1, 5):
        if len(node.input) > pos and node.input[pos]:
            value = index.const_value(node.input[pos])
            if value is None:
                return None
            values.append([int(v) for v in np.asarray(value).reshape(-1)])
        else:
            values.append(None)
    starts, ends, axes, steps = values
    if shape is None or starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    params = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + len(shape) if a < 0 else a
        n = shape[a]
        if n is None:
            return None
        params[a] = tuple(int(v) for v in slice(s, e, st).indices(n))
    return params


@register("Slice")
def slice_(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    role, pos = slot_of(node, dim)
    if role == "in" and pos != 0:
        return Block("Slice parameters are data")
    params = _slice_params(node, ctx.index)
    if params is None:
        return Block("Slice bounds are computed at run time")
    x, y = node.input[0], node.output[0]
    if dim.axis not in params:
        return [Link(Dim(x, dim.axis), Dim(y, dim.axis))]
    start, end, step = params[dim.axis]
    if step != 1:
        return Block("Slice with a step on the channel axis")
    n = max(0, end - start)
    return [Link(Dim(x, dim.axis), Dim(y, dim.axis), np.arange(start, start + n), np.arange(n))] if n else []


@register_fix("Slice")
def slice_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    params = _slice_params(node, index)
    starts = [int(v) for v in np.asarray(index.const_value(node.input[1])).reshape(-1)]
    ends = [int(v) for v in np.asarray(index.const_value(node.input[2])).reshape(-1)]
    axes = (list(range(len(starts))) if len(node.input) < 4 or not node.input[3]
            else [int(v) for v in np.asarray(index.const_value(node.input[3])).reshape(-1)])
    rank = index.rank(node.input[0])
    changed = False
    for i, a in enumerate(axes):
        a = a + rank if a < 0 else a
        kin = kept(Dim(node.input[0], a))
        if kin is None:
            continue
        start, end, _ = params[a]
        new_start = int(np.sum(kin < start))
        starts[i], ends[i] = new_start, new_start + int(np.sum((kin >= start) & (kin < end)))
        changed = True
    if changed:
        editor.set_input_value(node, 1, np.array(starts, dtype=np.int64))
        editor.set_input_value(node, 2, np.array(ends, dtype=np.int64))


# -- axis renumbering -------------------------------------------------------------------------------------------------

def _axes_arg(node: onnx.NodeProto, index: GraphIndex) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = index.const_value(node.input[1])
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    axes = attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


@register("Squeeze", "Unsqueeze")
def squeeze(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    x, y = node.input[0], node.output[0]
    rx, ry = index.rank(x), index.rank(y)
    role, pos = slot_of(node, dim)
    if rx is None or ry is None or pos != 0:
        return Block(f"{node.op_type} rank unknown")
    if node.op_type == "Unsqueeze":
        axes = _axes_arg(node, index)
        if axes is None:
            return Block("Unsqueeze axes computed at run time")
        inserted = {a + ry if a < 0 else a for a in axes}
        kept_axes = [a for a in range(ry) if a not in inserted]  # kept_axes[i] = output axis of input axis i
    else:
        axes = _axes_arg(node, index)
        shape = index.shape(x)
        if axes is None:
            if shape is None or None in shape:
                return Block("Squeeze axes unknown")
            axes = [a for a, s in enumerate(shape) if s == 1]
        removed = {a + rx if a < 0 else a for a in axes}
        if role == "in" and dim.axis in removed:
            return Block("Squeeze removes the channel axis")
        kept_axes = [a - sum(1 for r in removed if r < a) if a not in removed else None for a in range(rx)]
    if role == "in":
        return [Link(dim, Dim(y, kept_axes[dim.axis]))]
    if dim.axis not in kept_axes:
        return Block("Unsqueeze inserted this axis")
    return [Link(Dim(x, kept_axes.index(dim.axis)), dim)]


@register("Transpose")
def transpose(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    x, y = node.input[0], node.output[0]
    rank = ctx.index.rank(x)
    if rank is None:
        return Block("Transpose rank unknown")
    perm = [int(p) for p in (attr(node, "perm") or list(range(rank))[::-1])]
    if dim.tensor == x:
        return [Link(dim, Dim(y, perm.index(dim.axis)))]
    return [Link(Dim(x, perm[dim.axis]), dim)]


@register("Gather")
def gather(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    data, indices, y = node.input[0], node.input[1], node.output[0]
    rd, ri = index.rank(data), index.rank(indices)
    if rd is None or ri is None:
        return Block("Gather ranks unknown")
    axis = axis_attr(node, rd)
    if dim.tensor == indices:
        return Block("Gather indices cannot carry channels")
    if dim.tensor == data:
        if dim.axis == axis:
            return Block("Gather selects along the channel axis")
        return [Link(dim, Dim(y, dim.axis if dim.axis < axis else dim.axis + ri - 1))]
    if axis <= dim.axis < axis + ri:
        return Block("Gather output axis comes from the indices")
    return [Link(Dim(data, dim.axis if dim.axis < axis else dim.axis - ri + 1), dim)]


@register("Shape")
def shape(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """Reading a shape is harmless when no consumer looks at the channel axis' size."""
    index = ctx.index
    rank = index.rank(node.input[0])
    if rank is None:
        return Block("Shape of a tensor of unknown rank")
    start = int(attr(node, "start", 0))
    end = int(attr(node, "end", rank))
    start, end, _ = slice(start, end).indices(rank)
    if not start <= dim.axis < end:
        return []
    position = dim.axis - start
    length = end - start
    for use in index.consumers_of(node.output[0]):
        user = use.node
        if user.op_type == "Gather" and use.index == 0 and int(attr(user, "axis", 0)) == 0:
            picked = index.const_value(user.input[1])
            if picked is not None and position not in {int(p) % length for p in np.asarray(picked).reshape(-1)}:
                continue
        if user.op_type == "Slice" and use.index == 0:
            params = _slice_params(user, index)
            if params is not None and 0 in params and position not in range(*params[0]):
                continue
        return Block("the channel count is read at run time (Shape)")
    return []
