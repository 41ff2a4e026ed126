"""Recover: re-fit what pruning changed, on calibration data, with the chosen recovery method."""

from __future__ import annotations

from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState
from onnxprune.recovery import registry as recovery_methods
from onnxprune.recovery.recover import recover


class Recover(Pass[PruneState]):
    """Runs whenever calibration data was given (the method may be ``none``, which still measures the error).

    Recovery works on snapshots of its own: it may restore the whole model proto (an undo when the outputs got
    worse, the choice between two lsq sweeps), which no index can follow edit by edit. So it keeps its own index,
    and the live one is rebuilt once afterwards for the passes that follow: the only rebuild in a round."""

    name = "recover"

    def applies(self, state: PruneState) -> bool:
        return bool(state.batches)

    def requires(self, state: PruneState) -> None:
        assert state.original is not None

    def run(self, state: PruneState) -> None:
        method = recovery_methods.chosen_method(state.options.recover, calibrated=True).name
        state.report.recovery = recover(state.original, state.model, state.kept, state.batches, method,
                                        state.changed, reselect=state.reselect)
        state.report.notes += state.report.recovery.notes
        if state.report.recovery.layers or not state.report.recovery.kept:
            state.rebuild_index()
