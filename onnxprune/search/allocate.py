"""Which group loses how many channels: a greedy knapsack over measured losses and a cost function.

Each group offers a few levels (channels removed, ascending from 0) with the loss measured at each. Starting from
``start``, the allocation repeatedly takes the move (a group to any deeper level) with the least loss per unit of
cost saved, until the cost is within the goal; then it hands back, one level at a time, whatever the goal does not
need, most loss first. Looking at every deeper level, not only the next one, keeps a group whose first step is
costly but whose second is cheap from being passed over (losses are not convex). Pure: no model, no onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TIE = 1e-12  # a move with no measured loss still has a price, so that cheaper-to-lose groups go first


@dataclass(frozen=True)
class Levels:
    """A group's choices: ``removed[k]`` channels at measured loss ``loss[k]``; ``removed[0]`` is the start."""

    gid: int
    removed: tuple[int, ...]
    loss: tuple[float, ...]

    def monotone(self) -> tuple[float, ...]:
        """Losses made non-decreasing: removing more never counts as better (measurement noise)."""
        out, top = [], 0.0
        for value in self.loss:
            top = max(top, value)
            out.append(top)
        return tuple(out)


@dataclass
class Allocation:
    removed: dict[int, int]  # channels removed per group id (groups at level 0 included)
    cost: float
    loss: float
    reached: bool


def allocate(levels: list[Levels], cost: Callable[[dict[int, int]], float], goal: float,
             fixed: dict[int, int] | None = None) -> Allocation:
    """Removals per group whose ``cost`` is at most ``goal``, at the least summed loss the greedy finds.

    Args:
        cost: cost of an allocation (channels removed per group id; ids not given remove nothing).
        fixed: removals decided elsewhere (``--layer-channels``), counted in the cost and never changed.
    """
    loss = {lv.gid: lv.monotone() for lv in levels}
    at = {lv.gid: 0 for lv in levels}
    by_id = {lv.gid: lv for lv in levels}

    def removal(gid: int | None = None, level: int = 0) -> dict[int, int]:
        out = dict(fixed or {})
        out.update({g: by_id[g].removed[k] for g, k in at.items()})
        if gid is not None:
            out[gid] = by_id[gid].removed[level]
        return out

    current = cost(removal())
    while current > goal:
        best = None
        for lv in levels:
            here = at[lv.gid]
            for level in range(here + 1, len(lv.removed)):
                after = cost(removal(lv.gid, level))
                saved = current - after
                if saved <= 0:
                    continue
                price = (loss[lv.gid][level] - loss[lv.gid][here] + TIE) / saved
                if best is None or price < best[0]:
                    best = (price, lv.gid, level, after)
        if best is None:
            break
        _, gid, level, current = best
        at[gid] = level
    reached = current <= goal
    while reached:  # hand back what the goal does not need: the level whose return saves the most loss
        back = None
        for lv in levels:
            here = at[lv.gid]
            if here == 0:
                continue
            after = cost(removal(lv.gid, here - 1))
            gain = loss[lv.gid][here] - loss[lv.gid][here - 1]
            if after <= goal and (back is None or gain > back[0]):
                back = (gain, lv.gid, after)
        if back is None:
            break
        _, gid, current = back
        at[gid] -= 1
    total_loss = sum(loss[g][k] for g, k in at.items())
    return Allocation(removal(), current, total_loss, reached)
