"""``bn-scale``: a channel matters as much as the |scale| (gamma) of the BatchNormalization it passes through
(network slimming); groups without BatchNormalization are scored by l1, and the report says so."""

from __future__ import annotations

from onnxprune.channels import Dim
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.importance.registry import Criterion, Target, register
from onnxprune.importance.scoring import l1_scores, magnitude_scores


def bn_scale_dims(groups: GroupSet, group: ChannelGroup) -> list[Dim]:
    """Member dims that are the scale input of a BatchNormalization."""
    index = groups.index
    return [d for d in group.dims if index.is_constant(d.tensor) and any(
        u.node.op_type == "BatchNormalization" and u.index == 1 for u in index.consumers_of(d.tensor))]


@register
class BnScale(Criterion):
    name = "bn-scale"
    help = "BatchNormalization |scale|"
    target = Target.CHANNELS

    def score_channels(self, groups, chosen, reduction, batches):
        scored = {}
        for group in chosen:
            dims = bn_scale_dims(groups, group)
            if dims:
                scored[group.id] = magnitude_scores(groups, group, dims, 1, reduction)
            else:
                scores, note = l1_scores(groups, group, reduction)
                scored[group.id] = scores, note or "no BatchNormalization in group: scored by l1"
        return scored
