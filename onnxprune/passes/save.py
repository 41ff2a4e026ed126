"""Save: the output's one commit point (graph/io.py), checked unless only weight values changed."""

from __future__ import annotations

from pathlib import Path

from onnxprune.graph.io import save_model
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState


class Save(Pass[PruneState]):
    name = "check-and-save"

    def __init__(self, out: Path) -> None:
        self.out = out

    def run(self, state: PruneState) -> None:
        report = state.report
        report.output_size = save_model(state.model, self.out, check=report.structure_changed)
        report.output = str(self.out)
        report.after.file_size = report.output_size
