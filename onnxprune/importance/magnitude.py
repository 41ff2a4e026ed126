"""Magnitude criteria, ``l1`` and ``l2``: how big the weights are, with no data needed.

Channels: the L1 norm sum |w| (or the L2 norm sqrt(sum w^2)) of every weight slice a channel owns, each member
normalised by its mean (see ``scoring.magnitude_scores``). Single weights: both rank by |w|, so they select the
same weights.
"""

from __future__ import annotations

from typing import ClassVar

from onnxprune.importance.registry import Criterion, Target, register
from onnxprune.importance.scoring import magnitude_scores, weight_dims


class _Magnitude(Criterion):
    target = Target.CHANNELS | Target.WEIGHTS
    p: ClassVar[int]

    def score_channels(self, groups, chosen, reduction, batches):
        return {g.id: magnitude_scores(groups, g, weight_dims(groups, g), self.p, reduction) for g in chosen}


@register
class L1(_Magnitude):
    name = "l1"
    help = "weight magnitude, sum of |w|"
    p = 1


@register
class L2(_Magnitude):
    name = "l2"
    help = "weight magnitude, root of the sum of w^2"
    p = 2
