"""Training-free recovery from calibration data: the driver every ``--recover`` method runs under.

:func:`recover` measures the pruned model's output error, sweeps the layers downstream of what pruning changed in
fit order (fit_order.py), handing each to the chosen method's fitter (registry.py; bn.py, lsq.py), and undoes the
whole recovery when the graph outputs did not get closer to the original on the calibration data. The shared state
(:class:`Recovery`) holds what every method needs: the two probes (original and pruned activations), a layer's
fitting targets, and writing a constant back.

Only small statistics are held (per-channel moments, one Gram matrix at a time); activations are requested from
onnxruntime two tensors at a time.

Nothing non-finite is kept or reported: activations are checked by the Probe, a fit with NaN or inf is dropped and a
note names the layer (the layer keeps its weights), and a value about to be written or an output error that is still
not finite is an error.
"""

from __future__ import annotations

import time
from itertools import repeat
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.channels import Dim
from onnxprune.data.probe import Probe
from onnxprune.errors import DataError, OnnxPruneError
from onnxprune.finite import require_finite
from onnxprune.graph.index import GraphIndex, attr
from onnxprune.graph import io
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.layers import Layer
from onnxprune.progress import progress
from onnxprune.recovery.fit_order import fit_order, relu_after, residual_branch, sole_use
from onnxprune.recovery.padding import drop_padding, mask_input, real_rows
from onnxprune.recovery.registry import Fitter, RecoveryMethod, get

@dataclass
class LayerFix:
    node: str
    kind: str
    error_before: float
    error_after: float
    accepted: bool


@dataclass(frozen=True)
class Reselect:
    """For ``--criterion obs``: how many of a weight's entries to zero (or the N:M pattern) when its layer is
    re-fitted; the zeros themselves are chosen then."""

    zeros: int | None
    pattern: tuple[int, int] | None = None


@dataclass
class RecoveryResult:
    """What recovery did; ``output_error_*`` are relative squared errors of the graph outputs against the original
    model on the calibration data, before and after recovery."""

    method: str
    layers: list[LayerFix] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    output_error_before: float | None = None
    output_error_after: float | None = None
    kept: bool = True
    steps: list[tuple[float | None, float | None]] = field(default_factory=list)  # --steps: (before, after) of
    # each round, each against the model the round started from; output_error_* then span all rounds


def output_error(original: onnx.ModelProto, pruned: LoadedModel, batches: list[dict[str, np.ndarray]]) -> float:
    """Relative squared error of every graph output of ``pruned`` against ``original`` on ``batches``."""
    names = [o.name for o in pruned.proto.graph.output]
    return _output_error(Probe(original, names, batches, pruned.base_dir),
                         Probe(pruned.proto, names, batches, pruned.base_dir, "pruned model"), pruned.proto,
                         mask_input(original))


def _output_error(original: Probe, pruned: Probe, proto: onnx.ModelProto, mask: str | None = None) -> float:
    """Relative squared error over every float output, padding positions of a token model left out (padding.py)."""
    names = [o.name for o in proto.graph.output]
    num = den = 0.0
    feeds = original.batches if mask is not None else repeat({})  # the feeds are read only for the mask
    for feed, ref, got in zip(feeds, original.iterate(names), pruned.iterate(names)):
        for r, g in zip(ref, got):
            if r.shape == g.shape and np.issubdtype(r.dtype, np.floating):
                keep = real_rows(feed, mask, r)
                r, g = drop_padding(r, keep), drop_padding(g, keep)
                num += float(np.sum((r.astype(np.float64) - g) ** 2))
                den += float(np.sum(r.astype(np.float64) ** 2))
    error = num / den if den else 0.0
    require_finite(np.float64(error), "the output error on the calibration data", DataError)
    return error


def _downstream(graph: onnx.GraphProto, changed: set[str]) -> set[str]:
    """Tensors whose values may differ from the original: outputs of nodes reading changed tensors."""
    affected = set(changed)
    for node in graph.node:
        if any(name in affected for name in node.input):
            affected.update(node.output)
    return affected


