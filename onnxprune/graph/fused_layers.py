"""onnxruntime's fused attention ops as weighted-layer kinds, and the output shapes of the contrib ops onnx's shape
inference does not know.

Why kinds: com.microsoft Attention carries the packed q/k/v weight [hidden_in, q + k + v] (its projections' MACs
are in the op), and every fused attention op computes the score and context products inside itself. The unfused
export counts those as MatMuls; registering the fused ops keeps MACs, importance scoring, the report and ``inspect``
comparable between the two forms. MultiHeadAttention, GroupQueryAttention and ai.onnx Attention take activations
only (no weight slot): they are kinds for their MACs alone.

Why shapes: without them every tensor after a contrib op is shapeless to onnx, and no channel rule could couple
anything past the first fused op (graph/index.py runs onnx's inference again after filling these in).
"""

from __future__ import annotations

from typing import Callable

import onnx

from onnxprune.graph.index import attr
from onnxprune.graph.inference import Shaped, register_output_shapes
from onnxprune.graph.layers import LayerKind, layer_kind

MS = "com.microsoft"
ShapeOf = Callable[[str], "Shaped | None"]


def optional_input(node: onnx.NodeProto, slot: int) -> str | None:
    """The name in input ``slot``, None when the slot is absent or empty (an omitted optional input)."""
    return node.input[slot] if slot < len(node.input) and node.input[slot] else None


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def packed_sizes(node: onnx.NodeProto, weight_cols: int | None) -> tuple[int, int, int] | None:
    """(q, k, v) column counts of com.microsoft Attention's packed weight: ``qkv_hidden_sizes`` or three equal
    thirds."""
    given = attr(node, "qkv_hidden_sizes")
    if given:
        return tuple(int(s) for s in given)
    if not isinstance(weight_cols, int) or weight_cols % 3:
        return None
    return (weight_cols // 3,) * 3


class _AttentionKind(LayerKind):
    """Axes as a MatMul over the last axis (output features last); subclasses give MACs."""

    def reduction_axis(self, node, slot, rank):
        return 0

    def weight_output_axis(self, node, slot, rank):
        return 1

    def feature_axis(self, node, rank):
        return rank - 1

    def output_axis(self, node, rank):
        return rank - 1


@layer_kind("Attention", MS)
class _MsAttention(_AttentionKind):
    """Y = softmax(Q K^T * scale + mask) V per head, with [Q | K | V] = X W + b: W is [hidden_in, q + k + v], head
    h owning columns h*D..(h+1)*D of each of the three sections."""

    def macs(self, index, node):
        x, w, y = index.shape(node.input[0]), index.shape(node.input[1]), index.shape(node.output[0])
        if x is None or w is None or y is None or optional_input(node, 4) or not _static(*x, *w, *y):
            return None
        sizes = packed_sizes(node, w[1])
        if sizes is None or len(x) != 3:
            return None
        b, s, hidden = x
        return b * s * hidden * sum(sizes) + b * s * s * (sizes[0] + sizes[2])  # projections, scores, context


@layer_kind("MultiHeadAttention", MS)
class _MultiHeadAttention(_AttentionKind):
    """Q [B, S, N*Dq], K [B, L, N*Dq], V [B, L, N*Dv] -> Y [B, S, N*Dv]: scores B*N*S*L*Dq, context B*N*S*L*Dv."""

    weight_slots = ()

    def macs(self, index, node):
        q, k, y = index.shape(node.input[0]), index.shape(optional_input(node, 1) or ""), index.shape(node.output[0])
        if q is None or k is None or y is None or len(q) != 3 or len(k) != 3 or optional_input(node, 6):
            return None
        if not _static(*q, *y, k[1]):
            return None
        return q[0] * q[1] * k[1] * (q[2] + y[2])


@layer_kind("GroupQueryAttention", MS)
class _GroupQueryAttention(_AttentionKind):
    """Q [B, S, Hq*D] (or packed [B, S, (Hq + 2 Hkv) D]) against kv heads shared by Hq/Hkv query heads: scores and
    context each B*Hq*S*T*D, T = S without a cache (with one, T is only known at run time)."""

    weight_slots = ()

    def macs(self, index, node):
        q, y = index.shape(node.input[0]), index.shape(node.output[0])
        if q is None or y is None or len(y) != 3 or not _static(*y) or optional_input(node, 3):
            return None
        return 2 * y[0] * y[1] * y[1] * y[2]


@layer_kind("Attention")
class _OnnxAttention(_AttentionKind):
    """ai.onnx Attention (opset 23): 3-D Q [B, S, Hq*D], K [B, L, Hkv*D], V [B, L, Hkv*Dv] -> Y [B, S, Hq*Dv], or
    4-D [B, H, S, D] tensors; scores B*Hq*S*L*D, context B*Hq*S*L*Dv."""

    weight_slots = ()

    def macs(self, index, node):
        q, k, y = index.shape(node.input[0]), index.shape(node.input[1]), index.shape(node.output[0])
        if q is None or k is None or y is None or optional_input(node, 4) or not _static(*q, *k, *y):
            return None
        if len(q) == 3:
            return q[0] * q[1] * k[1] * (q[2] + y[2])
        return q[0] * q[1] * q[2] * k[2] * (q[3] + y[3])


def _same_as_input(node: onnx.NodeProto, shape: ShapeOf) -> list:
    """Every output shaped like input 0 (SkipLayerNormalization's mean/inv_std outputs: the hidden axis kept as 1)."""
    x = shape(node.input[0])
    if x is None:
        return []
    reduced = list(x[:-1]) + [1]
    if node.op_type.startswith("Skip"):
        return [x, reduced, reduced, x]
    return [x]


for _op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
            "QuickGelu", "BiasAdd"):
    register_output_shapes(_op, MS)(_same_as_input)


