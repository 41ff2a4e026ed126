"""Importance scores: per weight element (unstructured) and per channel of a group (structured).

A channel's score aggregates every weight it owns: producer rows, consumer columns and, for ``bn-scale``, the
BatchNormalization scale. Each member's scores are divided by their mean first, so one large layer does not drown
the others, then reduced over members (mean, sum or max). A NaN or inf weight is an error naming it: its channel's
score would be NaN, and a NaN score compares neither higher nor lower, so channels would be chosen by position.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import Dim
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import ConfigError, DataError, InputModelError
from onnxprune.finite import require_finite
from onnxprune.graph.index import is_weighted

CHANNEL_CRITERIA = ("l1", "l2", "bn-scale", "act", "recon")
REDUCTIONS = ("mean", "sum", "max")


def weight_uses(groups: GroupSet, group: ChannelGroup) -> list[tuple[Dim, onnx.NodeProto]]:
    """(member dim, layer) for every constant member that is an operand of a weighted layer (either operand)."""
    index = groups.index
    return [(dim, use.node) for dim in group.dims if index.is_constant(dim.tensor)
            for use in index.consumers_of(dim.tensor) if is_weighted(use.node) and use.index in (0, 1)]


def weight_dims(groups: GroupSet, group: ChannelGroup) -> list[Dim]:
    """Member dims that are weights of Conv/ConvTranspose/Gemm/MatMul (each listed once)."""
    return list(dict.fromkeys(dim for dim, _ in weight_uses(groups, group)))


def bn_scale_dims(groups: GroupSet, group: ChannelGroup) -> list[Dim]:
    index = groups.index
    return [d for d in group.dims if index.is_constant(d.tensor) and any(
        u.node.op_type == "BatchNormalization" and u.index == 1 for u in index.consumers_of(d.tensor))]


def _per_index(values: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    """Per index along ``axis``: sum of |w| (l1) or of w^2 (l2), accumulated in float64 without a float64 copy."""
    values = np.asarray(values)
    other = tuple(a for a in range(values.ndim) if a != axis)
    if criterion == "l1":
        return np.abs(values).sum(axis=other, dtype=np.float64)
    return np.square(values).sum(axis=other, dtype=np.float64)


def channel_scores(groups: GroupSet, group: ChannelGroup, criterion: str = "l1", reduction: str = "mean",
                   activation: dict[Dim, np.ndarray] | None = None) -> tuple[np.ndarray, str | None]:
    """Score every channel of ``group`` (higher = more important).

    Args:
        criterion: "l1", "l2", "bn-scale", or "act": l1 times the channel's normalised mean |activation| over the
            group's activation tensors (calibration data), so channels that stay near zero on real data go first.
        activation: per-dim mean |activation| per index, from calibration data (needed for "act").

    Returns:
        (scores, note): note says when the criterion had to fall back (e.g. bn-scale on a group without BN).
    """
    if criterion not in CHANNEL_CRITERIA:
        raise ConfigError(f"unknown criterion '{criterion}' (choose from {', '.join(CHANNEL_CRITERIA)})")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown group reduction '{reduction}' (choose from {', '.join(REDUCTIONS)})")
    if criterion == "act" and activation is None:
        raise ConfigError("--criterion act needs calibration data (--calib)")
    note = None
    dims = bn_scale_dims(groups, group) if criterion == "bn-scale" else weight_dims(groups, group)
    base = "l1"
    if criterion == "bn-scale" and not dims:
        dims, note = weight_dims(groups, group), "no BatchNormalization in group: scored by l1"
    elif criterion == "l2":
        base = "l2"
    rows = []
    for dim in dims:
        per_index = _per_index(groups.index.const_value(dim.tensor), dim.axis, base)
        require_finite(per_index, f"input model: weight '{dim.tensor}'", InputModelError, f"axis-{dim.axis} index")
        per_channel = group.per_channel_sum(dim, per_index)
        if base == "l2":
            per_channel = np.sqrt(per_channel)
        mean = per_channel.mean()
        rows.append(per_channel / mean if mean > 0 else per_channel)
    if not rows:
        return np.zeros(group.size), "group has no weights to score"
    stacked = np.stack(rows)
    reduce = {"mean": np.mean, "sum": np.sum, "max": np.max}[reduction]
    scores = reduce(stacked, axis=0)
    if criterion == "act":
        acts = [group.per_channel_mean(d, activation[d]) for d in group.dims if d in activation]
        acts = [a / a.mean() for a in acts if a.mean() > 0]
        if acts:
            scores = scores * np.mean(acts, axis=0)
        else:
            note = "no activation statistics for this group: scored by l1"
    require_finite(scores, f"group '{group.name}': {criterion} score",
                   DataError if criterion == "act" else InputModelError, "channel")
    return scores, note
