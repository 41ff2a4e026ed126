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
from onnxprune.graph.layers import is_weighted



@dataclass
class ChannelGroup:
    """Channels that must be removed together, and where each one lives.

    Attributes:
        id: position in :attr:`GroupSet.groups`.
        dims: every (tensor, axis) the group touches.
        members: per dim, (indices in that dim, the channel each index belongs to); channels are 0..size-1.
        size: number of removable channels.
        producers: labels of the nodes whose output channels belong to the group.
        blocked: why the group cannot be pruned (empty when it can).
    """

    id: int
    dims: list[Dim]
    members: dict[Dim, tuple[np.ndarray, np.ndarray]]
    size: int
    producers: list[str]
    blocked: list[str] = field(default_factory=list)
    _channels: list[dict[Dim, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def channels(self) -> list[dict[Dim, np.ndarray]]:
        """Per channel, the indices it occupies in each dim (built on first use; the compact form is ``members``)."""
        if self._channels is None:
            channels: list[dict[Dim, np.ndarray]] = [{} for _ in range(self.size)]
            for dim, (idx, owner) in self.members.items():
                order = np.argsort(owner, kind="stable")
                cuts = np.searchsorted(owner[order], np.arange(self.size + 1))
                for k in range(self.size):
                    part = idx[order[cuts[k] : cuts[k + 1]]]
                    if part.size:
                        channels[k][dim] = part
            self._channels = channels
        return self._channels

    def indices_of(self, dim: Dim, channel_ids: np.ndarray) -> np.ndarray:
        """Indices of ``dim`` occupied by the given channels."""
        idx, owner = self.members[dim]
        return idx[np.isin(owner, channel_ids)]

    def per_channel_sum(self, dim: Dim, per_index: np.ndarray) -> np.ndarray:
        """Sum of a per-index quantity of ``dim`` over each channel's indices."""
        idx, owner = self.members[dim]
        return np.bincount(owner, weights=per_index[idx], minlength=self.size)

    def per_channel_mean(self, dim: Dim, per_index: np.ndarray) -> np.ndarray:
        idx, owner = self.members[dim]
        counts = np.bincount(owner, minlength=self.size)
        return self.per_channel_sum(dim, per_index) / np.maximum(counts, 1)

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.size > 1

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

    def __init__(self, index: GraphIndex, head_dims: bool = False) -> None:
        self.index = index
        self.head_dims = head_dims
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
        if not is_weighted(node) or not node.output:
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


def build_groups(index: GraphIndex, head_dims: bool = False) -> GroupSet:
    """Find every group of coupled channels in ``index``'s graph.

    Args:
        head_dims: where a Reshape splits a channel axis into several (attention's [H*D] -> [H, D]), a unit is one
            index of the last axis in every head (a head dim: q/k dims together, v/output-projection dims together)
            instead of one whole head.

    Returns:
        The groups, prunable or not; frozen groups say why in ``blocked``.
    """
    builder = _Builder(index, head_dims)
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
    """Turn atom labels into groups: channels (labels) touching the same set of dims form one group."""
    dims = list(builder.offsets)
    if not dims:
        return []
    sizes = np.array([builder.sizes[d] for d in dims], dtype=np.int64)
    offsets = np.array([builder.offsets[d] for d in dims], dtype=np.int64)
    atom_dim = np.repeat(np.arange(len(dims)), sizes)
    pairs = np.unique(labels * len(dims) + atom_dim)  # (label, dim) pairs, sorted by label then dim
    pair_label, pair_dim = pairs // len(dims), pairs % len(dims)
    cuts = np.flatnonzero(np.diff(pair_label)) + 1
    by_signature: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for label, signature in zip(pair_label[np.r_[0, cuts]].tolist(), np.split(pair_dim, cuts)):
        by_signature.setdefault(signature.tobytes(), (signature, []))[1].append(label)
    groups = []
    for signature, group_labels in by_signature.values():
        member_dims = [dims[i] for i in signature]
        producers = [seed_owner[d] for d in member_dims if d in seed_owner]
        if not producers:
            continue  # channels that no weighted layer produces (only reached through other dims)
        group_labels_arr = np.array(group_labels, dtype=np.int64)  # sorted (labels came in order)
        first = labels[offsets[signature[0]] : offsets[signature[0]] + sizes[signature[0]]]
        present, first_pos = np.unique(first, return_index=True)
        keep = np.isin(present, group_labels_arr)
        ordered = present[keep][np.argsort(first_pos[keep], kind="stable")]  # channel k = k-th label by position
        position = np.empty(len(ordered), dtype=np.int64)
        sort_order = np.argsort(ordered)
        position[sort_order] = np.arange(len(ordered))
        sorted_labels = ordered[sort_order]
        members = {}
        for i in signature:
            dim_labels = labels[offsets[i] : offsets[i] + sizes[i]]
            slot = np.searchsorted(sorted_labels, dim_labels)
            slot = np.minimum(slot, len(sorted_labels) - 1)
            hit = sorted_labels[slot] == dim_labels
            idx = np.flatnonzero(hit)
            members[dims[i]] = (idx, position[slot[idx]])
        reasons = sorted({builder.blocked[d] for d in member_dims if d in builder.blocked})
        groups.append(ChannelGroup(len(groups), member_dims, members, len(ordered), producers, reasons))
    return groups
