"""Builds the groups of coupled channels of a graph from the per-op rules.

Every axis that can carry channels ("dim") gets one *atom* per index. Starting from the output channels of every
Conv/ConvTranspose/Gemm/MatMul, rules link atoms of neighbouring dims; connected atoms form one removable channel.
Channels touching the same set of dims form a group (e.g. all output channels of one conv and the next conv's input
columns; or, through residual adds, a whole ResNet stage). A channel touching a dim that was blocked (graph input or
output, an op without a rule, a subgraph, an unsupported pattern) is frozen, and the group records why.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.channels import Block, Dim, Link, lookup
from onnxprune.graph.index import GraphIndex, node_label

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ChannelGroup:
    """Channels that must be removed together, and where each one lives.

    Attributes:
        id: position in :attr:`GroupSet.groups`.
        dims: every (tensor, axis) the group touches.
        channels: one entry per removable channel: the indices it occupies in each dim.
        producers: labels of the nodes whose output channels belong to the group.
        blocked: why the group cannot be pruned (empty when it can).
    """

    id: int
    dims: list[Dim]
    channels: list[dict[Dim, np.ndarray]]
    producers: list[str]
    blocked: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def name(self) -> str:
        shown = ", ".join(self.producers[:3]) + (f" +{len(self.producers) - 3}" if len(self.producers) > 3 else "")
        return shown or self.dims[0].tensor


@dataclass
class GroupSet:
    index: GraphIndex
    groups: list[ChannelGroup]
    dim_sizes: dict[Dim, int]

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


class _Builder:
    """Breadth-first walk over dims, collecting atom links and blocked dims."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.offsets: dict[Dim, int] = {}
        self.sizes: dict[Dim, int] = {}
        self.total = 0
        self.pairs_a: list[np.ndarray] = []
        self.pairs_b: list[np.ndarray] = []
        self.blocked: dict[Dim, str] = {}
        self.queue: deque[Dim] = deque()
        self.done: set[tuple] = set()

    def tracked(self, dim: Dim) -> bool:
        return dim in self.offsets

    def track(self, dim: Dim, size: int | None = None) -> bool:
        if dim in self.offsets:
            return True
        size = size if size is not None else self.index.size(dim.tensor, dim.axis)
        if size is None or size <= 0:
            return False
        self.offsets[dim] = self.total
        self.sizes[dim] = int(size)
        self.total += int(size)
        self.queue.append(dim)
        return True

    def block(self, dim: Dim, reason: str) -> None:
        self.blocked.setdefault(dim, reason)

    def link(self, link: Link, node: onnx.NodeProto) -> None:
        for d in (link.a, link.b):
            if not self.track(d):
                other = link.b if d == link.a else link.a
                self.block(other, f"{node_label(node)}: size of {d.tensor} axis {d.axis} unknown")
                return
        a_idx = np.arange(self.sizes[link.a]) if link.a_idx is None else np.asarray(link.a_idx, dtype=np.int64)
        b_idx = np.arange(self.sizes[link.b]) if link.b_idx is None else np.asarray(link.b_idx, dtype=np.int64)
        if a_idx.shape != b_idx.shape or (a_idx.size and (a_idx.max() >= self.sizes[link.a]
                                                          or b_idx.max() >= self.sizes[link.b])):
            self.block(link.a, f"{node_label(node)}: inconsistent channel counts")
            self.block(link.b, f"{node_label(node)}: inconsistent channel counts")
            return
        self.pairs_a.append(a_idx + self.offsets[link.a])
        self.pairs_b.append(b_idx + self.offsets[link.b])

    def visit(self, dim: Dim) -> None:
        index = self.index
        name = dim.tensor
        if name in index.graph_outputs:
            self.block(dim, f"reaches graph output '{name}'")
        if name in index.graph_inputs:
            self.block(dim, f"reaches graph input '{name}'")
        if name in index.subgraph_users:
            self.block(dim, f"used inside a subgraph of {node_label(index.subgraph_users[name])}")
        uses = [u.node for u in index.consumers_of(name)]
        producer = index.producer.get(name)
        if producer is not None and producer.node.op_type != "Constant":
            uses.append(producer.node)
        for node in uses:
            key = (tuple(node.output), tuple(node.input), dim)
            if key in self.done:
                continue
            self.done.add(key)
            rule = lookup(node)
            if rule is None:
                self.block(dim, f"{node_label(node)}: op {node.op_type or '?'}"
                                f"{'(' + node.domain + ')' if node.domain else ''} has no channel rule")
                continue
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                self.block(dim, f"{node_label(node)}: has a subgraph")
                continue
            result = rule.couple(node, dim, self)
            if isinstance(result, Block):
                self.block(dim, f"{node_label(node)}: {result.reason}")
                continue
            for link in result:
                self.link(link, node)


