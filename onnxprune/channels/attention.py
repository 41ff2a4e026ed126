"""What a transformer's groups look like, for ``inspect``: attention blocks (heads, head dim, kv heads) and FFN widths.

An attention block is found from the graph itself, not from the groups, so it shows even where heads cannot be
removed: a Softmax whose input is a MatMul of two activations (the scores [.., H, S, S], maybe scaled and masked)
and whose output is the left operand of another such MatMul (the context). The groups then say whether its heads
are removable, and in how many units: grouped-query attention removes one kv head with its q heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.channels.groups import GroupSet
from onnxprune.channels.registry import Dim
from onnxprune.graph.index import GraphIndex, node_label
from onnxprune.graph.layers import node_macs

PASS_THROUGH = ("Mul", "Div", "Add", "Sub", "Where", "Cast")  # scale, mask, bias between scores and Softmax


@dataclass
class AttentionBlock:
    """One attention block: ``heads`` q heads of ``head_dim``; ``units`` removable units (kv heads; 0: frozen)."""

    softmax: str
    heads: int | None
    head_dim: int | None
    units: int
    macs: int | None  # scores and context MatMuls (activation x activation)
    note: str


@dataclass
class FeedForward:
    """A linear layer whose outputs feed another linear layer through an activation: the FFN's inner width."""

    layer: str
    width: int
    removable: bool
    note: str


def _score_matmul(index: GraphIndex, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """The activation x activation MatMul behind a Softmax, through scale and mask ops."""
    name = softmax.input[0]
    for _ in range(4):
        producer = index.producer.get(name)
        if producer is None:
            return None
        node = producer.node
        if node.op_type == "MatMul":
            return node if not any(index.is_constant(i) for i in node.input) else None
        if node.op_type not in PASS_THROUGH:
            return None
        name = next((i for i in node.input if i and not index.is_constant(i)), "")
    return None


def attention_blocks(groups: GroupSet) -> list[AttentionBlock]:
    """Every attention block of the graph, in graph order."""
    index = groups.index
    blocks = []
    for node in index.graph.node:
        if node.op_type != "Softmax":
            continue
        scores = _score_matmul(index, node)
        context = next((u.node for u in index.consumers_of(node.output[0])
                        if u.node.op_type == "MatMul" and u.index == 0), None)
        if scores is None or context is None:
            continue
        q = scores.input[0]
        rank = index.rank(q)
        heads = index.size(q, rank - 3) if rank and rank >= 3 else None
        head_dim = index.size(q, rank - 1) if rank else None
        macs = [node_macs(index, m) for m in (scores, context)]
        group = next((g for g in groups.groups if rank and Dim(q, rank - 3) in g.dims), None)
        if group is None:
            units, note = 0, "heads are not a channel axis here (see prune's report)"
        elif not group.prunable:
            units, note = 0, "; ".join(group.blocked) or "a single unit"
        else:
            units, note = group.size, ("" if group.size == heads else
                                       f"{group.size} kv heads, each removed with its q heads")
        blocks.append(AttentionBlock(node_label(node), heads, head_dim, units,
                                     None if None in macs else sum(macs), note))
    return blocks


def feed_forwards(groups: GroupSet) -> list[FeedForward]:
    """Groups of single output features of one MatMul/Gemm that another MatMul/Gemm reads: FFN inner layers (and,
    in a CNN head, its hidden Gemm). Groups crossing a LayerNorm (the residual stream) are not listed."""
    index = groups.index
    found = []
    for group in groups.groups:
        if len(group.producers) != 1 or any("LayerNormalization" in r for r in group.blocked):
            continue
        producer = next((index.producer[d.tensor].node for d in group.dims if d.tensor in index.producer
                         and node_label(index.producer[d.tensor].node) == group.producers[0]), None)
        if producer is None or producer.op_type not in ("MatMul", "Gemm"):
            continue
        readers = [u.node for d in group.dims if index.is_constant(d.tensor) for u in index.consumers_of(d.tensor)
                   if u.node is not producer and u.node.op_type in ("MatMul", "Gemm")]
        if readers:
            found.append(FeedForward(group.producers[0], group.size, group.prunable, "; ".join(group.blocked)))
    return found