@register_output_shapes("Attention", MS)
def _attention_shapes(node: onnx.NodeProto, shape: ShapeOf) -> list:
    x, w = shape(node.input[0]), shape(node.input[1])
    sizes = packed_sizes(node, w[1] if w is not None and len(w) == 2 else None)
    if x is None or sizes is None or len(x) != 3:
        return []
    return [[x[0], x[1], sizes[2]]]


@register_output_shapes("MultiHeadAttention", MS)
def _mha_shapes(node: onnx.NodeProto, shape: ShapeOf) -> list:
    q, v = shape(node.input[0]), shape(optional_input(node, 2) or "")
    if q is None or v is None or len(q) != 3:
        return []
    if len(v) == 3:
        return [[q[0], q[1], v[2]]]
    if len(v) == 4 and _static(v[1], v[3]):  # [B, N, L, Dv]
        return [[q[0], q[1], v[1] * v[3]]]
    return []


@register_output_shapes("GroupQueryAttention", MS)
def _gqa_shapes(node: onnx.NodeProto, shape: ShapeOf) -> list:
    q = shape(node.input[0])
    heads, kv_heads = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    if q is None or len(q) != 3 or not _static(q[2]) or not heads or not kv_heads:
        return []
    packed = optional_input(node, 1) is None
    head = q[2] // (heads + 2 * kv_heads) if packed else q[2] // heads
    total = None if optional_input(node, 3) else q[1]
    present = [q[0], kv_heads, total, head]
    return [[q[0], q[1], heads * head], present, present]


@register_output_shapes("EmbedLayerNormalization", MS)
def _embed_shapes(node: onnx.NodeProto, shape: ShapeOf) -> list:
    ids, table = shape(node.input[0]), shape(node.input[2])
    if ids is None or table is None or len(ids) != 2 or len(table) != 2:
        return []
    out = [ids[0], ids[1], table[1]]
    return [out, None, out]  # mask_index (int32) is no channel tensor

