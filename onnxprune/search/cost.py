"""The analytic cost of a channel allocation: MACs or parameters as graph/stats.py counts them, for any kept counts,
without building the pruned model.

Why this is exact: a weighted layer's MACs are its weight's element count times a factor that channel removal does
not change (output positions for Conv, input positions for ConvTranspose, rows for Gemm/MatMul), and a parameter
count is a sum of element counts. An element count is a product over axes, and an axis shrinks by what the groups
running along it lose. So the cost is a sum of terms ``base * prod(kept / size)`` over each term's axes: bilinear in
the groups' kept counts (a conv between two pruned groups saves the product), which a per-channel cost misses.
Whatever no group touches (layers without a constant weight, constants outside every group) is a constant part,
taken from the measured total so that ``cost({})`` is exactly what stats report for the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.channels import Dim
from onnxprune.channels.groups import GroupSet
from onnxprune.errors import ConfigError
from onnxprune.graph.layers import FLOAT_TYPES, kind_of, node_macs
from onnxprune.graph.stats import model_stats

KINDS = ("macs", "params")


@dataclass
class CostModel:
    """``cost(removed)`` for ``removed`` = channels removed per group id.

    Attributes:
        total: the measured cost of the model as it is (nothing removed).
    """

    total: float
    constant: float
    base: np.ndarray  # [terms]
    axes: np.ndarray  # [terms, max axes] indices into the axis list; len(axes) = an axis that never shrinks
    share: np.ndarray  # [groups, axes]: fraction of an axis one removed channel of the group takes away
    group_row: dict[int, int]

    def cost(self, removed: dict[int, int]) -> float:
        counts = np.zeros(len(self.group_row))
        for gid, n in removed.items():
            counts[self.group_row[gid]] = n
        kept = np.append(1.0 - counts @ self.share, 1.0)
        return float(self.constant + (self.base * kept[self.axes].prod(axis=1)).sum())


def cost_model(groups: GroupSet, kind: str) -> CostModel:
    """The cost model of ``kind`` ("macs" or "params") for the model behind ``groups``' index.

    Raises:
        ConfigError: MACs are unknown (a dynamic shape without ``--input-shape``).
    """
    index = groups.index
    stats = model_stats(index.model, index=index, zeros={})
    if kind == "macs" and stats.macs is None:
        raise ConfigError("--target-macs: the model's MACs are unknown (dynamic shapes); give --input-shape")
    total = float(stats.macs if kind == "macs" else stats.params)
    tracked = {dim for g in groups.groups for dim in g.dims}
    terms = _mac_terms(index, tracked) if kind == "macs" else [
        (float(base), _axes_of(index, tensor, tracked)) for tensor, base in _param_terms(groups, tracked)]
    axis_list = sorted({dim for _, dims in terms for dim in dims}, key=lambda d: (d.tensor, d.axis))
    position = {dim: k for k, dim in enumerate(axis_list)}
    width = max((len(dims) for _, dims in terms), default=0)
    axes = np.full((len(terms), max(width, 1)), len(axis_list), dtype=np.int64)
    for row, (_, dims) in enumerate(terms):
        axes[row, :len(dims)] = [position[d] for d in dims]
    group_row = {g.id: k for k, g in enumerate(groups.groups)}
    share = np.zeros((len(groups.groups), len(axis_list)))
    for g in groups.groups:
        for dim in g.dims:
            if dim in position:  # indices of the axis per channel, over the axis's size
                share[group_row[g.id], position[dim]] = len(g.members[dim][0]) / g.size / groups.dim_sizes[dim]
    base = np.array([b for b, _ in terms])
    return CostModel(total, total - float(base.sum()), base, axes, share, group_row)


def _axes_of(index, tensor: str, tracked: set[Dim]) -> list[Dim]:
    return [Dim(tensor, axis) for axis in range(len(index.shape(tensor) or ())) if Dim(tensor, axis) in tracked]


def _mac_terms(index, tracked: set[Dim]) -> list[tuple[float, list[Dim]]]:
    """(MACs, the axes they scale with) of every layer with MACs: a constant weight's axes; for a layer without one
    (attention's score and context MatMuls, fused attention ops without a weight input) the output's axes, and for a
    MatMul also the contraction axis of its first operand (MACs = output elements x K: heads shrink the output's
    head axis, head dims the contraction)."""
    terms = []
    for node in index.graph.node:
        kind = kind_of(node)
        macs = node_macs(index, node) if kind is not None else None
        if not macs:
            continue
        weight = next((node.input[s] for s in kind.weight_slots if s < len(node.input)
                       and index.is_constant(node.input[s])), None)
        if weight is not None:
            terms.append((float(macs), _axes_of(index, weight, tracked)))
            continue
        dims = _axes_of(index, node.output[0], tracked)
        if node.op_type == "MatMul" and index.rank(node.input[0]):
            k = Dim(node.input[0], index.rank(node.input[0]) - 1)
            dims += [k] if k in tracked else []
        terms.append((float(macs), dims))
    return terms


def _param_terms(groups: GroupSet, tracked: set[Dim]) -> list[tuple[str, int]]:
    """(constant, element count) of every constant some group runs along."""
    index = groups.index
    names = dict.fromkeys(d.tensor for d in tracked
                          if index.is_constant(d.tensor) and index.dtypes.get(d.tensor) in FLOAT_TYPES)
    return [(name, int(np.prod(index.shape(name), dtype=np.int64))) for name in names]
