"""onnxruntime's fused transformer ops (com.microsoft) and ai.onnx Attention: heads and FFN neurons through them.

Heads. Every attention op computes, per head h, softmax(Q_h K_h^T * scale + mask) V_h from D (or Dv) consecutive
channels of each of its q/k/v tensors, and writes V's D_v channels of head h to the output. Removing head h's
channels from q, k, v and the output together is exact: the other heads never read them, and the scale is
1/sqrt(D) per head, unchanged. Removing single channels is not (q/k channels change the softmax), so a *unit* is a
whole head: every index of the head, in every tensor, is linked to the head's first output index (several indices to
one), and the builder makes them one channel. Grouped-query attention shares one kv head among Hq/Hkv query heads:
its unit is a kv head with all its query heads. ``fix`` steps set ``num_heads`` (and ``qkv_hidden_sizes``,
``kv_num_heads``, ``q_num_heads``) to the kept counts; packed weights and biases are sliced as members.

FFN. BiasGelu, FastGelu, Gelu and QuickGelu act per element (the optional bias is per channel of the last axis and
is sliced with it), so neurons pass through them.

Hidden width. SkipLayerNormalization, SkipSimplifiedLayerNormalization and EmbedLayerNormalization normalise over
the hidden axis: removing a channel there changes every other channel's statistics, so that axis blocks, with a
reason, as LayerNormalization does; their other axes pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.channels.registry import Block, Dim, Link, register, register_fix, slot_of
from onnxprune.graph.fused_layers import optional_input, packed_sizes
from onnxprune.graph.index import GraphIndex, attr

MS = "com.microsoft"


@dataclass(frozen=True)
class Part:
    """Where the units of a head-coupled dim lie: unit u owns indices ``offset + u * width + [0, width)``."""

    dim: Dim
    offset: int
    width: int


def unit_links(parts: list[Part], units: int) -> list[Link]:
    """Link every index of every unit, in every part, to the unit's first index of the first part."""
    anchor = parts[0]
    links = []
    for part in parts:
        unit = np.repeat(np.arange(units), part.width)
        inner = np.tile(np.arange(part.width), units)
        links.append(Link(anchor.dim, part.dim, a_idx=anchor.offset + unit * anchor.width,
                          b_idx=part.offset + unit * part.width + inner))
    return links


def _output(node: onnx.NodeProto, slot: int) -> str | None:
    return node.output[slot] if slot < len(node.output) and node.output[slot] else None


def _heads_axis(ctx, name: str | None, axis_from_end: int, heads: int, width: int) -> list[Part]:
    """An optional [.., H, S, T] tensor (attention bias): a part when its heads axis is not broadcast."""
    rank = ctx.index.rank(name) if name else None
    if rank is None or rank < axis_from_end or ctx.index.size(name, rank - axis_from_end) != heads:
        return []
    return [Part(Dim(name, rank - axis_from_end), 0, width)]


def _couple(dim: Dim, parts: list[Part], units: int, passes: list[list[Dim]], op: str) -> list[Link] | Block:
    """The links of the class ``dim`` is in: the head parts, or one of the ``passes`` classes (axes coupled one to
    one, e.g. the hidden input axis and the packed weight's rows)."""
    if any(p.dim == dim for p in parts):
        return unit_links(parts, units)
    for members in passes:
        if dim in members:
            return [Link(members[0], other) for other in members[1:]]
    return Block(f"{op}: axis {dim.axis} of {dim.tensor} is not a head or channel axis")


def _heads_of(size: int | None, heads: int) -> int | None:
    return size // heads if isinstance(size, int) and heads > 0 and size % heads == 0 and size >= heads else None


