"""Weighted layers: one table of the ops that carry weights (Conv, ConvTranspose, Gemm, MatMul), and views built on it.

Why one table: where an op's weight is, which of its axes is summed over (the K of its GEMM, where N:M groups lie),
which gives the outputs, which input axis it reads, its groups and its MACs are asked by stats, unstructured
pruning, Wanda's feature norms, recon scoring and recovery alike. Each kind answers once, here, keyed by
(domain, op_type) like the channel rules; an op without an entry is not a weighted layer.

The matrix view (:class:`Layer`, :func:`layer_of`): recovery and recon channel scoring see a layer as rows
A [samples, K] times a weight matrix W [K, O], with conv rows taken as im2col patches at sampled positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr, node_label

MAX_ROWS_PER_BATCH = 2048  # sampled conv output positions per batch (recover.py asks for more for wide layers)
MAX_FEATURES = 4608  # larger reductions (e.g. 512x3x3) are left alone: their Gram matrix would dominate memory
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
NOT_FITTED = "not a weighted layer"  # layer_of's answer for ops recovery never fits (it reports no reason for them)


class LayerKind:
    """The geometry of one weighted op. Axes are non-negative; ``slot`` is the node input holding the weight and
    ``rank`` the rank of the tensor the axis belongs to.

    Defaults: the weight in input 1 multiplies axis 1 of input 0 (channels first), output 0's features are on
    axis 1, one group, no lsq view. A registered kind defines its weight axes and MACs and overrides what differs.
    """

    weight_slots: tuple[int, ...] = (1,)  # inputs that may hold a constant weight
    lsq = False  # recovery can see it as rows times a matrix (:meth:`layer`)

    def __init__(self, op: str) -> None:
        self.op = op

    def reduction_axis(self, node: onnx.NodeProto, slot: int, rank: int) -> int | None:
        """The weight axis summed over (the K of the op's GEMM; per group for a grouped conv)."""
        raise NotImplementedError

    def weight_output_axis(self, node: onnx.NodeProto, slot: int, rank: int) -> int | None:
        """The weight axis that indexes output features (None: the op sums it away, e.g. a 1-D MatMul operand)."""
        raise NotImplementedError

    def feature_axis(self, node: onnx.NodeProto, rank: int) -> int:
        """The axis of input 0 (rank ``rank``) that a slot-1 weight's reduction axis multiplies."""
        return 1

    def output_axis(self, node: onnx.NodeProto, rank: int) -> int:
        """The feature axis of output 0 (rank ``rank``)."""
        return 1

    def groups(self, node: onnx.NodeProto) -> int:
        return 1

    def feature_index(self, node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray | None:
        """For a slot-1 weight of ``shape``: the input feature (index along :meth:`feature_axis`) each weight entry
        multiplies, broadcastable against the weight; None when that is the entry's index on the reduction axis."""
        return None

    def macs(self, index: GraphIndex, node: onnx.NodeProto) -> int | None:
        """Multiply-accumulates at the index's static shapes (None if a shape is unknown)."""
        raise NotImplementedError

    def layer(self, index: GraphIndex, node: onnx.NodeProto) -> Layer | str:
        """The lsq view of ``node`` (a kind with ``lsq``, its weight not shared), or why there is none."""
        return NOT_FITTED


_KINDS: dict[tuple[str, str], LayerKind] = {}


def layer_kind(op: str, domain: str = "") -> Callable[[type[LayerKind]], type[LayerKind]]:
    """Register a :class:`LayerKind` subclass as the geometry of ``op`` in ``domain`` (default: the ONNX domain)."""

    def decorate(cls: type[LayerKind]) -> type[LayerKind]:
        _KINDS[(domain, op)] = cls(op)
        return cls

    return decorate


def kind_of(node: onnx.NodeProto) -> LayerKind | None:
    """The table entry of ``node``'s op, or None for an op without weights."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return _KINDS.get((domain, node.op_type))


def is_weighted(node: onnx.NodeProto) -> bool:
    """A layer with (usually constant) weights: what produces and consumes channels, and what has MACs."""
    return kind_of(node) is not None


def node_macs(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """Multiply-accumulates of one weighted layer at the index's static shapes (None if unknown or not weighted)."""
    kind = kind_of(node)
    return None if kind is None else kind.macs(index, node)


def _elements(index: GraphIndex, name: str) -> int | None:
    shape = index.shape(name)
    return None if shape is None or None in shape else int(np.prod(shape, dtype=np.int64))


def _bias(node: onnx.NodeProto) -> str | None:
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


class _Convolution(LayerKind):
    """Conv and ConvTranspose: fixed weight axes (``axes``: reduction, output) and a ``group`` attribute."""

    axes = (1, 0)

    def reduction_axis(self, node, slot, rank):
        return self.axes[0]

    def weight_output_axis(self, node, slot, rank):
        return self.axes[1]

    def groups(self, node):
        return int(attr(node, "group", 1))


@layer_kind("Conv")
class _Conv(_Convolution):
    """Y[n, o] = sum over (c, kh, kw) of W[o, c, kh, kw] * patch of X[n, g * C/g + c]: W is [O, C/g, k...], group g
    of the outputs reading group g of the input channels."""

    lsq = True

    def feature_index(self, node, shape):
        groups = self.groups(node)
        if groups == 1:
            return None
        out, per = shape[0], shape[1]
        index = (np.arange(out) // (out // groups))[:, None] * per + np.arange(per)[None, :]
        return index.reshape((out, per) + (1,) * (len(shape) - 2))

    def macs(self, index, node):
        out, w = _elements(index, node.output[0]), index.shape(node.input[1])
        if out is None or w is None or None in w:
            return None
        return out * int(np.prod(w[1:], dtype=np.int64))  # each output sums C/g x kernel products

    def layer(self, index, node):
        w = index.shape(node.input[1])
        if not index.is_constant(node.input[1]) or w is None or len(w) != 4:
            return "only 2-D convs with constant weights"
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return "auto_pad SAME"
        if int(np.prod(w[1:])) > MAX_FEATURES:  # per group: each group is fitted on its own
            return f"reduction of {int(np.prod(w[1:]))} features is too large"
        bias = _bias(node)
        return Layer("Conv", node.input[1], bias, self.output_axis(node, 4),
                     weight_out_axis=self.weight_output_axis(node, 1, 4), kernel=(int(w[2]), int(w[3])),
                     can_add_bias=bias is None, groups=self.groups(node))


@layer_kind("ConvTranspose")
class _ConvTranspose(_Convolution):
    """Each input position scatters X[n, c] * W[c, o, k...] into the output: W is [C, O/g, k...], so the reduction
    axis 0 spans all input channels and the output axis 1 is per group."""

    axes = (0, 1)

    def macs(self, index, node):
        out, x, w = _elements(index, node.output[0]), _elements(index, node.input[0]), index.shape(node.input[1])
        if out is None or x is None or w is None or None in w:
            return None
        return x * int(np.prod(w[1:], dtype=np.int64))  # every input value meets O/g x kernel weights


class _Product(LayerKind):
    """A matrix product: every output element sums K products, K being input 0's feature axis."""

    def macs(self, index, node):
        out, a = _elements(index, node.output[0]), index.shape(node.input[0])
        if out is None or a is None:
            return None
        k = a[self.feature_axis(node, len(a))]
        return None if k is None else out * int(k)


@layer_kind("Gemm")
class _Gemm(_Product):
    """Y = alpha * A' B' + beta * C with A' = A or A^T (transA) and B' = B or B^T (transB): B is [K, N] or [N, K]."""

    lsq = True

    def reduction_axis(self, node, slot, rank):
        return 1 if int(attr(node, "transB", 0)) else 0

    def weight_output_axis(self, node, slot, rank):
        return 0 if int(attr(node, "transB", 0)) else 1

    def feature_axis(self, node, rank):
        return 0 if int(attr(node, "transA", 0)) else 1

    def layer(self, index, node):
        if int(attr(node, "transA", 0)) or float(attr(node, "alpha", 1.0)) != 1 or float(attr(node, "beta", 1.0)) != 1:
            return "Gemm with transA/alpha/beta"
        if not index.is_constant(node.input[1]):
            return "non-constant weight"
        bias = _bias(node)
        n_out = index.size(node.output[0], 1)
        if bias is not None and (not index.is_constant(bias) or int(np.prod(index.shape(bias))) != n_out):
            return "Gemm bias is computed or broadcast"
        return Layer("Gemm", node.input[1], bias, self.output_axis(node, 2),
                     weight_out_axis=self.weight_output_axis(node, 1, 2), can_add_bias=bias is None)


@layer_kind("MatMul")
class _MatMul(_Product):
    """numpy matmul: A [..., M, K] times B [..., K, N]; either operand may be the constant, and a 1-D operand is a
    vector whose only axis is K."""

    weight_slots = (0, 1)
    lsq = True

    def reduction_axis(self, node, slot, rank):
        if rank == 1:
            return 0
        return rank - 2 if slot == 1 else rank - 1

    def weight_output_axis(self, node, slot, rank):
        if rank == 1:
            return None
        return rank - 1 if slot == 1 else rank - 2

    def feature_axis(self, node, rank):
        return rank - 1

    def output_axis(self, node, rank):
        return rank - 1

    def layer(self, index, node):
        if not index.is_constant(node.input[1]) or index.rank(node.input[1]) != 2:
            return NOT_FITTED
        if index.rank(node.output[0]) is None:  # e.g. downstream of a contrib op onnx's shape inference cannot pass
            return "output rank unknown"
        return Layer("MatMul", node.input[1], None, self.output_axis(node, index.rank(node.output[0])),
                     weight_out_axis=self.weight_output_axis(node, 1, 2))


WEIGHTED_OPS = tuple(op for _, op in _KINDS)
LSQ_OPS = frozenset(op for (_, op), kind in _KINDS.items() if kind.lsq)  # the ops layer_of can see as a matrix


@dataclass
class Weight:
    """One prunable weight: a float constant in a weight slot of a weighted layer (listed once when shared)."""

    name: str
    node: str
    op: str
    shape: tuple[int, ...]
    reduction_axis: int
    slot: int = field(default=1, kw_only=True)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def find_weights(index: GraphIndex) -> list[Weight]:
    """Float constant weights of every weighted layer, each listed once (at its first use) even when shared."""
    found: dict[str, Weight] = {}
    for node in index.graph.node:
        kind = kind_of(node)
        if kind is None:
            continue
        for slot in kind.weight_slots:
            if slot >= len(node.input) or node.input[slot] in found:
                continue
            name = node.input[slot]
            tensor = index.const_tensor(name)
            if tensor is None or tensor.data_type not in FLOAT_TYPES:
                continue
            shape = tuple(int(d) for d in tensor.dims)
            axis = kind.reduction_axis(node, slot, len(shape)) if shape else None
            if axis is None:
                continue
            found[name] = Weight(name, node_label(node), node.op_type, shape, axis, slot=slot)
    return list(found.values())


@dataclass
class Layer:
    """How to see one weighted layer as rows A [samples, K] times a matrix W [K, O].

    A grouped (or depthwise) conv is seen as the dense conv it equals: W is block-diagonal, each group's outputs
    reading only its own input channels (``blocks``); lsq fits each block on its own.
    """

    op: str
    weight: str
    bias: str | None
    out_axis: int  # feature axis of the layer's output
    weight_out_axis: int = 1  # weight axis indexing outputs; 0 (Conv, Gemm transB): W is the flattened transpose
    kernel: tuple[int, int] | None = None  # rows are im2col patches of this kernel; None: rows of the last axis
    can_add_bias: bool = False  # no bias input yet, but the op takes one
    groups: int = 1

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        per_group = w.reshape(w.shape[0], -1).T if self.weight_out_axis == 0 else w  # [K / groups, O]
        if self.groups == 1:
            return per_group
        dense = np.zeros((per_group.shape[0] * self.groups, per_group.shape[1]), dtype=w.dtype)
        for rows, cols in self.blocks(dense.shape):
            dense[rows, cols] = per_group[:, cols]
        return dense

    def from_matrix(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.groups > 1:
            m = np.concatenate([m[rows, cols] for rows, cols in self.blocks(m.shape)], axis=1)
        return m.T.reshape(shape) if self.weight_out_axis == 0 else m

    def blocks(self, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
        """(matrix rows, matrix columns) of the independent parts of W [K, O]: one per conv group."""
        k, o = shape[0] // self.groups, shape[1] // self.groups
        return [(slice(g * k, (g + 1) * k), slice(g * o, (g + 1) * o)) for g in range(self.groups)]

    def pattern_order(self, shape: tuple[int, ...], pattern: tuple[int, int] | None) -> np.ndarray | None:
        """Matrix rows in an order where N:M groups (consecutive along the reduction axis) are consecutive."""
        if pattern is None or self.kernel is None:
            return None  # matrix rows are the reduction axis itself
        channels, spatial = shape[1], int(np.prod(shape[2:]))
        return np.arange(channels * spatial).reshape(channels, spatial).T.reshape(-1)

    def rows(self, node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, rng,
             limit: int = MAX_ROWS_PER_BATCH) -> tuple[np.ndarray, np.ndarray]:
        if self.kernel is None:
            return x.reshape(-1, x.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64)
        return conv_rows(node, self.kernel, x, y, rng, limit)


def conv_rows(node: onnx.NodeProto, kernel: tuple[int, int], x: np.ndarray, y: np.ndarray,
              rng, limit: int = MAX_ROWS_PER_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """im2col at a random sample of output positions: rows of (c, kh, kw) patches and the matching outputs."""
    n, c = x.shape[:2]
    kh, kw = kernel
    sh, sw = (int(s) for s in (attr(node, "strides") or [1, 1]))
    dh, dw = (int(d) for d in (attr(node, "dilations") or [1, 1]))
    pt, pl, pb, pr = (int(p) for p in (attr(node, "pads") or [0, 0, 0, 0]))
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho, wo = y.shape[2], y.shape[3]
    total = n * ho * wo
    pick = rng.choice(total, size=min(total, limit), replace=False)
    bn, rem = np.divmod(pick, ho * wo)
    oh, ow = np.divmod(rem, wo)
    ih = oh[:, None] * sh + (np.arange(kh) * dh)[None, :]  # [P, kh]
    iw = ow[:, None] * sw + (np.arange(kw) * dw)[None, :]  # [P, kw]
    patches = xp[bn[:, None, None, None], np.arange(c)[None, :, None, None], ih[:, None, :, None],
                 iw[:, None, None, :]]  # [P, c, kh, kw]
    rows = patches.reshape(len(pick), -1).astype(np.float64)
    targets = y[bn, :, oh, ow].astype(np.float64)  # [P, O]
    return rows, targets


def layer_of(index: GraphIndex, node: onnx.NodeProto) -> Layer | str:
    """The layer view of ``node`` for lsq, or why it is skipped (:data:`NOT_FITTED`: not a layer lsq fits)."""
    kind = kind_of(node)
    if kind is None or not kind.lsq:
        return NOT_FITTED
    if len(node.input) > 1 and index.is_constant(node.input[1]) and len(index.consumers_of(node.input[1])) > 1:
        return "weight shared with other nodes"
    return kind.layer(index, node)
from onnxprune.graph import fused_layers  # noqa: E402,F401  (registers the fused attention kinds)
