"""The prune job: the passes in order. A new step (quantization, attention heads) is one more entry in ROUND."""

from __future__ import annotations

from onnxprune.passes.base import Pass
from onnxprune.passes.calibrate import Calibrate
from onnxprune.passes.channels import BuildGroups, RemoveChannels, SelectChannels
from onnxprune.passes.finish import Finish
from onnxprune.passes.fold import FoldConstants
from onnxprune.passes.hidden import SliceHidden
from onnxprune.passes.preflight import Preflight
from onnxprune.passes.prepare import Prepare
from onnxprune.passes.quantize import Quantize
from onnxprune.passes.recover import Recover
from onnxprune.passes.state import PruneState
from onnxprune.passes.steps import Rounds
from onnxprune.passes.weights import SparseStorage, ZeroWeights

# one round: everything a run without --steps does, in order
ROUND: tuple[Pass[PruneState], ...] = (
    Prepare(), FoldConstants(), Calibrate(), BuildGroups(), SelectChannels(), RemoveChannels(), SliceHidden(),
    ZeroWeights(), Recover(), Quantize(), SparseStorage(), Finish())

PRUNE: tuple[Pass[PruneState], ...] = (Preflight(), Rounds(ROUND))