class Recovery:
    """One recovery run's state: the models, their probes on the calibration data, and what pruning changed.

    Args:
        kept: kept original indices of every shrunk dim (from structured pruning; empty for unstructured).
        changed: names of constants that pruning modified; only layers downstream of them are revisited.
        damp: ridge damping of least-squares fits (relative to the Gram matrix's mean diagonal).
        reselect: weights whose zeros the fit chooses itself (``--criterion obs``), with how many to zero.
    """

    def __init__(self, original: onnx.ModelProto, pruned: LoadedModel, kept: dict[Dim, np.ndarray],
                 batches: list[dict[str, np.ndarray]], changed: set[str], damp: float,
                 reselect: dict[str, Reselect]) -> None:
        self.original = original
        self.reselect = reselect
        self.changed = changed
        self.pruned = pruned
        self.kept = kept
        self.batches = batches
        self.damp = damp
        self.index = GraphIndex(pruned)
        self.affected = _downstream(pruned.proto.graph, changed)
        tensors = [n for node in pruned.proto.graph.node for n in node.output if n]
        self.original_probe = Probe(original, tensors, batches, pruned.base_dir)
        self._pruned_probe: Probe | None = None
        self._tensors = tensors
        self.notes: list[str] = []  # fits dropped for NaN/inf or a failed solve, one line per layer
        self.mask = mask_input(original)  # a token model's attention mask: padding rows are neither fitted nor scored

    def pruned_probe(self) -> Probe:
        if self._pruned_probe is None:
            self._pruned_probe = Probe(self.pruned.proto, self._tensors, self.batches, self.pruned.base_dir,
                                       "pruned model")
        return self._pruned_probe

    def output_error(self) -> float:
        return _output_error(self.original_probe, self.pruned_probe(), self.pruned.proto, self.mask)

    def revisits(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` is downstream of a change: its activation input or one of its constants differs."""
        input_changed = node.input and node.input[0] in self.affected
        return bool(input_changed or any(n in self.changed for n in node.input[1:]))

    def targets(self, node: onnx.NodeProto, layer: Layer):
        """Per batch: (the layer's input in the pruned model, what its output should be, the ReLU floor or None), in
        pruned channels.

        Normally the target is the original model's output of the layer. When the layer ends a residual branch
        (layer -> [BatchNormalization] -> Add with the shortcut), it is what would make the *sum* match the original
        given the pruned model's shortcut: the branch then also corrects the error the shortcut carries.

        The floor: when the output only reaches a Relu (through the optional BatchNormalization and Add), every
        value on the far side of it (``sign * (value - floor) <= 0``, sign per channel) becomes the same zero, so a
        target there only needs the prediction to stay there too.
        """
        pruned = self.pruned_probe()
        residual = residual_branch(self.index, node) if layer.kernel is not None else None
        if residual is None:
            out_idx = self.kept.get(Dim(node.output[0], layer.out_axis))
            norm, relu = relu_after(self.index, node.output[0])
            if norm is not None and layer.out_axis != 1:
                relu = None
            for feed, (x_p,), (y_o,) in zip(self.batches, pruned.iterate([node.input[0]]),
                                            self.original_probe.iterate([node.output[0]])):
                y = y_o if out_idx is None else np.take(y_o, out_idx, axis=layer.out_axis)
                floor = None
                if relu is not None:
                    zero = np.zeros([1] * y.ndim)
                    floor = np.broadcast_to(zero if norm is None else self._unnormalise(norm, zero, 1), y.shape)
                # rows of the last axis (MatMul on [batch, seq, K]): a token model's padding rows are left out
                keep = real_rows(feed, self.mask, x_p) if layer.kernel is None and layer.out_axis == y.ndim - 1 \
                    else None
                if keep is not None and y.shape[:2] == x_p.shape[:2]:
                    x_p, y = drop_padding(x_p, keep), drop_padding(y, keep)
                    floor = None if floor is None else drop_padding(floor, keep)
                yield x_p, y, floor
            return
        add, other, norm = residual
        use = sole_use(self.index, add.output[0])
        relu = use is not None and use.node.op_type == "Relu"
        sum_idx = self.kept.get(Dim(add.output[0], 1))
        for (x_p, other_p), (sum_o,) in zip(pruned.iterate([node.input[0], other]),
                                            self.original_probe.iterate([add.output[0]])):
            wanted = (sum_o if sum_idx is None else np.take(sum_o, sum_idx, axis=1)) - other_p
            floor = -other_p if relu else None
            if norm is not None:
                wanted = self._unnormalise(norm, wanted, 1)
                floor = None if floor is None else self._unnormalise(norm, floor, 1)
            yield x_p, wanted, floor

    def _unnormalise(self, norm: onnx.NodeProto, values: np.ndarray, axis: int) -> np.ndarray:
        """Invert a BatchNormalization: z = (t - beta) * sqrt(var + eps) / gamma + mean."""
        gamma, beta, mean, var = (self.index.const_value(norm.input[i]).astype(np.float64) for i in range(1, 5))
        eps = float(attr(norm, "epsilon", 1e-5))
        shape = [1] * values.ndim
        shape[axis] = -1
        gamma = np.where(np.abs(gamma) > 1e-6, gamma, 1e-6)
        return ((values - beta.reshape(shape)) * np.sqrt(var + eps).reshape(shape) / gamma.reshape(shape)
                + mean.reshape(shape))

    def floor_sign(self, node: onnx.NodeProto) -> np.ndarray | float:
        """Per output channel, +1 where larger layer outputs mean larger Relu inputs (-1 behind a negative BN scale)."""
        residual = residual_branch(self.index, node)
        norm = residual[2] if residual is not None else relu_after(self.index, node.output[0])[0]
        return 1.0 if norm is None else np.where(self.index.const_value(norm.input[1]) < 0, -1.0, 1.0)

    def set_const(self, name: str, value: np.ndarray) -> None:
        require_finite(value, f"internal error: recovery computed weight '{name}'", OnnxPruneError, "axis-0 index",
                       "nothing was written; please report this with the model")
        self.index.set_constant(name, value)
        self.index.forget_value(name)
        self.model_changed()

    def model_changed(self) -> None:
        """Weights or inputs were rewritten: the next pruned activations come from a new session."""
        self._pruned_probe = None

    def paired(self, tensor: str):
        """(original value, pruned value) of ``tensor`` for each calibration batch."""
        pruned = self.pruned_probe()
        for (o,), (p,) in zip(self.original_probe.iterate([tensor]), pruned.iterate([tensor])):
            yield o, p


def recover(original: onnx.ModelProto, pruned: LoadedModel, kept: dict[Dim, np.ndarray],
            batches: list[dict[str, np.ndarray]], method: str, changed: set[str], damp: float = 0.01,
            reselect: dict[str, Reselect] | None = None) -> RecoveryResult:
    """Run ``method`` (a registered name: "bn", "lsq", ...) on ``pruned`` in place, with ``original`` as the
    reference.

    Args:
        kept: kept original indices of every shrunk dim (from structured pruning; empty for unstructured).
        changed: names of constants that pruning modified; only layers downstream of them are revisited.
        reselect: weights whose zeros lsq chooses itself by OBS (``--criterion obs``), with how many to zero.
    """
    chosen = get(method)
    result = RecoveryResult(method)
    if chosen.fitter is None or not batches:
        return result
    if not pruned.runnable():
        result.notes.append(f"recovery skipped: the model is over {io.INLINE_LIMIT_BYTES / 1e9:.1f} GB, so its "
                            "changed weights were streamed to the output instead of being held for onnxruntime")
        return result
    start = time.perf_counter()
    backup = onnx.ModelProto()
    backup.CopyFrom(pruned.proto)
    job = Recovery(original, pruned, kept, batches, changed, damp, reselect or {})
    result.output_error_before = job.output_error()
    fitter = chosen.fitter(job)
    result.output_error_after = sweep(job, chosen, fitter, result)
    fitter.finish(result, backup)
    if not result.output_error_after <= result.output_error_before:  # end-to-end guard: never leave it worse
        pruned.proto.CopyFrom(backup)
        result.kept = False
        result.notes.append(f"recovery {method} did not improve the outputs on the calibration data "
                            f"({result.output_error_before:.4g} -> {result.output_error_after:.4g}); undone")
    result.seconds = time.perf_counter() - start
    return result


def sweep(job: Recovery, method: RecoveryMethod, fitter: Fitter, result: RecoveryResult, label: str = "") -> float:
    """Hand every node of ``method.ops`` downstream of a change to ``fitter``, in fit order (one progress unit
    each); returns the graph outputs' error afterwards."""
    todo = [node for node in fit_order(job.index, method.shortcut_first)
            if node.op_type in method.ops and job.revisits(node)]
    with progress(len(todo), label or f"recovery {method.name}") as advance:
        for node in todo:
            outcome = fitter.fix(node)
            if isinstance(outcome, LayerFix):
                result.layers.append(outcome)
            elif outcome is not None:
                result.notes.append(outcome)
            advance()
    result.notes += job.notes
    return job.output_error()
