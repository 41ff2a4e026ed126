"""Rounds: ``--steps N`` as a loop over the prune passes, N rounds each keeping the same fraction of channels and
recovering after itself, so every re-fit starts from a model still close to the last one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import onnx

from onnxprune.passes.base import Pass, run_passes
from onnxprune.passes.state import PruneReport, PruneState
from onnxprune.recovery.recover import output_error


class Rounds(Pass[PruneState]):
    """Runs ``rounds`` (the one-round passes) once, or with ``--steps N`` once per step on the same model,
    calibration data and live graph; weight sparsity joins in the last round. The report of several rounds is the
    last round's with the first round's "before", every round's notes (prefixed by its step), and the recovery of
    all rounds measured against the original model."""

    name = "rounds"

    def __init__(self, rounds: Sequence[Pass[PruneState]]) -> None:
        self.rounds = rounds

    def run(self, state: PruneState) -> None:
        options = state.options
        if options.steps <= 1 or not options.channels:
            run_passes(self.rounds, state)
            return
        steps = options.steps

        def per_step(ratio: float) -> float:
            return 1.0 - (1.0 - ratio) ** (1.0 / steps)

        original = None
        reports: list[PruneReport] = []
        for step in range(steps):
            last = step == steps - 1
            round_options = replace(options, steps=1, channels=per_step(options.channels),
                                    layer_channels=tuple((glob, per_step(r)) for glob, r in options.layer_channels),
                                    sparsity=options.sparsity if last else None,
                                    pattern=options.pattern if last else None,
                                    quantize=options.quantize if last else None)
            round_state = PruneState(state.model, round_options, batches=state.batches, calibrated=state.calibrated,
                                     index=state.index)
            run_passes(self.rounds, round_state)
            if step == 0 and round_state.original is not None:
                original = round_state.original  # the model before any round: the final error is against it
            state.batches, state.calibrated, state.index = round_state.batches, True, round_state.index
            reports.append(round_state.report)
        merge_rounds(state, reports, original)


def merge_rounds(state: PruneState, reports: list[PruneReport], original: onnx.ModelProto | None) -> None:
    """One report for rounds run on ``state.model`` (``--steps``, or the rounds of a budget search): the last
    round's with the first round's "before", every round's notes, and recovery measured against ``original``, the
    model before the first round."""
    state.report = _merge(reports, len(reports))
    rounds = [r.recovery for r in reports if r.recovery is not None]
    if rounds and original is not None and state.model.runnable():
        merged = replace(rounds[-1], layers=[x for r in rounds for x in r.layers], notes=[],
                         seconds=sum(r.seconds for r in rounds), kept=all(r.kept for r in rounds),
                         steps=[(r.output_error_before, r.output_error_after) for r in rounds])
        merged.output_error_before = rounds[0].output_error_before
        merged.output_error_after = output_error(original, state.model, state.batches)
        state.report.recovery = merged


def _merge(reports: list[PruneReport], steps: int) -> PruneReport:
    first, final = reports[0], reports[-1]
    final.before = first.before
    final.input = first.input
    initial = {g.name: g.before for g in first.groups}
    for g in final.groups:
        g.before = initial.get(g.name, g.before)
    final.structure_changed = any(r.structure_changed for r in reports)
    final.notes = [f"step {k + 1}/{steps}: {n}" for k, r in enumerate(reports) for n in r.notes]
    return final
