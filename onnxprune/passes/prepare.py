"""Prepare: what every later pass needs and what must be refused before any work."""

from __future__ import annotations

from onnxprune.graph.layers import find_weights
from onnxprune.graph.stats import model_stats
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneReport, PruneState
from onnxprune.passes.verify import verify_feeds


class Prepare(Pass[PruneState]):
    """Draw ``--verify``'s inputs (or fail: nothing is proved by a check that cannot run), decide whether an
    external-data model's changes are held in memory (recovery must run it) or streamed out, build the live graph
    index and measure the model as it came in."""

    name = "prepare"

    def run(self, state: PruneState) -> None:
        model, options = state.model, state.options
        if options.verify:
            state.verify_feeds = verify_feeds(model, options)
        if options.calib and options.recover != "none" and model.external and model.fits_in_memory:
            model.hold_changes = True  # recovery runs the changed model in onnxruntime
        state.too_big = model.external and not model.hold_changes
        if state.index is None:
            state.rebuild_index()
        only_weights = options.prunes_weights and not options.prunes_channels
        # weights that unstructured pruning reads anyway are counted there, not read an extra time here
        before = model_stats(model, index=state.index,
                             zeros={w.name: 0 for w in find_weights(state.index)} if only_weights else {})
        state.report = PruneReport(str(model.path or ""), "", before, before, 0)
        state.report.structure_changed = options.prunes_channels or options.sparse_storage

    def ensures(self, state: PruneState) -> None:
        assert state.index is not None and state.report is not None
