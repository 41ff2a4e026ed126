"""Finish: measure the result and say what ``--verify`` proved, now that every later step is known."""

from __future__ import annotations

from onnxprune.graph.stats import model_stats
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState
from onnxprune.passes.verify import changed_after_removal


class Finish(Pass[PruneState]):
    name = "finish"

    def run(self, state: PruneState) -> None:
        options, report = state.options, state.report
        known = None
        if report.unstructured is not None:
            known = {w.name: w.zeros_after for w in report.unstructured.weights}
            if options.prunes_weights and not options.prunes_channels:  # Prepare left these to unstructured pruning
                before_zeros = {w.name: w.zeros_before for w in report.unstructured.weights}
                for layer in report.before.layers:
                    if layer.weight in before_zeros and layer.params:
                        layer.zeros = before_zeros[layer.weight]
        if state.proof is not None:
            report.notes.append(state.proof + changed_after_removal(report))
        report.after = model_stats(state.model, options.input_shapes, index=state.index, zeros=known)
        report.after.file_size = 0  # known once saved
