"""Reconstruction-aware channel scores (``--criterion recon``): Optimal Brain Surgeon at channel granularity.

Magnitude says how big a channel's weights are; what matters is how much of the next layers' outputs is lost when
the channel goes *and the remaining weights are re-fitted* (which ``--recover lsq`` then does). For every layer that
reads a group's channels as input (Conv with group 1, Gemm, MatMul with a constant weight), the calibration inputs
give H = (X^T X + damp)^-1; removing the input rows b of weight W then costs tr(W_b^T (H_bb)^-1 W_b) after the
optimal update of the other rows. Channels are removed greedily (cheapest first, summed over the group's
consumers), updating W and H after each removal, and a channel's score is its cumulative cost at removal. The greedy
order costs O(channels^2) small solves per group, so groups over 256 channels are scored in one pass instead (each
channel's cost with all others present). Scores must come out finite: a NaN weight is an InputModelError naming it,
and a NaN cost (a numerical failure) a DataError naming the group, never a choice by position.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.data.probe import Probe
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import DataError, InputModelError
from onnxprune.finite import require_finite
from onnxprune.graph.index import attr
from onnxprune.graph.layers import MAX_FEATURES, conv_rows
from onnxprune.importance.registry import Criterion, Target, register
from onnxprune.importance.scoring import l1_scores
from onnxprune.progress import progress

DAMP = 0.01
GREEDY_LIMIT = 256  # larger groups are scored in one pass (each channel's cost alone), not in greedy order


class _Consumer:
    """One layer reading a group's channels: its weight as rows [K, O] per channel, and the inverse Hessian."""

    def __init__(self, weight: np.ndarray, rows_of: list[np.ndarray], gram: np.ndarray) -> None:
        self.w = weight
        self.rows_of = rows_of  # per channel of the group: row indices of W it owns
        lam = DAMP * float(np.mean(np.diag(gram))) + 1e-12
        self.h = np.linalg.inv(gram + lam * np.eye(len(gram)))
        self.alive = np.ones(len(gram), dtype=bool)

    def costs(self, channels: list[int]) -> np.ndarray:
        """tr(W_b^T (H_bb)^-1 W_b) of each channel, as one batched solve (channels own equally many rows, or
        none, in every layer the rules handle; others are solved one by one)."""
        out = np.zeros(len(channels))
        sizes = {self.rows_of[c].size for c in channels} - {0}
        if len(sizes) == 1:
            live = [k for k, c in enumerate(channels) if self.rows_of[c].size]
            rows = np.stack([self.rows_of[channels[k]] for k in live])  # [n, b]
            blocks = self.h[rows[:, :, None], rows[:, None, :]]  # [n, b, b]
            wb = self.w[rows]  # [n, b, O]
            out[live] = np.sum(wb * np.linalg.solve(blocks, wb), axis=(1, 2))
            return out
        for k, c in enumerate(channels):
            b = self.rows_of[c]
            if b.size:
                wb = self.w[b]
                out[k] = float(np.sum(wb * np.linalg.solve(self.h[np.ix_(b, b)], wb)))
        return out

    def remove(self, channel: int) -> None:
        b = self.rows_of[channel]
        if not b.size:
            return
        inv_bb = np.linalg.inv(self.h[np.ix_(b, b)])
        h_b = self.h[:, b]
        self.w -= h_b @ (inv_bb @ self.w[b])
        self.h -= h_b @ inv_bb @ h_b.T
        self.w[b] = 0.0
        self.h[b, :] = 0.0
        self.h[:, b] = 0.0


def _consumers(groups: GroupSet, group: ChannelGroup, probe: Probe) -> list[_Consumer]:
    """Every layer reading the group's channels, with the Gram matrix of its calibration input."""
    index = groups.index
    found: list = []
    rng = np.random.default_rng(0)
    for dim in group.dims:
        if not index.is_constant(dim.tensor):
            continue
        for use in index.consumers_of(dim.tensor):
            node = use.node
            if use.index != 1:
                continue
            weight = index.const_value(dim.tensor).astype(np.float64)
            require_finite(weight, f"input model: weight '{dim.tensor}'", InputModelError, "axis-0 index")
            if node.op_type == "Conv" and dim.axis == 1 and int(attr(node, "group", 1)) == 1 and weight.ndim == 4:
                per = int(np.prod(weight.shape[2:]))
                matrix = weight.reshape(weight.shape[0], -1).T
                kernel = (int(weight.shape[2]), int(weight.shape[3]))

                def rows(x, node=node, kernel=kernel):
                    dummy = np.zeros((x.shape[0], 1) + _out_hw(node, x, kernel))
                    return conv_rows(node, kernel, x, dummy, rng)[0]
            elif node.op_type == "Gemm" and not int(attr(node, "transA", 0)) and \
                    dim.axis == (1 if int(attr(node, "transB", 0)) else 0):
                per = 1
                matrix = weight.T if int(attr(node, "transB", 0)) else weight

                def rows(x):
                    return x.reshape(-1, x.shape[-1]).astype(np.float64)
            elif node.op_type == "MatMul" and weight.ndim == 2 and dim.axis == 0:
                per, matrix = 1, weight

                def rows(x):
                    return x.reshape(-1, x.shape[-1]).astype(np.float64)
            else:
                continue
            if matrix.shape[0] > MAX_FEATURES:
                continue
            matrix = matrix * _output_scale(index, node, matrix.shape[1])
            idx, owner = group.members[dim]
            rows_of = [np.concatenate([np.arange(i * per, (i + 1) * per) for i in idx[owner == c]])
                       if np.any(owner == c) else np.zeros(0, dtype=np.int64) for c in range(group.size)]
            found.append((node.input[0], rows, matrix, rows_of))
    if not found:
        return []
    inputs = list(dict.fromkeys(name for name, _, _, _ in found))
    grams = [np.zeros((m.shape[0], m.shape[0])) for _, _, m, _ in found]
    for values in probe.iterate(inputs):  # every consumer's input from one pass over the data
        by_name = dict(zip(inputs, values))
        for gram, (name, rows, _, _) in zip(grams, found):
            a = rows(by_name[name])
            gram += a.T @ a
    return [_Consumer(matrix.copy(), rows_of, gram) for gram, (_, _, matrix, rows_of) in zip(grams, found)]


