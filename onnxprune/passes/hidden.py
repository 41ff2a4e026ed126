"""SliceHidden: ``--hidden F`` removes fraction F of a transformer's hidden (residual-stream) width.

Runs after channel removal and before weight sparsity and recovery. The same rewrite is applied twice: to the
original model with the full basis, which gives an exact equivalent of it (checked here on the first calibration
batch), and to the model being pruned with the sliced basis. The exact equivalent becomes the model recovery aims
at (``state.original``), so that in it the sliced model is an ordinary channel removal: its kept indices go into
``state.kept`` and lsq re-fits writers to the kept components and readers to the full outputs.
"""

from __future__ import annotations

import onnx

from onnxprune.channels import Dim
from onnxprune.errors import ConfigError, OutputError
from onnxprune.graph.check import short_message
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto
from onnxprune.graph.stats import static_input_shapes
from onnxprune.passes.base import Pass
from onnxprune.passes.state import HiddenRow, PruneState
from onnxprune.prune.hidden.apply import slice_stream
from onnxprune.prune.hidden.plan import plan_hidden
from onnxprune.prune.hidden.stream import Stream, find_stream
from onnxprune.prune.verify import relative_difference, run

REFERENCE_TOLERANCE = 1e-4  # the rotated, unsliced model against the original: float rounding only


class SliceHidden(Pass[PruneState]):
    name = "slice-hidden"

    def applies(self, state: PruneState) -> bool:
        return bool(state.options.hidden)

    def requires(self, state: PruneState) -> None:
        assert state.batches and state.original is not None  # Preflight refused --hidden without --calib

    def run(self, state: PruneState) -> None:
        stream = _stream(state.index)
        shapes = static_input_shapes(state.model, state.options.input_shapes)
        reference = onnx.ModelProto()
        reference.CopyFrom(state.original)
        reference_index = GraphIndex(from_proto(reference), shapes)
        reference_stream = _stream(reference_index)
        plan = plan_hidden(reference_stream, reference_index, state.original, state.batches, state.options.hidden)
        slice_stream(reference_index, reference_stream, plan.full, plan.fold, plan.centre)
        difference = relative_difference(run(state.original, state.batches[0]), run(reference, state.batches[0]))
        if not difference <= REFERENCE_TOLERANCE:
            raise OutputError(f"internal error: --hidden's rewrite without slicing changed the outputs (max relative "
                              f"difference {difference:.3g} on the first calibration batch); nothing was written. "
                              "Please report this with the model.")
        kept = plan.sliced.shape[1]
        state.changed |= slice_stream(state.index, stream, plan.sliced, plan.fold, plan.centre)
        try:  # a width this module did not see (a constant in a reshape of some other tensor) fails only at run time
            run(state.model.proto, state.batches[0])
        except Exception as exc:  # onnxruntime raises its own types
            raise ConfigError(f"--hidden cannot slice this model's hidden width: the sliced model does not run "
                              f"({short_message(exc)})") from None
        outputs = {o.name for o in state.model.proto.graph.output}  # keep their width (projected back)
        state.kept.update({Dim(t, rank + stream.axes[t]): plan.kept for t, rank in stream.ranks.items()
                           if t not in outputs})
        state.original = reference
        state.rebuild_index()
        state.report.structure_changed = True
        if state.proof is not None:  # --verify proved the channel removal, which this step then changes on purpose
            state.proof += "; then --hidden removed hidden width on purpose (an approximation of the verified model)"
        state.report.hidden = HiddenRow("post-LN" if plan.post_ln else "pre-LN", plan.treatment, stream.width, kept,
                                        len(stream.norms), len(stream.writers), len(stream.readers),
                                        plan.variance_kept, difference)


def _stream(index: GraphIndex) -> Stream:
    stream = find_stream(index)
    if isinstance(stream, str):
        raise ConfigError(f"--hidden cannot slice this model's hidden width: {stream}")
    return stream
