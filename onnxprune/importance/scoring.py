"""What channel criteria share: which weights a group's channels own, and the per-member magnitude score.

A channel's magnitude score aggregates every weight slice it owns: producer rows, consumer columns (or, for
``bn-scale``, the BatchNormalization scale). Each member's scores are divided by their mean first, so one large
layer does not drown the others, then reduced over members (mean, sum or max). A NaN or inf weight is an error
naming it: its channel's score would be NaN, and a NaN score compares neither higher nor lower, so channels would be
chosen by position.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import Dim
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.channels.qdq import dequantized_value, dequantizing_use
from onnxprune.errors import ConfigError, InputModelError
from onnxprune.finite import require_finite
from onnxprune.graph.layers import is_weighted

REDUCE = {"mean": np.mean, "sum": np.sum, "max": np.max}
REDUCTIONS = tuple(REDUCE)
NO_WEIGHTS = "group has no weights to score"


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCE:
        raise ConfigError(f"unknown group reduction '{reduction}' (choose from {', '.join(REDUCTIONS)})")


def weight_uses(groups: GroupSet, group: ChannelGroup) -> list[tuple[Dim, onnx.NodeProto]]:
    """(member dim, layer) for every constant member that is an operand of a weighted layer (either operand), directly
    or through a DequantizeLinear (an already-quantized model's integer weight)."""
    index = groups.index
    found = []
    for dim in group.dims:
        if not index.is_constant(dim.tensor):
            continue
        dq = dequantizing_use(index, dim.tensor)
        feeds = dq.output[0] if dq is not None else dim.tensor
        found += [(dim, use.node) for use in index.consumers_of(feeds) if is_weighted(use.node) and use.index in (0, 1)]
    return found


def weight_value(index, name: str) -> np.ndarray:
    """A weight's values as the layer computes with them: dequantized when a DequantizeLinear reads it (an int8
    weight's per-channel scale is part of its magnitude)."""
    dq = dequantizing_use(index, name)
    return index.const_value(name) if dq is None else dequantized_value(index, dq)


def weight_dims(groups: GroupSet, group: ChannelGroup) -> list[Dim]:
    """Member dims that are weights of Conv/ConvTranspose/Gemm/MatMul (each listed once)."""
    return list(dict.fromkeys(dim for dim, _ in weight_uses(groups, group)))


def _per_index(values: np.ndarray, axis: int, p: int) -> np.ndarray:
    """Per index along ``axis``: sum of |w| (p = 1) or of w^2 (p = 2), accumulated in float64 without a float64
    copy."""
    values = np.asarray(values)
    other = tuple(a for a in range(values.ndim) if a != axis)
    if p == 1:
        return np.abs(values).sum(axis=other, dtype=np.float64)
    return np.square(values).sum(axis=other, dtype=np.float64)


def magnitude_scores(groups: GroupSet, group: ChannelGroup, dims: list[Dim], p: int,
                     reduction: str) -> tuple[np.ndarray, str | None]:
    """Per channel of ``group``: the Lp norm (p = 1 or 2) of its slice of every member in ``dims``, each member
    divided by its mean, reduced over members by ``reduction``. Zeros and a note when ``dims`` is empty."""
    rows = []
    for dim in dims:
        per_index = _per_index(weight_value(groups.index, dim.tensor), dim.axis, p)
        require_finite(per_index, f"input model: weight '{dim.tensor}'", InputModelError, f"axis-{dim.axis} index")
        per_channel = group.per_channel_sum(dim, per_index)
        if p == 2:
            per_channel = np.sqrt(per_channel)
        mean = per_channel.mean()
        rows.append(per_channel / mean if mean > 0 else per_channel)
    if not rows:
        return np.zeros(group.size), NO_WEIGHTS
    return REDUCE[reduction](np.stack(rows), axis=0), None


def l1_scores(groups: GroupSet, group: ChannelGroup, reduction: str) -> tuple[np.ndarray, str | None]:
    """The l1 score of every channel over the group's weights: the base and the fall-back of other criteria."""
    return magnitude_scores(groups, group, weight_dims(groups, group), 1, reduction)
