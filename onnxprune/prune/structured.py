"""Structured channel removal: choose channels per group, then shrink every member tensor and fix attributes.

Applying a removal is generic: op rules with a ``fix`` step update what depends on channel counts (Conv ``group``,
Split sizes, Reshape targets, Slice bounds, Resize sizes), reading the graph as it was; then each member dim that is
a constant (initializer or Constant node) is sliced by the kept indices. Every edit goes through the GraphIndex, which
afterwards describes the pruned model; ``value_info`` entries of changed tensors are dropped for onnx to re-infer.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from onnxprune.channels import Dim, lookup
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import ConfigError
from onnxprune.graph.index import GraphIndex
from onnxprune.importance import ChannelScorer, channel_scorer
from onnxprune.importance.scoring import weight_dims, weight_uses
from onnxprune.graph.layers import node_macs


@dataclass
class ChannelPlan:
    """Which channels of which group go, and why others stay."""

    remove: dict[int, np.ndarray] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)


def cpu_block() -> int:
    """ORT's NCHWc block on this CPU: 16 with AVX-512, else 8 (see shared ORT notes)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            return 16 if "avx512f" in handle.read() else 8
    except OSError:
        return 8


def allowed_keeps(n: int, multiple: int) -> list[int]:
    """Kept counts a group of ``n`` channels may have: multiples of ``multiple`` (never fewer than one block), or
    all ``n``. onnxruntime's NCHWc kernels pad other counts to the block, and counts between blocks measured slower
    than the block above them, so nothing in between is allowed."""
    if multiple <= 1:
        return list(range(1, n + 1))
    return sorted(set(range(multiple, n + 1, multiple)) | {n})


def round_keep(n: int, target: float, multiple: int) -> int:
    """The allowed kept count nearest to ``target`` (ties: the smaller one)."""
    options = allowed_keeps(n, multiple)
    return min(options, key=lambda k: (abs(k - target), k))


def matches(group: ChannelGroup, pattern: str) -> bool:
    names = list(group.producers) + [d.tensor for d in group.dims]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def plan_channels(groups: GroupSet, ratio: float, scope: str = "layer", criterion: str | ChannelScorer = "l1",
                  reduction: str = "mean", round_to: int = 1, exclude: tuple[str, ...] = (),
                  layer_ratios: tuple[tuple[str, float], ...] = (),
                  max_group_ratio: float | None = None) -> ChannelPlan:
    """Pick the channels to remove from every prunable group.

    Args:
        ratio: fraction of each group's channels to remove (layer scope) or of all channels (global scope).
        scope: "layer" (each group loses ``ratio``) or "global" (one ranking of normalised scores; no group loses
            more than ``max_group_ratio``, default min(0.9, 2*ratio)).
        criterion: a registered criterion's name (one that needs no calibration data; ``auto`` is l1 here), or a
            scorer from ``importance.channel_scorer`` (any criterion, with its data); it is called once, on the
            groups that may lose channels.
        reduction: how a named criterion combines a channel's scores over the group's members.
        round_to: kept counts are rounded to multiples of this (1 = exact).
        exclude: glob patterns of node or tensor names whose groups stay whole.
        layer_ratios: (glob, ratio) overrides; the first matching pattern wins.
    """
    if not 0 <= ratio < 1:
        raise ConfigError(f"channel ratio must be in [0, 1), got {ratio}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got '{scope}'")
    if round_to < 1:
        raise ConfigError(f"--round-to must be a positive integer, got {round_to}")
    score = channel_scorer(criterion, groups, reduction) if isinstance(criterion, str) else criterion
    plan = ChannelPlan()
    chosen: list[ChannelGroup] = []
    for group in groups.prunable():
        if any(matches(group, p) for p in exclude):
            plan.notes[group.id] = "excluded by --exclude"
        else:
            chosen.append(group)
    scored = score(chosen) if chosen else {}
    candidates: list[tuple[ChannelGroup, float, np.ndarray]] = []
    for group in chosen:
        scores, note = scored[group.id]
        if note:
            plan.notes[group.id] = note
        group_ratio = next((r for p, r in layer_ratios if matches(group, p)), ratio)
        candidates.append((group, group_ratio, scores))
    if scope == "layer":
        targets = {g.id: g.size * (1 - r) if r > 0 else float(g.size) for g, r, _ in candidates}
    else:
        targets = _global_targets(candidates, ratio, max_group_ratio,
                                  {g.id: channel_units(groups, g) for g, _, _ in candidates})
    multiples = {g.id: group_multiple(groups, g, round_to) for g in chosen}
    keeps = _budgeted_rounding(groups, chosen, targets, multiples)
    for group, _, scores in candidates:
        _take_lowest(plan, group, scores, group.size - keeps[group.id])
    _note_rounding(plan, chosen, targets, keeps, multiples)
    for g in chosen:
        units = channel_units(groups, g)
        if units > 1 and round_to > 1 and g.id not in plan.notes:
            plan.notes[g.id] = (f"units of {units} columns each (heads, split slices): kept in multiples of "
                                f"{group_multiple(groups, g, round_to)} for --round-to {round_to}")
    return plan


