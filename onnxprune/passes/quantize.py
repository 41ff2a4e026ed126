"""Quantize: ``--quantize`` as the step after recovery, on the same calibration batches (onnxprune/quantize/)."""

from __future__ import annotations

from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState
from onnxprune.quantize.run import DEFAULT_QUANT_RECOVERY, quantize_model


class Quantize(Pass[PruneState]):
    """Replaces the whole model proto (onnxruntime's quantizer works on files), so the live index is rebuilt
    afterwards, as after recovery. With ``--steps`` it runs in the last round only (Rounds passes the option there).
    What cannot be quantized was refused by Preflight before any work."""

    name = "quantize"

    def applies(self, state: PruneState) -> bool:
        return state.options.quantize is not None

    def run(self, state: PruneState) -> None:
        options, report = state.options, state.report
        report.quantization = quantize_model(state.model, options.quantize, options.quant_method, state.batches,
                                             options.exclude, options.quant_recover or DEFAULT_QUANT_RECOVERY)
        report.notes += report.quantization.notes
        report.structure_changed = True  # new nodes and tensors: the saved model is checked
        state.rebuild_index()
