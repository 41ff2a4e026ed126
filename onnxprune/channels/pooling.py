"""Pooling, resampling, padding and reductions: they work per channel, so batch and channel axes pass through and
anything that would mix along the tracked axis (pads or scales on it, reducing over it) blocks."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, register_fix, slot_of
from onnxprune.graph.index import attr


def _data_passthrough(node: onnx.NodeProto, dim: Dim, allowed: set[int] | None = None) -> list[Link] | Block:
    role, pos = slot_of(node, dim)
    if pos != 0:
        return Block(f"{node.op_type}: {role}put {pos} cannot carry channels")
    if allowed is not None and dim.axis not in allowed:
        return Block(f"{node.op_type} mixes values along axis {dim.axis}")
    return [Link(Dim(node.input[0], dim.axis), Dim(node.output[0], dim.axis))]


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return Block("MaxPool Indices output encodes channel positions")
    return _data_passthrough(node, dim, {0, 1})


@register("Pad")
def pad(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    pads = attr(node, "pads") if index.opset < 11 else index.const_value(node.input[1]) if len(node.input) > 1 else None
    if pads is None:
        return Block("Pad amounts are computed at run time")
    pads = np.asarray(pads).reshape(-1)
    rank = index.rank(node.input[0])
    axes = list(range(rank)) if rank is not None else []
    if len(node.input) > 3 and node.input[3]:
        raw_axes = index.const_value(node.input[3])
        if raw_axes is None or rank is None:
            return Block("Pad axes are computed at run time")
        axes = [int(a) + rank if a < 0 else int(a) for a in raw_axes]
    half = len(pads) // 2
    for i, axis in enumerate(axes[:half]):
        if axis == dim.axis and (pads[i] != 0 or pads[i + half] != 0):
            return Block("Pad pads the channel axis")
    return _data_passthrough(node, dim)


def _resize_factor(node: onnx.NodeProto, index, axis: int) -> tuple[str, float | None]:
    """('scales'|'sizes', value on ``axis``) of a Resize/Upsample, or ('unknown', None)."""
    names = node.input
    if node.op_type == "Upsample":
        scales = attr(node, "scales") if len(names) < 2 else index.const_value(names[1])
        return ("scales", None if scales is None else float(np.asarray(scales)[axis]))
    scales_pos, sizes_pos = (1, 2) if index.opset < 11 else (2, 3)
    if len(names) > sizes_pos and names[sizes_pos]:
        sizes = index.const_value(names[sizes_pos])
        return ("sizes", None if sizes is None or attr(node, "axes") is not None else float(sizes[axis]))
    if len(names) > scales_pos and names[scales_pos]:
        scales = index.const_value(names[scales_pos])
        if scales is None or attr(node, "axes") is not None:
            return ("unknown", None)
        return ("scales", float(np.asarray(scales).reshape(-1)[axis]) if np.asarray(scales).size else None)
    return ("unknown", None)


@register("Resize", "Upsample")
def resize(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    kind, value = _resize_factor(node, ctx.index, dim.axis)
    size = ctx.index.size(node.input[0], dim.axis)
    if value is None or (kind == "scales" and value != 1.0) or (kind == "sizes" and value != size):
        return Block(f"{node.op_type} rescales the channel axis or its scales are not constant")
    return _data_passthrough(node, dim)


@register_fix("Resize", "Upsample")
def resize_fix(node: onnx.NodeProto, index, kept, editor) -> None:
    pos = 2 if index.opset < 11 else 3
    if node.op_type != "Resize" or len(node.input) <= pos or not node.input[pos]:
        return
    sizes = np.array(index.const_value(node.input[pos]), dtype=np.int64)
    changed = False
    for axis in range(len(sizes)):
        new = kept(Dim(node.input[0], axis))
        if new is not None and sizes[axis] != len(new):
            sizes[axis] = len(new)
            changed = True
    if changed:
        editor.set_input_value(node, pos, sizes)


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")


@register(*REDUCE)
def reduce(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    rank = index.rank(node.input[0])
    if rank is None:
        return Block(f"{node.op_type}: rank unknown")
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(attr(node, "axis", 0))]
    elif len(node.input) > 1 and node.input[1]:
        value = index.const_value(node.input[1])
        if value is None:
            return Block(f"{node.op_type} axes are computed at run time")
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = list(attr(node, "axes", []) or [])
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return _data_passthrough(node, dim)
        axes = list(range(rank))
    axes = sorted(a + rank if a < 0 else a for a in axes)
    keep = int(attr(node, "keepdims", 1))
    role, pos = slot_of(node, dim)
    if pos != 0:
        return Block(f"{node.op_type}: axes input cannot carry channels")
    mapping = {a: (a if keep else a - sum(1 for r in axes if r < a)) for a in range(rank) if a not in axes}
    if role == "in":
        if dim.axis in axes:
            return Block(f"{node.op_type} reduces over the channel axis")
        return [Link(dim, Dim(node.output[0], mapping[dim.axis]))]
    back = {v: k for k, v in mapping.items()}
    if dim.axis not in back:
        return Block(f"{node.op_type} output axis {dim.axis} is reduced")
    return [Link(Dim(node.input[0], back[dim.axis]), dim)]
