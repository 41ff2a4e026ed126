"""The prune job's public API: load, run the passes (passes/job.py), save at the one commit point, report.

The CLI's ``prune`` command only turns options into :class:`PruneOptions` and renders the :class:`PruneReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxprune.channels import Dim
from onnxprune.channels.groups import GroupSet, build_groups
from onnxprune.data.loader import Feed
from onnxprune.graph.check import check_input_model
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import LoadedModel, default_output_path, load_model
from onnxprune.graph.stats import check_input_shapes, static_input_shapes
from onnxprune.passes.base import Pass, run_passes
from onnxprune.passes.channels import BuildGroups, RemoveChannels, SelectChannels
from onnxprune.passes.job import PRUNE
from onnxprune.passes.save import Save
from onnxprune.passes.state import GroupRow, PruneOptions, PruneReport, PruneState
from onnxprune.prune.structured import ChannelPlan

__all__ = ["GroupRow", "PruneOptions", "PruneReport", "find_groups", "prune_channels", "prune_file", "prune_model"]


def find_groups(model: LoadedModel, input_shapes: dict[str, list[int]] | None = None) -> GroupSet:
    """Every group of coupled channels of ``model`` (the Python API for listing and explicit removal)."""
    return build_groups(GraphIndex(model, static_input_shapes(model, input_shapes)))


def prune_channels(model: LoadedModel, options: PruneOptions, batches: list[Feed] | None = None,
                   index: GraphIndex | None = None) -> tuple[GroupSet, ChannelPlan, int, dict[Dim, np.ndarray]]:
    """Plan and apply structured removal in place, nothing else; returns (groups, the plan, round_to, kept)."""
    index = index or GraphIndex(model, static_input_shapes(model, options.input_shapes))
    state = PruneState(model, options, batches=batches, calibrated=True, index=index)
    state.report = PruneReport(str(model.path or ""), "", None, None, 0)
    run_passes((BuildGroups(), SelectChannels(), RemoveChannels()), state)
    return state.groups, state.plan, state.report.round_to, state.kept


def prune_model(model: LoadedModel, options: PruneOptions, batches: list[Feed] | None = None,
                job: Sequence[Pass[PruneState]] = PRUNE) -> PruneReport:
    """Prune ``model`` in place according to ``options``; the report's output fields are filled by the caller.

    ``batches``: the ``--calib`` batches when the caller loaded them already; else loaded from ``options.calib``.
    ``job``: the passes to run (a budget search, from a later stage, brings its own: search/budget.py)."""
    state = PruneState(model, options, batches=batches, calibrated=batches is not None)
    return run_passes(job, state).report


def prune_file(input_path: str | Path, output_path: str | Path | None, options: PruneOptions,
               job: Sequence[Pass[PruneState]] = PRUNE) -> PruneReport:
    """Load, check the input, prune with ``job``, save at the one commit point (never over the input) and
    report."""
    model = load_model(input_path)
    sorted_nodes = check_input_model(model)  # exit 3 for an invalid input, before the output is touched
    check_input_shapes(model, options.input_shapes)
    out = Path(output_path) if output_path else default_output_path(Path(input_path))
    model.open_output(out)
    try:
        report = prune_model(model, options, job=job)
        if sorted_nodes:
            report.notes.insert(0, "the input's nodes were not in topological order (ONNX requires it); they were "
                                   "sorted first")
        run_passes((Save(out),), PruneState(model, options, report=report))
    except BaseException:
        model.discard_output()  # an error, Ctrl-C or SIGTERM before the commit leaves no data file behind
        raise
    return report
