"""``obs``: the zeros are chosen layer by layer while lsq recovery re-fits each layer, on the pruned model's own
activations, by Optimal Brain Surgeon computed the SparseGPT way (the maths is in ``recovery/obs.py``).

Here it is a weight criterion whose ranking is wanda's: wanda sets how many weights each tensor loses (so counts,
N:M patterns and per-layer ratios hold exactly), then recovery chooses which. So it needs calibration data and
``--recover lsq``; a model too big to hold in memory skips recovery, and its weights are ranked by wanda alone.
"""

from __future__ import annotations

from onnxprune.importance.registry import Criterion, Target, register


@register
class Obs(Criterion):
    name = "obs"
    help = "zeros chosen layer by layer while re-fitting, SparseGPT-style OBS"
    target = Target.WEIGHTS
    needs_data = True
    counts_by = "wanda"
