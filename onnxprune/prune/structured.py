"""Structured channel removal: choose channels per group, then shrink every member tensor and fix attributes.

Applying a removal is generic: each member dim that is a constant (initializer or Constant node) is sliced by the
kept indices; op rules with a ``fix`` step then update what depends on channel counts (Conv ``group``, Split sizes,
Reshape targets, Slice bounds, Resize sizes). Activation shapes are dropped from ``value_info`` and re-inferred.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.channels import Dim, lookup
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import ConfigError
from onnxprune.graph.index import GraphIndex
from onnxprune.importance.scoring import channel_scores, weight_uses
from onnxprune.graph.stats import node_macs


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


def _matches(group: ChannelGroup, pattern: str) -> bool:
    names = list(group.producers) + [d.tensor for d in group.dims]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def plan_channels(groups: GroupSet, ratio: float, scope: str = "layer", criterion: str = "l1",
                  reduction: str = "mean", round_to: int = 1, exclude: tuple[str, ...] = (),
                  layer_ratios: tuple[tuple[str, float], ...] = (), max_group_ratio: float | None = None,
                  activation: dict | None = None, given_scores: dict[int, np.ndarray] | None = None) -> ChannelPlan:
    """Pick the channels to remove from every prunable group.

    Args:
        ratio: fraction of each group's channels to remove (layer scope) or of all channels (global scope).
        scope: "layer" (each group loses ``ratio``) or "global" (one ranking of normalised scores; no group loses
            more than ``max_group_ratio``, default min(0.9, 2*ratio)).
        round_to: kept counts are rounded to multiples of this (1 = exact).
        exclude: glob patterns of node or tensor names whose groups stay whole.
        layer_ratios: (glob, ratio) overrides; the first matching pattern wins.
        given_scores: per group id, channel scores computed elsewhere (``--criterion recon``); other groups are
            scored by l1.
    """
    if not 0 <= ratio < 1:
        raise ConfigError(f"channel ratio must be in [0, 1), got {ratio}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got '{scope}'")
    if round_to < 1:
        raise ConfigError(f"--round-to must be a positive integer, got {round_to}")
    plan = ChannelPlan()
    candidates: list[tuple[ChannelGroup, float, np.ndarray]] = []
    for group in groups.prunable():
        if any(_matches(group, p) for p in exclude):
            plan.notes[group.id] = "excluded by --exclude"
            continue
        group_ratio = next((r for p, r in layer_ratios if _matches(group, p)), ratio)
        if criterion == "recon":
            if given_scores is not None and group.id in given_scores:
                scores, note = given_scores[group.id], None
            else:
                scores, note = channel_scores(groups, group, "l1", reduction)
                note = "no layer reads this group's channels as input: scored by l1"
        else:
            scores, note = channel_scores(groups, group, criterion, reduction, activation)
        if note:
            plan.notes[group.id] = note
        candidates.append((group, group_ratio, scores))
    if scope == "layer":
        targets = {g.id: g.size * (1 - r) if r > 0 else float(g.size) for g, r, _ in candidates}
        keeps = _budgeted_rounding(groups, [g for g, _, _ in candidates], targets, round_to)
        for group, _, scores in candidates:
            _take_lowest(plan, group, scores, group.size - keeps[group.id])
        _note_rounding(plan, [g for g, _, _ in candidates], targets, keeps, round_to)
        return plan
    cap = max_group_ratio if max_group_ratio is not None else min(0.9, 2 * ratio)
    pool = [(s / (np.mean(scores) or 1.0), g.id, k) for g, _, scores in candidates for k, s in enumerate(scores)]
    pool.sort()
    budget = int(round(ratio * sum(g.size for g, _, _ in candidates)))
    chosen: dict[int, int] = {}
    limit = {g.id: g.size - max(1, math.ceil(g.size * (1 - cap))) for g, _, _ in candidates}
    for _, gid, _ in pool:
        if budget <= 0:
            break
        if chosen.get(gid, 0) < limit[gid]:
            chosen[gid] = chosen.get(gid, 0) + 1
            budget -= 1
    targets = {g.id: float(g.size - chosen.get(g.id, 0)) for g, _, _ in candidates}
    keeps = _budgeted_rounding(groups, [g for g, _, _ in candidates], targets, round_to)
    for group, _, scores in candidates:
        _take_lowest(plan, group, scores, group.size - keeps[group.id])
    _note_rounding(plan, [g for g, _, _ in candidates], targets, keeps, round_to)
    return plan


def _note_rounding(plan: ChannelPlan, chosen: list[ChannelGroup], targets: dict[int, float],
                   keeps: dict[int, int], round_to: int) -> None:
    """Say why a group asked to shrink kept all its channels."""
    for g in chosen:
        if keeps[g.id] == g.size and targets[g.id] < g.size and g.id not in plan.notes:
            plan.notes[g.id] = (f"kept whole: {g.size} channels cannot drop to a multiple of {round_to} near the "
                                f"target {targets[g.id]:.1f} (--round-to 1 or a smaller block prunes it)")


def channel_costs(groups: GroupSet, group: ChannelGroup) -> float:
    """MACs that one channel of ``group`` costs: for every weighted layer it touches, the layer's MACs divided by
    the size of the weight axis the group runs along (0 where shapes are unknown)."""
    macs = ((dim, node_macs(groups.index, node)) for dim, node in weight_uses(groups, group))
    return sum(m / groups.dim_sizes[dim] for dim, m in macs if m)


def _budgeted_rounding(groups: GroupSet, chosen: list[ChannelGroup], targets: dict[int, float],
                       round_to: int) -> dict[int, int]:
    """Round every group's kept count to an allowed value near its target, then move groups one allowed step down
    (or back up) so that the estimated MACs stay at most, and as close as possible to, what exact (unrounded)
    pruning would keep. Gentlest moves first: the group whose step is the smallest share of its size."""
    options = {g.id: allowed_keeps(g.size, round_to) for g in chosen}
    keeps = {g.id: round_keep(g.size, targets[g.id], round_to) if targets[g.id] < g.size else g.size for g in chosen}
    if round_to <= 1:
        return keeps
    costs = {g.id: channel_costs(groups, g) for g in chosen}
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


class _Editor:
    """Rewrites constant inputs of nodes, copying a constant first when other nodes share it."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.names = {t.name for t in index.graph.initializer} | {o for n in index.graph.node for o in n.output}
        self.names |= {i.name for i in index.graph.input}

    def _fresh(self, base: str) -> str:
        k = 0
        while f"{base}_pruned{k}" in self.names:
            k += 1
        self.names.add(f"{base}_pruned{k}")
        return f"{base}_pruned{k}"

    def set_input_value(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        idx = self.index
        name = node.input[index] if index < len(node.input) else ""
        shared = name and len(idx.consumers_of(name)) > 1
        if name and not shared and name in idx.initializers:
            idx.model.replace(idx.initializers[name], value)
        elif name and not shared and name in idx.constant_nodes:
            const = idx.constant_nodes[name]
            del const.attribute[:]
            const.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(value)))
        else:
            new = self._fresh(name or f"{node.name or node.op_type}_input{index}")
            idx.graph.initializer.append(onnx.numpy_helper.from_array(value, new))
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = new
            return
        idx.forget_value(name)


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
    _slice_constants(index, kept)
    editor = _Editor(index)

    def kept_of(dim: Dim) -> np.ndarray | None:
        return kept.get(dim)

    changed_tensors = {d.tensor for d in kept}
    for node in list(index.graph.node):
        rule = lookup(node)
        if rule is not None and rule.fix is not None and changed_tensors.intersection(list(node.input) + list(node.output)):
            rule.fix(node, index, kept_of, editor)
    _refresh_value_info(index, changed_tensors)
    _drop_unused_initializers(index)
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
        tensor = index.const_tensor(name)
        if tensor is None:  # Constant node with value_floats etc.: store as a tensor attribute
            node = index.constant_nodes[name]
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(value, name)))
        else:
            index.model.replace(tensor, value)
        index.forget_value(name)
        for declared in index.graph.input:  # IR < 4 models also declare initializers as graph inputs
            if declared.name == name and declared.type.tensor_type.HasField("shape"):
                dims = declared.type.tensor_type.shape.dim
                for d, size in zip(dims, value.shape):
                    d.Clear()
                    d.dim_value = int(size)


def _refresh_value_info(index: GraphIndex, changed: set[str]) -> None:
    keep = [vi for vi in index.graph.value_info if vi.name not in changed]
    del index.graph.value_info[:]
    index.graph.value_info.extend(keep)


def _drop_unused_initializers(index: GraphIndex) -> None:
    used = {name for node in index.graph.node for name in node.input}
    used |= {o.name for o in index.graph.output}
    for node in index.graph.node:
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return  # subgraphs may read outer initializers by name: leave everything in place
    keep = [t for t in index.graph.initializer if t.name in used]
    if len(keep) != len(index.graph.initializer):
        del index.graph.initializer[:]
        index.graph.initializer.extend(keep)
        graph_inputs = [i for i in index.graph.input if i.name in used or i.name not in index.initializers]
        del index.graph.input[:]
        index.graph.input.extend(graph_inputs)
