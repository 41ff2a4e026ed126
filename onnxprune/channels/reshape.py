"""Reshape, Flatten and Expand: a channel owns a run of features after a merge, one slice of an axis after a split
(attention heads: [B, S, H*D] -> [B, S, H, D]), or passes through a broadcast; the shape input is updated with the
kept counts, constants and Concat pieces alike. Each maps indices exactly or blocks; nothing is guessed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, register_fix, slot_of
from onnxprune.channels.shape_ops import axis_attr
from onnxprune.graph.index import GraphIndex


# -- Flatten and Reshape ----------------------------------------------------------------------------------------------

def _merge_link(x: str, in_shape: list, in_axes: list[int], a: int, y: str, out_axis: int) -> Link | Block:
    """Input axis ``a`` is one of ``in_axes``, merged (row-major) into output axis ``out_axis``."""
    sizes = [in_shape[i] for i in in_axes]
    if None in sizes:
        return Block("merged axes have unknown sizes")
    stride = int(np.prod([in_shape[i] for i in in_axes if i > a], dtype=np.int64))
    total = int(np.prod(sizes, dtype=np.int64))
    return Link(Dim(x, a), Dim(y, out_axis), (np.arange(total) // stride) % in_shape[a], np.arange(total))


def _merged_blocks(in_shape: list, out_shape: list) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes of equal element count (row-major reshape). When symbolic
    dims merge or split at the front (tokens: [B*S, E] <-> [B, S, H, D]), the known runs are paired from the end
    and the symbolic front becomes one block of unknown size, which no channel may cross."""
    blocks = _pair_runs(in_shape, out_shape)
    if blocks is not None or not in_shape or not out_shape:
        return blocks
    tail = _pair_runs(in_shape[::-1], out_shape[::-1], stop_at_unknown=True)
    if tail is None:
        return None
    ni, no = len(in_shape), len(out_shape)
    blocks = [([ni - 1 - a for a in reversed(ia)], [no - 1 - o for o in reversed(oa)]) for ia, oa in reversed(tail)]
    front_in, front_out = ni - sum(len(ia) for ia, _ in tail), no - sum(len(oa) for _, oa in tail)
    if not front_in or not front_out:
        return None
    return [(list(range(front_in)), list(range(front_out)))] + blocks


def _pair_runs(in_shape: list, out_shape: list,
               stop_at_unknown: bool = False) -> list[tuple[list[int], list[int]]] | None:
    """:func:`_merged_blocks` from the front; with ``stop_at_unknown`` the runs paired before the first symbolic
    dim (None when there are none)."""
    blocks, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and j < len(out_shape) and in_shape[i] is None and out_shape[j] is None:
            if stop_at_unknown:
                return blocks or None
            blocks.append(([i], [j]))  # a symbolic dim (batch) kept in place
            i, j = i + 1, j + 1
            continue
        ia, oa, pi, pj = [], [], 1, 1
        while True:  # a symbolic dim may only pair with a symbolic dim (above), never inside a run
            take_in = i < len(in_shape) and (pi <= pj or j == len(out_shape))
            if not take_in and j == len(out_shape):
                break
            size = in_shape[i] if take_in else out_shape[j]
            if size is None:
                return (blocks or None) if stop_at_unknown and not ia and not oa else None
            if take_in:
                pi, i = pi * size, i + 1
                ia.append(i - 1)
            else:
                pj, j = pj * size, j + 1
                oa.append(j - 1)
            if pi == pj and ia and oa and (i == len(in_shape) or in_shape[i] != 1 or j == len(out_shape)):
                break
        if pi != pj:
            return None
        blocks.append((ia, oa))
    return blocks