def _global_targets(candidates: list[tuple[ChannelGroup, float, np.ndarray]], ratio: float,
                    max_group_ratio: float | None, units: dict[int, int]) -> dict[int, float]:
    """Kept counts from one ranking of every channel's score over its group's mean score: the lowest ``ratio`` of
    all weight rows/columns go, no group losing more than the cap. A channel counts for the ``units`` it owns (a
    head for its D columns), so a head is not as cheap to take as one FFN neuron."""
    cap = max_group_ratio if max_group_ratio is not None else min(0.9, 2 * ratio)
    pool = [(s / (np.mean(scores) or 1.0), g.id, k) for g, _, scores in candidates for k, s in enumerate(scores)]
    pool.sort()
    budget = ratio * sum(g.size * units[g.id] for g, _, _ in candidates)
    removed: dict[int, int] = {}
    limit = {g.id: g.size - max(1, math.ceil(g.size * (1 - cap))) for g, _, _ in candidates}
    for _, gid, _ in pool:
        if budget < 0.5:
            break
        if removed.get(gid, 0) < limit[gid] and units[gid] <= 2 * budget:
            removed[gid] = removed.get(gid, 0) + 1
            budget -= units[gid]
    return {g.id: float(g.size - removed.get(g.id, 0)) for g, _, _ in candidates}


def _note_rounding(plan: ChannelPlan, chosen: list[ChannelGroup], targets: dict[int, float],
                   keeps: dict[int, int], multiple: dict[int, int]) -> None:
    """Say why a group asked to shrink kept all its channels."""
    for g in chosen:
        if keeps[g.id] == g.size and targets[g.id] < g.size and g.id not in plan.notes:
            plan.notes[g.id] = (f"kept whole: {g.size} channels cannot drop to a multiple of {multiple[g.id]} near the "
                                f"target {targets[g.id]:.1f} (--round-to 1 or a smaller block prunes it)")


def channel_units(groups: GroupSet, group: ChannelGroup) -> int:
    """Weight rows or columns one channel of ``group`` owns in its narrowest weighted layer: 1 for a conv or FFN
    channel, the head dim D for an attention head (its q, k, v columns and output-projection rows)."""
    counts = [np.bincount(group.members[dim][1], minlength=group.size) for dim in weight_dims(groups, group)]
    counts = [c for c in counts if c.min() == c.max() and c[0] > 0]
    return int(min(c[0] for c in counts)) if counts else 1


def group_multiple(groups: GroupSet, group: ChannelGroup, round_to: int) -> int:
    """The kept-channel multiple of a group, so that every weight it touches keeps a multiple of ``round_to`` rows or
    columns (onnxruntime's kernels work in blocks of them): ``round_to`` for a conv or FFN channel; for a channel
    owning D columns of every weight (an attention head), round_to / gcd(round_to, D): 1 when D is a multiple of the
    block already (64 in BERT), so a head is then its own unit."""
    return round_to // math.gcd(round_to, channel_units(groups, group))


def activation_matmuls(index: GraphIndex) -> list:
    """MatMuls of two activations (attention's scores and context): MACs that shrink with heads, not weights."""
    return [n for n in index.graph.node if n.op_type == "MatMul" and not any(index.is_constant(i) for i in n.input)]


def channel_costs(groups: GroupSet, group: ChannelGroup, matmuls: list | None = None) -> float:
    """MACs that one channel of ``group`` costs (0 where shapes are unknown): for every weighted layer it touches,
    the layer's MACs times the share of the weight axis the channel owns (one index of a conv's; D of a q
    projection's for a head), and for a MatMul of two activations (attention's scores and context) the share of
    the largest axis the group runs along."""
    index = groups.index
    share = {dim: len(group.members[dim][0]) / groups.dim_sizes[dim] / group.size for dim in group.dims}
    costs = [(share[dim], node_macs(index, node)) for dim, node in weight_uses(groups, group)]
    for node in activation_matmuls(index) if matmuls is None else matmuls:
        touched = [s for dim, s in share.items() if dim.tensor in (*node.input, node.output[0])]
        if touched:
            costs.append((max(touched), node_macs(index, node)))
    return sum(s * m for s, m in costs if m)


