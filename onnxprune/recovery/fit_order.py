"""Where a re-fitted layer's output goes, and the order recovery fits layers in.

A layer ending a residual branch is fitted to the original residual *sum* given the pruned shortcut, and a layer
whose output only reaches a Relu is fitted for what the Relu passes on; both need to know the node's sole use,
looking through one per-channel BatchNormalization. The fit order then puts a residual branch after its shortcut.
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, Use


def sole_use(index: GraphIndex, tensor: str) -> Use | None:
    """``tensor``'s only consumer, if it has exactly one and is not a graph output."""
    uses = index.consumers_of(tensor)
    return uses[0] if len(uses) == 1 and tensor not in index.graph_outputs else None


def use_past_norm(index: GraphIndex, tensor: str) -> tuple[onnx.NodeProto | None, Use | None]:
    """(BatchNormalization or None, the sole use after it): where ``tensor`` goes when it has one consumer, looking
    through one per-channel BatchNormalization fed by it alone."""
    use = sole_use(index, tensor)
    if use is not None and use.node.op_type == "BatchNormalization" and use.index == 0:
        return use.node, sole_use(index, use.node.output[0])
    return None, use


def residual_branch(index: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str,
                                                                       onnx.NodeProto | None] | None:
    """(Add, its other input, BatchNormalization or None) when ``node``'s output reaches a two-input residual Add
    only through an optional per-channel BatchNormalization."""
    norm, use = use_past_norm(index, node.output[0])
    if use is None or use.node.op_type != "Add" or len([n for n in use.node.input if n]) != 2:
        return None
    user = use.node
    other = user.input[1 - use.index]
    if index.is_constant(other) or index.shape(other) != index.shape(user.output[0]):
        return None
    rival = branch_conv(index, other)
    if rival is not None and features(index, rival) >= features(index, node):
        return None  # both inputs are branches (a projection shortcut): the wider one absorbs the other's error
    return user, other, norm


def relu_after(index: GraphIndex, tensor: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """(BatchNormalization or None, Relu or None): the Relu that is ``tensor``'s only use, directly or after one
    per-channel BatchNormalization."""
    norm, use = use_past_norm(index, tensor)
    if use is None or use.node.op_type != "Relu":
        return None, None
    return norm, use.node


def branch_conv(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The Conv whose output alone becomes ``tensor`` (directly or through one BatchNormalization), if any."""
    use = index.producer.get(tensor)
    if use is not None and use.node.op_type == "BatchNormalization":
        if len(index.consumers_of(use.node.input[0])) != 1:
            return None
        use = index.producer.get(use.node.input[0])
    return use.node if use is not None and use.node.op_type == "Conv" else None


def features(index: GraphIndex, conv: onnx.NodeProto) -> int:
    shape = index.shape(conv.input[1]) if len(conv.input) > 1 else None
    return int(np.prod(shape[1:])) if shape else 0


def fit_order(index: GraphIndex, shortcut_first: bool) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where every node comes after its inputs' producers and, with
    ``shortcut_first`` (a method that fits residual branches to the sum, as lsq does), a layer ending a residual
    branch also comes after the producers of the shortcut it is fitted against: fitting the branch to
    ``original sum - shortcut`` is only right once the shortcut (say a 1x1 projection conv) has its final weights."""
    nodes = list(index.graph.node)
    position = {id(n): k for k, n in enumerate(nodes)}
    needs: dict[int, set[int]] = {k: {position[id(index.producer[name].node)] for name in n.input
                                      if name in index.producer} for k, n in enumerate(nodes)}
    if shortcut_first:
        for k, n in enumerate(nodes):
            residual = residual_branch(index, n) if n.op_type == "Conv" else None
            if residual is not None and residual[1] in index.producer:
                needs[k].add(position[id(index.producer[residual[1]].node)])
    users: dict[int, list[int]] = {k: [] for k in range(len(nodes))}
    for k, deps in needs.items():
        for d in deps:
            users[d].append(k)
    waiting = {k: len(deps) for k, deps in needs.items()}
    ready = [k for k, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(nodes) else nodes