def _split_link(x: str, in_shape: list, ia: list[int], a: int, y: str, out_shape: list, oa: list[int],
                role: str, dim: Dim, op: str, head_dims: bool) -> list[Link] | Block:
    """Input axis ``a`` split (row-major) over output axes ``oa`` with several non-1 sizes, e.g. [B,S,H*D] ->
    [B,S,H,D] or fused qkv [B,N,3*H*D] -> [B,N,3,H,D]. Removing a whole slice along any one output axis is exact;
    the link goes to the second-to-last non-1 axis (H), so one unit is one head (for fused qkv: its q, k and v
    together), or with ``head_dims`` to the last one (D: the same dim of every head). Input index i maps to its
    coordinate on that axis."""
    if [i for i in ia if in_shape[i] != 1] != [a]:
        return Block(f"{op} regroups several axes into several axes")
    big_out = [o for o in oa if out_shape[o] != 1]
    if in_shape[a] is None or None in [out_shape[o] for o in big_out]:
        return Block(f"{op} splits or merges symbolic dims (tokens) along this axis")
    unit_axis = big_out[-1] if head_dims else big_out[-2]
    if role == "out" and dim.axis != unit_axis:
        what = "the same dim of every head (--attention-units head-dims)" if head_dims else "whole heads"
        return Block(f"{op} splits the channel axis into several axes; only slices along output axis {unit_axis} "
                     f"({what}) can be removed, not along axis {dim.axis}")
    stride = int(np.prod([out_shape[o] for o in oa if o > unit_axis], dtype=np.int64))
    n = in_shape[a]
    return [Link(Dim(x, a), Dim(y, unit_axis), np.arange(n), (np.arange(n) // stride) % out_shape[unit_axis])]


def _reshape_links(x: str, y: str, dim: Dim, in_shape, out_shape, ctx, op: str) -> list[Link] | Block:
    blocks = _merged_blocks(in_shape, out_shape)
    if blocks is None:
        return Block(f"{op} with unknown shapes")
    role = "in" if dim.tensor == x else "out"
    for ia, oa in blocks:
        if (role == "in" and dim.axis in ia) or (role == "out" and dim.axis in oa):
            big_out = [o for o in oa if out_shape[o] != 1]
            if len(big_out) > 1:
                carriers = [dim.axis] if role == "in" else [a for a in ia if in_shape[a] != 1]
                if len(carriers) != 1:
                    return Block(f"{op} regroups several axes into several axes")
                return _split_link(x, in_shape, ia, carriers[0], y, out_shape, oa, role, dim, op,
                                   ctx.head_dims)
            if not big_out:
                return Block(f"{op}: the channel axis has size 1 after it")
            if role == "in":
                return [_merge_link(x, in_shape, ia, dim.axis, y, big_out[0])]
            copies = _copied_axes(ctx.index, x)
            candidates = [a for a in ia if in_shape[a] != 1 and ctx.tracked(Dim(x, a))]
            if len(candidates) != 1:
                candidates = [a for a in ia if in_shape[a] != 1 and a not in copies]
            if not candidates and copies:
                return Block(f"{op} merges only copies made by Expand (e.g. one kv head shared by every q head): "
                             "removing a q head alone would change the copy count")
            if len(candidates) != 1:
                return Block(f"{op} merges several axes; cannot tell which one carries channels")
            return [_merge_link(x, in_shape, ia, candidates[0], y, dim.axis)]
    return Block(f"{op}: axis not found")


@register("Flatten")
def flatten(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    x, y = node.input[0], node.output[0]
    in_shape = ctx.index.shape(x)
    if in_shape is None:
        return Block("Flatten input shape unknown")
    axis = axis_attr(node, len(in_shape), 1)
    head, tail = in_shape[:axis], in_shape[axis:]
    out_shape = [int(np.prod(head)) if None not in head else None, int(np.prod(tail)) if None not in tail else None]
    if dim.tensor == x and dim.axis < axis or dim.tensor == y and dim.axis == 0:
        block_axes, out_axis = list(range(axis)), 0
    else:
        block_axes, out_axis = list(range(axis, len(in_shape))), 1
    if out_shape[out_axis] is None:
        return Block("Flatten of axes with unknown sizes")
    if dim.tensor == x:
        return [_merge_link(x, in_shape, block_axes, dim.axis, y, out_axis)]
    candidates = [a for a in block_axes if in_shape[a] != 1 and ctx.tracked(Dim(x, a))]
    if len(candidates) != 1:
        candidates = [a for a in block_axes if in_shape[a] != 1]
    if len(candidates) != 1:
        return Block("Flatten merges several axes; cannot tell which one carries channels")
    return [_merge_link(x, in_shape, block_axes, candidates[0], y, out_axis)]


@dataclass(frozen=True)
class _TargetEntry:
    """Where one element of a Reshape target comes from: ``offset`` in constant ``const``, or the one-element
    run-time input ``slot`` of the target's Concat, which reads the size ``read`` (tensor, axis) when traceable."""

    owner: onnx.NodeProto
    const: str | None = None
    offset: int = 0
    slot: int = 0
    read: tuple[str, int] | None = None


def _target_positions(node: onnx.NodeProto, index: GraphIndex) -> list[_TargetEntry | None] | None:
    """Per element of a Reshape target, where it comes from (None: run time, untraceable); None when unknown."""
    target = node.input[1]
    if index.is_constant(target):
        return [_TargetEntry(node, target, i) for i in range(int(np.asarray(index.const_value(target)).size))]
    producer = index.producer.get(target)
    if producer is None or producer.node.op_type != "Concat":
        return None
    concat = producer.node
    positions: list = []
    for slot, piece in enumerate(concat.input):
        if index.is_constant(piece):
            positions += [_TargetEntry(concat, piece, i) for i in range(int(np.asarray(index.const_value(piece)).size))]
            continue
        shape = index.shape(piece)
        if shape is None or len(shape) != 1 or shape[0] is None:
            return None
        items = index.shape_items(piece) if shape[0] == 1 else None
        read = items[0] if items and isinstance(items[0], tuple) else None
        positions += [_TargetEntry(concat, slot=slot, read=read)] if shape[0] == 1 else [None] * shape[0]
    return positions


def _static_read(entry: _TargetEntry, index: GraphIndex) -> int | None:
    """The size a run-time target element reads, when that size is fixed (the channel axis of a weighted layer,
    e.g. ``x.size(2)`` of the hidden stream in ``reshape(b, s, x.size(2))``)."""
    return None if entry.read is None else index.size(*entry.read)


@register("Reshape")
def reshape(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    index = ctx.index
    x, y = node.input[0], node.output[0]
    if dim.tensor != x and dim.tensor != y:
        return Block("Reshape target is data")
    if index.shape(x) is None or index.shape(y) is None:
        return Block("Reshape input or output shape unknown (shape inference could not resolve the target)")
    result = _reshape_links(x, y, dim, index.shape(x), index.shape(y), ctx, "Reshape")
    if isinstance(result, Block):
        return result
    out_axis = result[0].b.axis
    positions = _target_positions(node, index)
    if positions is None or out_axis >= len(positions):
        return Block("Reshape target is computed at run time")
    where = positions[out_axis]
    if where is None or (where.const is None and _static_read(where, index) != index.size(y, out_axis)):
        return Block("Reshape target size of the channel axis is computed at run time")
    if where.const is None:
        return result
    value = int(np.asarray(index.const_value(where.const)).reshape(-1)[where.offset])
    if value == 0 and not (result[0].a.axis == out_axis and len(result[0].b_idx) == index.size(x, out_axis)):
        return Block("Reshape copies a dimension (0) that does not carry the channels")
    return result


def _drop_dead_chain(index: GraphIndex, name: str) -> None:
    """Remove the nodes that computed ``name`` (a Shape -> Gather -> Unsqueeze chain) once nothing reads them."""
    producer = index.producer.get(name)
    if producer is None or name in index.graph_outputs or any(index.consumers_of(o) for o in producer.node.output):
        return
    inputs = [i for i in producer.node.input if i]
    index.remove_nodes([producer.node])
    for upstream in inputs:
        if not index.is_constant(upstream) or upstream in index.constant_nodes:
            _drop_dead_chain(index, upstream)


def _update_target(node: onnx.NodeProto, index: GraphIndex, kept, editor, follows: tuple[int, ...]) -> None:
    """Give every element of ``node``'s shape input (Reshape target, Expand shape; right-aligned with the output)
    whose output axis shrank the new count. Values in ``follows`` adapt by themselves and stay (Reshape's 0 and
    -1, Expand's 1); a run-time element that read a fixed size becomes that constant."""
    y = node.output[0]
    positions = _target_positions(node, index) or []
    shift = (index.rank(y) or len(positions)) - len(positions)
    for pos, where in enumerate(positions):
        new = kept(Dim(y, pos + shift))
        if new is None or where is None:
            continue
        if where.const is None:
            old = where.owner.input[where.slot]
            editor.set_input_value(where.owner, where.slot, np.array([len(new)], dtype=np.int64))
            _drop_dead_chain(index, old)
            continue
        value = np.array(index.const_value(where.const), dtype=np.int64)
        flat = value.reshape(-1)
        if flat[where.offset] in follows or flat[where.offset] == len(new):
            continue
        flat[where.offset] = len(new)
        editor.set_input_value(where.owner, list(where.owner.input).index(where.const), value)


@register_fix("Reshape")
def reshape_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    _update_target(node, index, kept, editor, (0, -1))


def _copied_axes(index: GraphIndex, x: str) -> set[int]:
    """Axes of ``x`` along which an Expand only copies (its input has size 1 there): every slice is the same, so
    they carry no channels of their own (grouped-query attention's repeat of the kv heads)."""
    producer = index.producer.get(x)
    if producer is None or producer.node.op_type != "Expand":
        return set()
    source, rank = index.shape(producer.node.input[0]), index.rank(x)
    if source is None or rank is None:
        return set()
    shift = rank - len(source)
    return {a for a in range(rank) if a < shift or (source[a - shift] == 1 and index.size(x, a) != 1)}


@register("Expand")
def expand(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """Axes the input already has pass through (the shape input is updated); axes it broadcasts from size 1 are
    copies, which cannot lose channels."""
    index = ctx.index
    x, y = node.input[0], node.output[0]
    role, pos = slot_of(node, dim)
    rx, ry = index.rank(x), index.rank(y)
    if (role == "in" and pos != 0) or rx is None or ry is None:
        return Block("Expand shape is data, or ranks unknown")
    x_axis = dim.axis if role == "in" else dim.axis - (ry - rx)
    y_axis = x_axis + ry - rx
    if x_axis < 0 or index.size(x, x_axis) != index.size(y, y_axis):
        return Block("Expand copies along the channel axis")
    positions = _target_positions(node, index)
    at = y_axis - (ry - len(positions)) if positions is not None else -1
    if positions is None or (at >= 0 and positions[at] is None):
        return Block("Expand shape is computed at run time")
    where = positions[at] if at >= 0 else None
    if where is not None and where.const is None and _static_read(where, index) != index.size(y, y_axis):
        return Block("Expand shape of the channel axis is computed at run time")
    return [Link(Dim(x, x_axis), Dim(y, y_axis))]


@register_fix("Expand")
def expand_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    _update_target(node, index, kept, editor, (1,))
