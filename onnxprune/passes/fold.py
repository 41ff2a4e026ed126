"""FoldConstants: weights computed at run time from constants become initializers a rule can slice."""

from __future__ import annotations

from onnxprune.graph.fold import fold_constant_subgraphs
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState


class FoldConstants(Pass[PruneState]):
    """Runs after the input is measured, so the report describes the input as it is."""

    name = "fold-constants"

    def run(self, state: PruneState) -> None:
        folded = fold_constant_subgraphs(state.index)
        if folded:
            state.report.structure_changed = True
            state.report.notes.append(f"folded {folded} node(s) computed from constants into initializers "
                                      "(weights behind Identity/Cast/Reshape and the like)")
