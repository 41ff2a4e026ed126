"""Unstructured pruning as two passes: zero single weights, then store them sparsely when asked."""

from __future__ import annotations

import onnx

from onnxprune.passes.base import Pass
from onnxprune.passes.criteria import weight_criterion
from onnxprune.passes.state import PruneState
from onnxprune.prune.unstructured import prune_unstructured, to_sparse_storage
from onnxprune.recovery.recover import Reselect


class ZeroWeights(Pass[PruneState]):
    """Zero ``--sparsity`` / ``--pattern`` of the weights by the weight criterion; with ``obs`` the criterion only
    sets how many zeros each tensor gets and recovery chooses which (``state.reselect``)."""

    name = "zero-weights"

    def applies(self, state: PruneState) -> bool:
        return state.options.prunes_weights

    def run(self, state: PruneState) -> None:
        options, report = state.options, state.report
        criterion = weight_criterion(options, state.batches, report, state.too_big)
        report.unstructured = prune_unstructured(state.index, options.sparsity, options.scope, criterion.name,
                                                 options.exclude, options.layer_sparsity, options.min_params,
                                                 options.pattern, state.batches)
        weights = report.unstructured.weights
        state.changed |= {w.name for w in weights if w.zeros_after != w.zeros_before}
        if criterion.recovery_chooses:
            state.reselect = {w.name: Reselect(None if options.pattern else w.zeros_after, options.pattern)
                              for w in weights if not w.skipped and w.name in state.changed}
        if not weights:
            report.notes.append("no prunable weights (constant float weights of Conv, ConvTranspose, Gemm or "
                                "MatMul): weights are unchanged")


class SparseStorage(Pass[PruneState]):
    """Store zeroed weights as sparse initializers where that is smaller and onnxruntime loads the result."""

    name = "sparse-storage"

    def applies(self, state: PruneState) -> bool:
        return state.options.sparse_storage and state.report.unstructured is not None

    def run(self, state: PruneState) -> None:
        model, report = state.model, state.report
        if model.external:
            report.notes.append("--sparse-storage skipped: external-data models keep dense weights")
            return
        backup = onnx.ModelProto()
        backup.CopyFrom(model.proto)
        moved = to_sparse_storage(state.index, [w.name for w in report.unstructured.weights if not w.skipped])
        if not moved:
            report.notes.append("--sparse-storage: no tensor is sparse enough for COO storage to be smaller")
            return
        try:
            import onnxruntime as ort

            model.proto.ir_version = min(model.proto.ir_version, 10)
            ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
            report.notes.append(f"--sparse-storage: {len(moved)} tensors stored as sparse initializers")
        except Exception as exc:  # onnxruntime refuses some sparse layouts: keep the dense model instead
            model.proto.CopyFrom(backup)  # a wholesale restore no index can follow edit by edit: rebuild it
            state.rebuild_index()
            report.notes.append(f"--sparse-storage fell back to dense storage: onnxruntime could not load it ({exc})")
