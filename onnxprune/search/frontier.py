"""The budget/loss frontier estimated from single-group measurements.

Why an estimate: sensitivity prunes one group at a time, so the loss of pruning several together is not measured.
Summing single-group losses is the usual first-order model (NNI's sensitivity pruner, SparseML's loss sensitivity);
it shows which groups to prune first for a budget and how steep the curve is, and the budget search measures the
real combination afterwards. MACs are not summed: a layer between two groups loses input AND output channels, so its
MACs scale by the product of both kept fractions (:class:`Layer`), which single-group savings would count twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layer:
    """One weighted layer: its MACs scale linearly with the kept share of each weight axis that carries groups.

    ``axes``: per such axis, (its size, ((group id, indices of the axis that group owns), ...)); several groups share
    an axis after a Concat."""

    name: str
    macs: float
    axes: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]

    def kept(self, removed: dict[int, float]) -> float:
        """MACs left when each group loses the fraction ``removed[group]`` of its channels."""
        return self.macs * math.prod(1 - sum(removed.get(g, 0.0) * n for g, n in owners) / size
                                     for size, owners in self.axes)


def macs_kept(layers: list[Layer], total: float, removed: dict[int, float]) -> float:
    """The model's MACs after / before, when only ``layers`` change (every other layer keeps its MACs)."""
    if not total:
        return 1.0
    return 1 - sum(layer.macs - layer.kept(removed) for layer in layers) / total


@dataclass(frozen=True)
class Option:
    """Pruning one group at one ratio, measured alone: the fraction of its channels removed and the loss."""

    group: int
    ratio: float
    removed: float
    loss: float


@dataclass
class Point:
    macs_kept: float  # estimated with the layer model (see the module)
    loss: float  # estimated: the sum of the chosen options' losses
    ratios: dict[int, float] = field(default_factory=dict)  # group -> chosen ratio (groups left whole are absent)


def greedy_frontier(options: list[Option], layers: list[Layer], total: float) -> list[Point]:
    """Start from the unpruned model and repeatedly take the move with the least added loss per MAC saved (a group
    to any higher ratio of its own) until no move saves more. Returns every point on the way, first (1.0, 0.0)."""
    by_group: dict[int, list[Option]] = {}
    for option in options:
        by_group.setdefault(option.group, []).append(option)
    chosen: dict[int, Option] = {}
    points = [Point(1.0, 0.0)]
    while True:
        now = macs_kept(layers, total, {g: o.removed for g, o in chosen.items()})
        moves = []
        for group, group_options in by_group.items():
            current = chosen.get(group)
            for option in group_options:
                trial = {g: o.removed for g, o in chosen.items()} | {group: option.removed}
                gain = now - macs_kept(layers, total, trial)
                if gain > 1e-12:
                    moves.append(((option.loss - (current.loss if current else 0.0)) / gain, group, option.ratio,
                                  option))
        if not moves:
            return points
        _, group, _, option = min(moves)
        chosen[group] = option
        points.append(Point(macs_kept(layers, total, {g: o.removed for g, o in chosen.items()}),
                            sum(o.loss for o in chosen.values()), {g: o.ratio for g, o in sorted(chosen.items())}))
