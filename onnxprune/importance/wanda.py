"""``wanda``: a weight matters as |w| times the L2 norm, over the calibration data, of the input feature it
multiplies (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"): a large weight on a
feature that is always near zero contributes little to the output.
"""

from __future__ import annotations

import numpy as np

from onnxprune.channels import Dim
from onnxprune.data.probe import collect_moments
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.layers import Weight, is_weighted, kind_of
from onnxprune.importance.registry import Batches, Criterion, Target, register


def feature_norms(index: GraphIndex, weights: list[Weight], batches: Batches) -> dict[str, np.ndarray]:
    """Per weight: the L2 norm over ``batches`` of each input feature the weight multiplies, one per index of its
    reduction axis. Weights in a layer's input-0 slot (a MatMul's left operand) get none: they multiply no input.

    A grouped conv's weight [O, C/g, ...] has column i of output o reading input channel (o // (O/g)) * C/g + i
    (the layer table's ``feature_index``), so its norms come back as an [O, C/g, 1, ...] array that broadcasts
    against the weight."""
    wanted: dict[str, Dim] = {}
    features: dict[str, np.ndarray] = {}
    for w in weights:
        node = next(u.node for u in index.consumers_of(w.name) if is_weighted(u.node))
        if node.input[0] == w.name:
            continue
        rank = index.rank(node.input[0])
        if rank is None:
            continue
        kind = kind_of(node)
        wanted[w.name] = Dim(node.input[0], kind.feature_axis(node, rank))
        feature = kind.feature_index(node, w.shape) if len(w.shape) >= 2 else None
        if feature is not None:
            features[w.name] = feature
    moments = collect_moments(index.model.proto, list(dict.fromkeys(wanted.values())), batches,
                              base_dir=index.model.base_dir)
    norms = {name: np.sqrt(moments[d].s2) for name, d in wanted.items()}
    for name, feature in features.items():
        norms[name] = norms[name][feature]
    return norms


@register
class Wanda(Criterion):
    name = "wanda"
    help = "|w| x input norm"
    target = Target.WEIGHTS
    needs_data = True

    def weight_scales(self, index, weights, batches):
        return feature_norms(index, weights, batches)