def _set_int(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.INTS:
                del a.ints[:]
                a.ints.extend(int(v) for v in value)
            else:
                a.i = int(value)


# -- com.microsoft Attention: packed q/k/v weight --------------------------------------------------------------------

@register("Attention", domain=MS)
def ms_attention(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    x, w, y = node.input[0], node.input[1], node.output[0]
    if optional_input(node, 4) or _output(node, 1):
        return Block("Attention with a past/present cache is not pruned")
    heads = int(attr(node, "num_heads", 0))
    w_shape = ctx.index.shape(w)
    if w_shape is None or len(w_shape) != 2 or ctx.index.rank(x) != 3:
        return Block("Attention weight or input shape unknown")
    sizes = packed_sizes(node, w_shape[1])
    per_head = [_heads_of(s, heads) for s in sizes] if sizes else [None]
    if None in per_head or sizes[0] != sizes[1] or sum(sizes) != w_shape[1]:
        return Block(f"Attention: q/k/v sizes {sizes} do not split into {heads} heads")
    dq, _, dv = per_head
    parts = [Part(Dim(y, 2), 0, dv), Part(Dim(w, 1), 0, dq), Part(Dim(w, 1), sizes[0], dq),
             Part(Dim(w, 1), 2 * sizes[0], dv)]
    bias = optional_input(node, 2)
    if bias:
        parts += [Part(Dim(bias, 0), 0, dq), Part(Dim(bias, 0), sizes[0], dq), Part(Dim(bias, 0), 2 * sizes[0], dv)]
    parts += _heads_axis(ctx, optional_input(node, 5), 3, heads, 1)
    return _couple(dim, parts, heads, [[Dim(x, 2), Dim(w, 0)]], "Attention")


@register_fix("Attention", domain=MS)
def ms_attention_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    w = node.input[1]
    new = kept(Dim(w, 1))
    if new is None:
        return
    heads = int(attr(node, "num_heads", 0))
    sizes = packed_sizes(node, index.size(w, 1))
    bounds = np.cumsum([0, *sizes])
    kept_sizes = [int(np.count_nonzero((new >= lo) & (new < hi))) for lo, hi in zip(bounds[:-1], bounds[1:])]
    _set_int(node, "num_heads", kept_sizes[0] // (sizes[0] // heads))
    _set_int(node, "qkv_hidden_sizes", kept_sizes)


# -- com.microsoft MultiHeadAttention: separate q, k, v (3-D), optional packed bias ----------------------------------

@register("MultiHeadAttention", domain=MS)
def multi_head_attention(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    q, k, v, y = node.input[0], optional_input(node, 1), optional_input(node, 2), node.output[0]
    if any(optional_input(node, i) for i in (6, 7)) or any(_output(node, i) for i in (1, 2, 3)):
        return Block("MultiHeadAttention with a past/present cache or qk output is not pruned")
    if k is None or v is None or any(ctx.index.rank(t) != 3 for t in (q, k, v)):
        return Block("MultiHeadAttention with packed or 4-D (BNSH) q/k/v is not pruned")
    heads = int(attr(node, "num_heads", 0))
    hq, hk, hv = (ctx.index.size(t, 2) for t in (q, k, v))
    dq, dv = _heads_of(hq, heads), _heads_of(hv, heads)
    if dq is None or dv is None or hk != hq:
        return Block(f"MultiHeadAttention: q/k/v sizes ({hq}, {hk}, {hv}) do not split into {heads} heads")
    parts = [Part(Dim(y, 2), 0, dv), Part(Dim(q, 2), 0, dq), Part(Dim(k, 2), 0, dq), Part(Dim(v, 2), 0, dv)]
    bias = optional_input(node, 3)
    if bias:
        parts += [Part(Dim(bias, 0), 0, dq), Part(Dim(bias, 0), hq, dq), Part(Dim(bias, 0), 2 * hq, dv)]
    parts += _heads_axis(ctx, optional_input(node, 5), 3, heads, 1)
    return _couple(dim, parts, heads, [], "MultiHeadAttention")


@register_fix("MultiHeadAttention", domain=MS)
def multi_head_attention_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    new = kept(Dim(node.input[0], 2))
    if new is not None:
        heads = int(attr(node, "num_heads", 0))
        _set_int(node, "num_heads", len(new) // (index.size(node.input[0], 2) // heads))


# -- grouped-query attention: com.microsoft GroupQueryAttention and ai.onnx Attention (opset 23) --------------------

def _gqa_parts(q: str, k: str | None, v: str | None, y: str, heads: int, kv_heads: int, ctx,
               axis: int = 2) -> tuple[list[Part], int] | str:
    """Parts of one unit = one kv head and its ``heads / kv_heads`` query heads, on the head-carrying ``axis``
    (the last of 3-D tensors; with 4-D [B, H, S, D] tensors, the heads axis, each head one index)."""
    if not heads or not kv_heads or heads % kv_heads:
        return f"{heads} query heads do not share {kv_heads} kv heads evenly"
    group = heads // kv_heads
    per_index = axis == 1
    hq = ctx.index.size(q, axis)
    if k is None:  # packed [q | k | v] on the last axis
        d = hq // (heads + 2 * kv_heads) if isinstance(hq, int) and hq % (heads + 2 * kv_heads) == 0 else None
        if d is None or per_index:
            return f"packed qkv of {hq} channels does not split into {heads} + 2 x {kv_heads} heads"
        parts = [Part(Dim(y, axis), 0, group * d), Part(Dim(q, axis), 0, group * d),
                 Part(Dim(q, axis), heads * d, d), Part(Dim(q, axis), (heads + kv_heads) * d, d)]
        return parts, kv_heads
    hk, hv = ctx.index.size(k, axis), ctx.index.size(v, axis)
    if per_index:
        if (hq, hk, hv) != (heads, kv_heads, kv_heads):
            return f"heads axes ({hq}, {hk}, {hv}) are not ({heads}, {kv_heads}, {kv_heads})"
        dq = dk = dv = 1
    else:
        dq, dk, dv = _heads_of(hq, heads), _heads_of(hk, kv_heads), _heads_of(hv, kv_heads)
        if None in (dq, dk, dv) or dq != dk:
            return f"q/k/v sizes ({hq}, {hk}, {hv}) do not split into {heads}/{kv_heads} heads"
    parts = [Part(Dim(y, axis), 0, group * dv), Part(Dim(q, axis), 0, group * dq), Part(Dim(k, axis), 0, dk),
             Part(Dim(v, axis), 0, dv)]
    return parts, kv_heads


def _cache_parts(node: onnx.NodeProto, ctx, slots: list[tuple[str, int]]) -> list[Part]:
    """Past/present caches [B, Hkv, T, D]: one index of the heads axis per unit."""
    names = [(optional_input if side == "in" else _output)(node, i) for side, i in slots]
    return [Part(Dim(n, 1), 0, 1) for n in names if n and ctx.index.rank(n) == 4]


@register("GroupQueryAttention", domain=MS)
def group_query_attention(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    q, k, v, y = node.input[0], optional_input(node, 1), optional_input(node, 2), node.output[0]
    if _output(node, 3):
        return Block("GroupQueryAttention with a qk output is not pruned")
    if any(ctx.index.rank(t) != 3 for t in (q, k, v) if t):
        return Block("GroupQueryAttention: q/k/v are not 3-D")
    heads, kv_heads = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    found = _gqa_parts(q, k, v, y, heads, kv_heads, ctx)
    if isinstance(found, str):
        return Block(f"GroupQueryAttention: {found}")
    parts, units = found
    parts += _cache_parts(node, ctx, [("in", 3), ("in", 4), ("out", 1), ("out", 2)])
    sink = optional_input(node, 11)
    if sink:
        parts.append(Part(Dim(sink, 0), 0, heads // kv_heads))
    parts += _heads_axis(ctx, optional_input(node, 10), 3, heads, heads // kv_heads)
    return _couple(dim, parts, units, [], "GroupQueryAttention")


def _kept_units(node: onnx.NodeProto, index: GraphIndex, kept, heads: int, kv_heads: int) -> int | None:
    """Kept kv heads, read from the kept indices of the output's heads axis."""
    y = node.output[0]
    axis = index.rank(y) - 1 if index.rank(y) == 3 else 1
    new, size = kept(Dim(y, axis)), index.size(y, axis)
    if new is None or not size:
        return None
    return len(new) * kv_heads // size


@register_fix("GroupQueryAttention", domain=MS)
def group_query_attention_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    heads, kv_heads = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    units = _kept_units(node, index, kept, heads, kv_heads)
    if units is not None:
        _set_int(node, "num_heads", units * heads // kv_heads)
        _set_int(node, "kv_num_heads", units)


@register("Attention")
def onnx_attention(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    q, k, v, y = node.input[0], node.input[1], node.input[2], node.output[0]
    if _output(node, 3):
        return Block("Attention with a qk_matmul output is not pruned")
    rank = ctx.index.rank(q)
    if rank not in (3, 4) or any(ctx.index.rank(t) != rank for t in (k, v, y)):
        return Block("Attention: q/k/v ranks unknown or mixed")
    if rank == 3:
        heads, kv_heads = int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0))
        found = _gqa_parts(q, k, v, y, heads, kv_heads, ctx)
        passes = []
    else:
        heads, kv_heads = ctx.index.size(q, 1), ctx.index.size(k, 1)
        found = _gqa_parts(q, k, v, y, heads or 0, kv_heads or 0, ctx, axis=1)
        passes = [[Dim(v, 3), Dim(y, 3)]]  # a value channel of every head: the context is linear in it
    if isinstance(found, str):
        return Block(f"Attention: {found}")
    parts, units = found
    parts += _cache_parts(node, ctx, [("in", 4), ("in", 5), ("out", 1), ("out", 2)])
    parts += _heads_axis(ctx, optional_input(node, 3), 3, heads, heads // kv_heads)
    return _couple(dim, parts, units, passes, "Attention")


@register_fix("Attention")
def onnx_attention_fix(node: onnx.NodeProto, index: GraphIndex, kept, editor) -> None:
    if index.rank(node.input[0]) != 3:
        return  # 4-D inputs carry their head counts in their shapes
    heads, kv_heads = int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    units = _kept_units(node, index, kept, heads, kv_heads)
    if units is not None:
        _set_int(node, "q_num_heads", units * heads // kv_heads)
        _set_int(node, "kv_num_heads", units)


# -- FFN activations and the residual stream's normalisations ------------------------------------------------------

@register("BiasGelu", "FastGelu", "Gelu", "QuickGelu", domain=MS)
def fused_activation(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """y = act(x + bias): every axis passes; the per-channel bias (input 1, [N]) is a member of the last axis."""
    x, y = node.input[0], node.output[0]
    rank = ctx.index.rank(x)
    role, pos = slot_of(node, dim)
    if rank is None:
        return Block(f"{node.op_type}: rank unknown")
    axis = rank - 1 if role == "in" and pos == 1 else dim.axis
    links = [Link(Dim(x, axis), Dim(y, axis))]
    bias = optional_input(node, 1)
    if bias and axis == rank - 1:
        if ctx.index.rank(bias) != 1 or ctx.index.size(bias, 0) != ctx.index.size(x, axis):
            return Block(f"{node.op_type}: bias is not one value per channel")
        links.append(Link(Dim(x, axis), Dim(bias, 0)))
    return links


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def skip_layer_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """y = norm(x + skip + bias) over the last (hidden) axis: that axis blocks; the others pass to every output."""
    x = node.input[0]
    rank = ctx.index.rank(x)
    role, pos = slot_of(node, dim)
    if rank is None or (role == "in" and pos > 1):
        return Block(f"{node.op_type} parameters cannot be pruned (it normalises over the hidden axis)")
    dim_rank = ctx.index.rank(dim.tensor)
    if dim_rank is None or dim.axis == dim_rank - 1:
        return Block(f"{node.op_type} normalises over the hidden axis")
    axis = dim.axis + rank - dim_rank
    members = [Dim(x, axis)] + [Dim(o, axis) for o in node.output if o]
    skip = node.input[1]
    skip_rank = ctx.index.rank(skip)
    if skip_rank is not None and axis - rank + skip_rank >= 0:
        s_axis = axis - rank + skip_rank
        if ctx.index.size(skip, s_axis) == ctx.index.size(x, axis) != 1:
            members.append(Dim(skip, s_axis))
    return [Link(members[0], m) for m in members[1:]]


@register("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(node: onnx.NodeProto, dim: Dim, ctx) -> list[Link] | Block:
    """Word + position + segment embeddings, layer-normalised over the hidden axis: that axis blocks, and the
    other axes (batch, sequence of token ids) carry no channels."""
    if ctx.index.rank(dim.tensor) == dim.axis + 1:
        return Block("EmbedLayerNormalization normalises over the hidden axis")
    return Block("EmbedLayerNormalization: token axes carry no channels")