def seed_dims(index: GraphIndex) -> list[tuple[Dim, onnx.NodeProto]]:
    """Output-channel dims of every weighted layer: where groups start."""
    seeds = []
    for node in index.graph.node:
        if node.op_type not in PRODUCERS or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        y = node.output[0]
        rank = index.rank(y)
        if rank is None or rank < 2:
            continue
        axis = 1 if node.op_type in ("Conv", "ConvTranspose", "Gemm") else rank - 1
        if node.op_type == "MatMul" and not index.is_constant(node.input[1]):
            continue
        seeds.append((Dim(y, axis), node))
    return seeds


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest atom id) of each of ``n`` atoms, given undirected edges a-b."""
    labels = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return labels
    while True:
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return labels
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:  # pointer jumping until every atom points at a root
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt


def build_groups(index: GraphIndex) -> GroupSet:
    """Find every group of coupled channels in ``index``'s graph.

    Returns:
        The groups, prunable or not; frozen groups say why in ``blocked``.
    """
    builder = _Builder(index)
    seeds = seed_dims(index)
    seed_owner: dict[Dim, str] = {}
    for dim, node in seeds:
        if index.size(dim.tensor, dim.axis) not in (None, 0, 1):
            builder.track(dim)
            seed_owner[dim] = node_label(node)
    while builder.queue:
        builder.visit(builder.queue.popleft())
    a = np.concatenate(builder.pairs_a) if builder.pairs_a else np.zeros(0, np.int64)
    b = np.concatenate(builder.pairs_b) if builder.pairs_b else np.zeros(0, np.int64)
    labels = _components(builder.total, a, b)
    return GroupSet(index, _assemble(builder, labels, seed_owner), dict(builder.sizes))


def _assemble(builder: _Builder, labels: np.ndarray, seed_owner: dict[Dim, str]) -> list[ChannelGroup]:
    dims = list(builder.offsets)
    touch: dict[int, list[int]] = {}
    frozen: dict[int, set[str]] = {}
    for di, dim in enumerate(dims):
        start = builder.offsets[dim]
        for label in np.unique(labels[start : start + builder.sizes[dim]]).tolist():
            touch.setdefault(label, []).append(di)
            if dim in builder.blocked:
                frozen.setdefault(label, set()).add(builder.blocked[dim])
    by_signature: dict[tuple[int, ...], list[int]] = {}
    for label, members in touch.items():
        by_signature.setdefault(tuple(members), []).append(label)
    groups = []
    for signature, comp_labels in by_signature.items():
        member_dims = [dims[i] for i in signature]
        first = member_dims[0]
        start = builder.offsets[first]
        first_labels = labels[start : start + builder.sizes[first]]
        order = sorted(comp_labels, key=lambda lab: int(np.argmax(first_labels == lab)))
        channels = []
        label_pos = {lab: k for k, lab in enumerate(order)}
        per_dim = {}
        for dim in member_dims:
            s = builder.offsets[dim]
            dim_labels = labels[s : s + builder.sizes[dim]]
            per_dim[dim] = dim_labels
        channels = [{} for _ in order]
        for dim, dim_labels in per_dim.items():
            for idx, lab in enumerate(dim_labels.tolist()):
                k = label_pos.get(lab)
                if k is not None:
                    channels[k].setdefault(dim, []).append(idx)
        channels = [{d: np.asarray(v, dtype=np.int64) for d, v in ch.items()} for ch in channels]
        reasons = sorted(set().union(*(frozen.get(lab, set()) for lab in comp_labels)))
        producers = [seed_owner[d] for d in member_dims if d in seed_owner]
        if not producers:
            continue  # channels that no weighted layer produces (only reached through other dims)
        groups.append(ChannelGroup(len(groups), member_dims, channels, producers, reasons))
    return groups
