"""Weighted layers as matrices: which Conv/Gemm/MatMul nodes lsq can re-fit, and the rows that feed them.

Why a module of its own: recovery (recover.py) and recon channel scoring (reconstruction.py) both see a layer as
rows A [samples, K] times a weight matrix W [K, O], with conv rows taken as im2col patches at sampled positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr

MAX_ROWS_PER_BATCH = 2048  # sampled conv output positions per batch (recover.py asks for more for wide layers)
MAX_FEATURES = 4608  # larger reductions (e.g. 512x3x3) are left alone: their Gram matrix would dominate memory


@dataclass
class Layer:
    """How to see one weighted layer as rows A [samples, K] times a matrix W [K, O].

    A grouped (or depthwise) conv is seen as the dense conv it equals: W is block-diagonal, each group's outputs
    reading only its own input channels (``blocks``); lsq fits each block on its own.
    """

    op: str
    weight: str
    bias: str | None
    out_axis: int
    trans: bool = False
    kernel: tuple[int, int] = (1, 1)
    can_add_bias: bool = False  # no bias input yet, but the op takes one
    groups: int = 1

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        if self.op != "Conv":
            return w.T if self.trans else w
        per_group = w.reshape(w.shape[0], -1).T  # [K / groups, O]
        if self.groups == 1:
            return per_group
        dense = np.zeros((per_group.shape[0] * self.groups, per_group.shape[1]), dtype=w.dtype)
        for rows, cols in self.blocks(dense.shape):
            dense[rows, cols] = per_group[:, cols]
        return dense

    def from_matrix(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.op != "Conv":
            return m.T if self.trans else m
        if self.groups == 1:
            return m.T.reshape(shape)
        return np.concatenate([m[rows, cols] for rows, cols in self.blocks(m.shape)], axis=1).T.reshape(shape)

    def blocks(self, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
        """(matrix rows, matrix columns) of the independent parts of W [K, O]: one per conv group."""
        k, o = shape[0] // self.groups, shape[1] // self.groups
        return [(slice(g * k, (g + 1) * k), slice(g * o, (g + 1) * o)) for g in range(self.groups)]

    def pattern_order(self, shape: tuple[int, ...], pattern: tuple[int, int] | None) -> np.ndarray | None:
        """Matrix rows in an order where N:M groups (consecutive along the reduction axis) are consecutive."""
        if pattern is None or self.op != "Conv":
            return None  # Gemm/MatMul rows are the reduction axis itself
        channels, spatial = shape[1], int(np.prod(shape[2:]))
        return np.arange(channels * spatial).reshape(channels, spatial).T.reshape(-1)

    def rows(self, node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, rng,
             limit: int = MAX_ROWS_PER_BATCH) -> tuple[np.ndarray, np.ndarray]:
        if self.op != "Conv":
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
    """The layer view of ``node`` for lsq, or why it is skipped."""
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return "not a weighted layer"
    if len(node.input) > 1 and index.is_constant(node.input[1]) and len(index.consumers_of(node.input[1])) > 1:
        return "weight shared with other nodes"
    if node.op_type == "Conv":
        w = index.shape(node.input[1])
        if not index.is_constant(node.input[1]) or w is None or len(w) != 4:
            return "only 2-D convs with constant weights"
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return "auto_pad SAME"
        if int(np.prod(w[1:])) > MAX_FEATURES:  # per group: each group is fitted on its own
            return f"reduction of {int(np.prod(w[1:]))} features is too large"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return Layer("Conv", node.input[1], bias, 1, kernel=(int(w[2]), int(w[3])), can_add_bias=bias is None,
                     groups=int(attr(node, "group", 1)))
    if node.op_type == "Gemm":
        if int(attr(node, "transA", 0)) or float(attr(node, "alpha", 1.0)) != 1 or float(attr(node, "beta", 1.0)) != 1:
            return "Gemm with transA/alpha/beta"
        if not index.is_constant(node.input[1]):
            return "non-constant weight"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        n_out = index.size(node.output[0], 1)
        if bias is not None and (not index.is_constant(bias) or int(np.prod(index.shape(bias))) != n_out):
            return "Gemm bias is computed or broadcast"
        return Layer("Gemm", node.input[1], bias, 1, trans=bool(int(attr(node, "transB", 0))),
                      can_add_bias=bias is None)
    if node.op_type == "MatMul" and index.is_constant(node.input[1]) and index.rank(node.input[1]) == 2:
        return Layer("MatMul", node.input[1], None, index.rank(node.output[0]) - 1)
    return "not a weighted layer"
