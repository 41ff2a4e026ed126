"""Calibrate: load ``--calib`` once per run, settle the criteria that depend on it, keep the model recovery aims at."""

from __future__ import annotations

import onnx

from onnxprune.data.loader import DataOptions, load_feeds
from onnxprune.importance import Target
from onnxprune.importance import registry as criteria
from onnxprune.passes.base import Pass
from onnxprune.passes.criteria import weight_criterion
from onnxprune.passes.state import PruneState


class Calibrate(Pass[PruneState]):
    """The batches come from the loader validation uses, with the same image preprocessing; a run of several
    rounds (``--steps``) loads them in its first round only."""

    name = "calibrate"

    def run(self, state: PruneState) -> None:
        options, report = state.options, state.report
        if not state.calibrated and options.calib:
            data = DataOptions(path=options.calib, limit=options.calib_limit, batch_size=options.calib_batch,
                               preprocess=options.preprocess)
            state.batches = load_feeds(state.model, data, options.input_shapes)
        state.calibrated = True
        if options.criterion == criteria.AUTO and state.batches:
            channels = options.prunes_channels
            chosen = [f"{criteria.auto_choice(Target.CHANNELS, True, False)} for channels"] if channels else []
            if options.prunes_weights:  # auto adds no note of its own; ZeroWeights asks again
                chosen.append(f"{weight_criterion(options, state.batches, report, state.too_big).name} for weights")
            if chosen:  # --hidden alone ranks no channels or weights
                report.notes.append(f"criterion auto with calibration data: {', '.join(chosen)}")
        if state.batches:
            state.original = onnx.ModelProto()
            state.original.CopyFrom(state.model.proto)