def _budgeted_rounding(groups: GroupSet, chosen: list[ChannelGroup], targets: dict[int, float],
                       multiple: dict[int, int]) -> dict[int, int]:
    """Round every group's kept count to an allowed value near its target, then move groups one allowed step down
    (or back up) so that the estimated MACs stay at most, and as close as possible to, what exact (unrounded)
    pruning would keep. Gentlest moves first: the group whose step is the smallest share of its size. ``multiple``:
    per group, the kept-count multiple (:func:`group_multiple`)."""
    options = {g.id: allowed_keeps(g.size, multiple[g.id]) for g in chosen}
    keeps = {g.id: round_keep(g.size, targets[g.id], multiple[g.id]) if targets[g.id] < g.size else g.size
             for g in chosen}
    if all(m <= 1 for m in multiple.values()):
        return keeps
    matmuls = activation_matmuls(groups.index)
    costs = {g.id: channel_costs(groups, g, matmuls) for g in chosen}
    excess = sum(costs[g.id] * (keeps[g.id] - targets[g.id]) for g in chosen)

    def step(g: ChannelGroup, direction: int) -> int:
        values = options[g.id]
        pos = values.index(keeps[g.id]) + direction
        return values[pos] - keeps[g.id] if 0 <= pos < len(values) else 0

    def deficit(g: ChannelGroup, keep: int) -> float:
        """How far below its own target a group would be, as a share of the group."""
        return max(0.0, targets[g.id] - keep) / g.size

    while excess > 0:  # too heavy: round the group that suffers least one step further down
        moves = [(deficit(g, keeps[g.id] + step(g, -1)), step(g, -1) * costs[g.id], g.id, g) for g in chosen
                 if step(g, -1) and targets[g.id] < g.size and costs[g.id] > 0]
        if not moves:
            break
        g = min(moves)[-1]
        delta = step(g, -1)
        keeps[g.id] += delta
        excess += costs[g.id] * delta
    while True:  # lighter than asked: give channels back to the most deprived group while within the budget
        moves = [(-deficit(g, keeps[g.id]), g.id, g) for g in chosen  # unknown cost (0): no evidence, no move
                 if step(g, 1) and keeps[g.id] < targets[g.id] and costs[g.id] > 0
                 and excess + costs[g.id] * step(g, 1) <= 0]
        if not moves:
            return keeps
        g = min(moves)[-1]
        delta = step(g, 1)
        keeps[g.id] += delta
        excess += costs[g.id] * delta


def _take_lowest(plan: ChannelPlan, group: ChannelGroup, scores: np.ndarray, count: int) -> None:
    count = min(count, group.size - 1)
    if count > 0:
        plan.remove[group.id] = np.sort(np.argsort(scores, kind="stable")[:count])


def apply_plan(groups: GroupSet, plan: ChannelPlan) -> dict[Dim, np.ndarray]:
    """Remove the planned channels from the model in place; returns the kept indices of every changed dim."""
    removed: dict[Dim, list[np.ndarray]] = {}
    for gid, channel_ids in plan.remove.items():
        group = groups.groups[gid]
        if not group.prunable:
            raise ConfigError(f"group {gid} ({group.name}) cannot be pruned: "
                              f"{'; '.join(group.blocked) or 'it has a single channel'}")
        channel_ids = np.unique(np.asarray(channel_ids, dtype=np.int64))
        if channel_ids.size and (channel_ids.min() < 0 or channel_ids.max() >= group.size):
            raise ConfigError(f"group {gid} ({group.name}) has channels 0..{group.size - 1}")
        if channel_ids.size >= group.size:
            raise ConfigError(f"group {gid} ({group.name}) must keep at least one channel")
        for dim in group.dims:
            removed.setdefault(dim, []).append(group.indices_of(dim, channel_ids))
    kept = {dim: np.setdiff1d(np.arange(groups.dim_sizes[dim]), np.concatenate(parts))
            for dim, parts in removed.items()}
    index = groups.index
    changed_tensors = {d.tensor for d in kept}
    # fix steps first, so that they read the graph as it was (channel counts of the original model); the index is
    # also the ConstantEditor they write through
    for node in list(index.graph.node):
        rule = lookup(node)
        if rule is not None and rule.fix is not None and changed_tensors.intersection([*node.input, *node.output]):
            rule.fix(node, index, kept.get, index)
    _slice_constants(index, kept)
    _resize_tensors(index, kept)
    index.drop_value_info(changed_tensors)
    index.drop_unused_initializers()
    return kept


def _slice_constants(index: GraphIndex, kept: dict[Dim, np.ndarray]) -> None:
    per_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for dim, idx in kept.items():
        if index.is_constant(dim.tensor):
            per_tensor.setdefault(dim.tensor, []).append((dim.axis, idx))
    for name, cuts in per_tensor.items():
        value = index.const_value(name)
        for axis, idx in cuts:
            value = np.take(value, idx, axis=axis)
        index.set_constant(name, value)


def _resize_tensors(index: GraphIndex, kept: dict[Dim, np.ndarray]) -> None:
    """Record the new channel counts of run-time tensors, so the index's shapes describe the pruned model."""
    for dim, idx in kept.items():
        if not index.is_constant(dim.tensor):
            index.set_size(dim.tensor, dim.axis, len(idx))