def _output_scale(index, node: onnx.NodeProto, outputs: int) -> np.ndarray | float:
    """Per output channel, |gamma| / sqrt(var + eps) of the BatchNormalization that is the layer's only use: costs
    are then in normalised units, as they are for a model whose BN was folded into the weights, and comparable
    across the consumers of a group."""
    uses = index.consumers_of(node.output[0])
    if node.op_type == "MatMul" or len(uses) != 1 or uses[0].node.op_type != "BatchNormalization" or uses[0].index:
        return 1.0
    norm = uses[0].node
    gamma, var = index.const_value(norm.input[1]), index.const_value(norm.input[4])
    if gamma is None or var is None or gamma.size != outputs or var.size != outputs:
        return 1.0
    eps = float(attr(norm, "epsilon", 1e-5))
    return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)


def _out_hw(node: onnx.NodeProto, x: np.ndarray, kernel: tuple[int, int]) -> tuple[int, int]:
    sh, sw = (int(s) for s in (attr(node, "strides") or [1, 1]))
    dh, dw = (int(d) for d in (attr(node, "dilations") or [1, 1]))
    pt, pl, pb, pr = (int(p) for p in (attr(node, "pads") or [0, 0, 0, 0]))
    h = (x.shape[2] + pt + pb - dh * (kernel[0] - 1) - 1) // sh + 1
    w = (x.shape[3] + pl + pr - dw * (kernel[1] - 1) - 1) // sw + 1
    return h, w


def recon_scores(groups: GroupSet, chosen: list[ChannelGroup], proto: onnx.ModelProto,
                 batches: list[dict[str, np.ndarray]], base_dir=None) -> dict[int, np.ndarray]:
    """Per group: a score per channel (its reconstruction cost when the greedy order removed it; higher = keep)."""
    tensors = [n for node in proto.graph.node for n in node.output if n]
    probe = Probe(proto, tensors, batches, base_dir)
    scores = {}
    with progress(len(chosen), "recon scoring") as advance:
        for group in chosen:
            consumers = _consumers(groups, group, probe)
            if consumers:
                scores[group.id] = _greedy(group, consumers)
            advance()
    for group in chosen:
        if group.id in scores:
            require_finite(scores[group.id], f"group '{group.name}': recon score", DataError, "channel",
                           "the reconstruction costs on the calibration data are not finite")
    return scores


def _greedy(group: ChannelGroup, consumers: list[_Consumer]) -> np.ndarray:
    """Each channel's cumulative cost when the greedy order removes it (one pass for groups over GREEDY_LIMIT)."""
    if group.size > GREEDY_LIMIT:
        return sum(c.costs(list(range(group.size))) for c in consumers)
    alive = list(range(group.size))
    score = np.zeros(group.size)
    total = 0.0
    while len(alive) > 1:
        costs = sum(c.costs(alive) for c in consumers)
        pick = alive[int(np.argmin(costs))]
        total += float(np.min(costs))
        score[pick] = total  # cumulative: later removals always score higher
        for c in consumers:
            c.remove(pick)
        alive.remove(pick)
    score[alive[0]] = total + 1.0 + abs(total)
    return score


@register
class Reconstruction(Criterion):
    """Groups that no layer reads as input (nothing to re-fit) are scored by l1, and the report says so."""

    name = "recon"
    help = "output lost after re-fitting, greedy OBS"
    target = Target.CHANNELS
    needs_data = True

    def score_channels(self, groups, chosen, reduction, batches):
        model = groups.index.model
        found = recon_scores(groups, chosen, model.proto, batches, model.base_dir)
        fallback = "no layer reads this group's channels as input: scored by l1"
        return {g.id: (found[g.id], None) if g.id in found else (l1_scores(groups, g, reduction)[0], fallback)
                for g in chosen}
