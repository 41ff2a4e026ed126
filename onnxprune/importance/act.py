"""``act``: l1 times the channel's mean |activation| on the calibration data, so channels that stay near zero on
real data go first. Each activation tensor of the group is normalised by its mean before the members are averaged.
"""

from __future__ import annotations

import numpy as np

from onnxprune.data.probe import collect_moments
from onnxprune.importance.registry import Criterion, Target, register
from onnxprune.importance.scoring import l1_scores


@register
class Activation(Criterion):
    name = "act"
    help = "l1 x mean |activation|"
    target = Target.CHANNELS
    needs_data = True

    def score_channels(self, groups, chosen, reduction, batches):
        index = groups.index
        dims = [d for g in chosen for d in g.dims if not index.is_constant(d.tensor)]
        moments = collect_moments(index.model.proto, dims, batches, base_dir=index.model.base_dir)
        activation = {d: m.mean_abs for d, m in moments.items()}  # one pass over the data for every group
        scored = {}
        for group in chosen:
            scores, note = l1_scores(groups, group, reduction)
            if note is None:
                acts = [group.per_channel_mean(d, activation[d]) for d in group.dims if d in activation]
                acts = [a / a.mean() for a in acts if a.mean() > 0]
                if acts:
                    scores = scores * np.mean(acts, axis=0)
                else:
                    note = "no activation statistics for this group: scored by l1"
            scored[group.id] = scores, note
        return scored
