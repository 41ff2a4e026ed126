"""``--recover lsq``: re-fit each changed layer in closed form so it reproduces the original model's output.

Each 2-D Conv (grouped ones group by group), Gemm and MatMul with a constant weight that sits downstream of a change
is re-solved in closed form (ridge least squares) so that, on the pruned model's *own* activations, it reproduces
the original model's output at that point (He et al. 2017; ThiNet). Zeroed weights stay zero: every output row is
solved on its own support, or, for layers too wide for that, updated by one OBS sweep (recovery/obs.py). With
``--criterion obs`` the zeros are chosen here too, by that sweep. A new solution is kept only if it lowers the
layer's calibration error, cross-validated when there are few calibration rows per feature. Where a layer's output
only reaches a Relu the fit is refined for what the Relu passes on, and the whole sweep is compared with a plain
one (:func:`_compare_plain`).

The maths is in solvers.py and obs.py (pure numpy); this module decides what to fit, on which rows, and what to keep.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError
from onnxprune.finite import first_nonfinite, require_finite
from onnxprune.graph.index import GraphIndex, node_label
from onnxprune.graph.layers import LSQ_OPS, MAX_ROWS_PER_BATCH, NOT_FITTED, Layer, layer_of
from onnxprune.recovery.fit_order import sole_use
from onnxprune.recovery.obs import Hessian, obs_sweep
from onnxprune.recovery.recover import LayerFix, Recovery, RecoveryResult, sweep
from onnxprune.recovery.registry import get, register
from onnxprune.recovery.solvers import EXACT_FLOPS, Normal, one_sided, refit, relu_refit, relu_steps

# fewer calibration rows than this many per feature: re-fits are cross-validated (and conv layers sample at least
# this many rows per feature over all batches, for a well-posed Gram matrix)
CROSS_CHECK_ROWS = 2


@register("lsq", "least-squares re-fit of each layer", chooses_zeros=True, ops=LSQ_OPS, shortcut_first=True)
class LeastSquares:
    """One lsq sweep; ``relu_aware``: refine fits whose output only reaches a Relu (solvers.relu_refit)."""

    def __init__(self, job: Recovery, relu_aware: bool = True) -> None:
        self.job = job
        self.relu_aware = relu_aware
        self.relu_fits = 0  # layers the refinement ran on: then the sweep is compared with a plain one

    def fix(self, node: onnx.NodeProto) -> LayerFix | str | None:
        layer = layer_of(self.job.index, node)
        if isinstance(layer, Layer):
            return self.fix_lsq(node, layer)
        return None if layer == NOT_FITTED else f"{node_label(node)}: lsq skipped ({layer})"

    def finish(self, result: RecoveryResult, backup: onnx.ModelProto) -> None:
        if self.relu_fits:
            _compare_plain(result, self.job, backup)

    def fix_lsq(self, node: onnx.NodeProto, layer: Layer) -> LayerFix:
        """Re-fit one layer, block by block (the groups of a grouped conv; one block otherwise), and keep each
        block's result only if it lowers that block's error."""
        weight = self.job.index.const_value(layer.weight).astype(np.float64)
        w_mat = layer.to_matrix(weight)  # [K, O]
        bias = self.job.index.const_value(layer.bias).astype(np.float64).reshape(-1) if layer.bias else None
        added = following_bias(self.job.index, node, w_mat.shape[1]) if bias is None else None
        if bias is None and (layer.can_add_bias or added):  # a free intercept: the pruned inputs' means shift it
            bias = np.zeros(w_mat.shape[1])
        w_full = np.vstack([w_mat, bias[None, :]]) if bias is not None else w_mat
        blocks = layer.blocks(w_mat.shape)
        new, before, after, kinds = w_full.copy(), 0.0, 0.0, set()
        for (features, outputs), (folds, relu_rows) in zip(blocks, self._normal_equations(node, layer, blocks,
                                                                                         bias is not None)):
            w_block = np.vstack([w_mat[features, outputs], bias[None, outputs]]) if bias is not None \
                else w_mat[features, outputs]
            prunable = features.stop - features.start
            try:
                fitted, error_before, error_after, kind = self._fit_block(node, layer, weight.shape, w_block,
                                                                          prunable, folds, relu_rows, outputs)
            except np.linalg.LinAlgError as exc:  # a singular system despite the damping: keep this block as it is
                self.job.notes.append(f"{node_label(node)}: lsq fit failed ({exc}); the layer keeps its weights there")
                fitted, kind = w_block, "lsq"
                error_before = error_after = (folds[0] + folds[1]).error(w_block)
            before += error_before
            if error_after < error_before:
                new[features, outputs] = fitted[:prunable]
                if bias is not None:
                    new[-1, outputs] = fitted[-1]
                after += error_after
                kinds.add(kind)
            else:
                after += error_before
        accepted = bool(kinds)
        if accepted:
            self.job.set_const(layer.weight, layer.from_matrix(new[: w_mat.shape[0]], weight.shape).astype(np.float32))
            if layer.bias:
                self.job.set_const(layer.bias, new[-1].reshape(self.job.index.shape(layer.bias)).astype(np.float32))
            elif added:  # the intercept fitted on top of the MatMul's output moves into the Add's constant
                old = self.job.index.const_value(added)
                self.job.set_const(added, (old + new[-1].reshape(old.shape)).astype(old.dtype))
            elif bias is not None:
                add_bias(self.job, node, layer, new[-1])
        return LayerFix(node_label(node), "obs" if "obs" in kinds else "lsq", before, after, accepted)

    def _fit_block(self, node: onnx.NodeProto, layer: Layer, shape: tuple[int, ...], w_full: np.ndarray,
                   prunable: int, folds: list[Normal], relu_rows: list | None,
                   outputs: slice) -> tuple[np.ndarray, float, float, str]:
        """(new weights, error before, error after, "lsq" or "obs") of one block.

        With at least CROSS_CHECK_ROWS calibration rows per feature the fit uses all rows and, where the output only
        reaches a Relu, is refined for what the Relu passes on. With fewer, a fit can memorise the calibration data:
        each half of the rows is fitted on its own, judged on the other half (two-fold cross-validation), and the
        *average* of the two half-fits is used. Its expected error on new data is at most the mean of theirs
        (squared error is convex), which is what the cross-validation measured; a fit on all rows has no such bound
        when there are fewer rows than features (the min-norm fit's error grows towards rows = features).
        """
        total = folds[0] + folds[1]
        before = total.error(w_full)
        masks = self._supports(node, total, layer, shape, w_full, prunable)
        cross_checked = total.rows < CROSS_CHECK_ROWS * len(total.gram)
        if cross_checked:
            halves = [[refit(Hessian(f.gram, self.job.damp), f.cross, m, prunable) for f in folds] for m, _ in masks]
            judged = [folds[1].error(a) + folds[0].error(b) if self._finite(node, "lsq fit", (a + b) / 2)
                      else np.inf for a, b in halves]
            best = int(np.argmin(judged))
            new, after = (halves[best][0] + halves[best][1]) / 2, judged[best]
        else:
            hessian = Hessian(total.gram, self.job.damp)
            fitted = [refit(hessian, total.cross, m, prunable, start=start) for m, start in masks]
            judged = [total.error(c) if self._finite(node, "lsq fit", c) else np.inf for c in fitted]
            best = int(np.argmin(judged))
            new, after = fitted[best], judged[best]
        if not np.isfinite(after):  # every candidate was dropped (noted): the block keeps its weights
            return w_full, before, before, "lsq"
        if relu_rows and not cross_checked:  # judged on what the Relu passes on, and re-fitted for it
            a, y, floor = (np.concatenate(part) for part in zip(*relu_rows))
            sign = self.job.floor_sign(node)
            sign = sign[outputs] if np.ndim(sign) else np.full(y.shape[1], sign)
            before = one_sided(a, y, floor, sign, w_full)
            support = masks[best][0]
            refined = None
            if support.all() or float(np.sum(support.sum(0).astype(np.float64) ** 3)) <= EXACT_FLOPS:
                self.relu_fits += 1
                refined = relu_refit(a, y, floor, sign, new, support, hessian, relu_steps(len(a), *w_full.shape))
            if refined is not None and self._finite(node, "Relu-aware refinement", refined[0]):
                new, after = refined
            else:
                after = one_sided(a, y, floor, sign, new)
        return new, before, after, "obs" if best == 1 else "lsq"

    def _normal_equations(self, node: onnx.NodeProto, layer: Layer, blocks: list[tuple[slice, slice]],
                          with_bias: bool) -> list[tuple[list[Normal], list | None]]:
        """Per block: two folds of normal equations (rows split at random) and, when the output only reaches a Relu
        and the refinement is affordable, the rows themselves (float32) with the Relu floor of every target."""
        problems: list[list] = [[[Normal(f.stop - f.start + with_bias, o.stop - o.start) for _ in range(2)], []]
                                for f, o in blocks]
        rng = np.random.default_rng(0)
        widest = max(f.stop - f.start for f, _ in blocks) + with_bias
        limit = max(MAX_ROWS_PER_BATCH, -(-CROSS_CHECK_ROWS * widest // len(self.job.batches)))
        for x_p, target, floor in self.job.targets(node, layer):
            if floor is not None:  # sampled at the same rows as the targets
                target = np.concatenate([target, floor], axis=layer.out_axis)
            a_all, y_all = layer.rows(node, x_p, target, rng, limit)
            floors = y_all[:, y_all.shape[1] // 2:] if floor is not None else None
            half = rng.random(len(a_all)) < 0.5
            for (features, outputs), problem in zip(blocks, problems):
                a = a_all if features.stop - features.start == a_all.shape[1] else a_all[:, features]
                if with_bias:
                    a = np.hstack([a, np.ones((a.shape[0], 1))])
                y = y_all[:, outputs]
                # grouped convs keep the plain fit: refining the depthwise convs of the inverted-residual digits CNN
                # made the Relu-aware sweep much worse (--sparsity 0.8, mean of five draws: 76.1% -> 61.0%)
                if floors is None or problem[1] is None or not self.relu_aware or layer.groups > 1 \
                        or relu_steps(len(a) * len(self.job.batches), a.shape[1], y.shape[1]) < 3:
                    problem[1] = None
                else:
                    problem[1].append((a.astype(np.float32), y.astype(np.float32),
                                       floors[:, outputs].astype(np.float32)))
                problem[0][0].add(a[half], y[half])
                problem[0][1].add(a[~half], y[~half])
        return [(folds, relu_rows) for folds, relu_rows in problems]

    def _finite(self, node: onnx.NodeProto, what: str, fit: np.ndarray) -> bool:
        """Whether a fit is finite; when not, a note names the layer and the fit is not used."""
        found = first_nonfinite(fit)
        if found is not None:
            self.job.notes.append(f"{node_label(node)}: the {what} has {found[1]} at feature row {found[0]}; not used")
        return found is None

    def _supports(self, node: onnx.NodeProto, total: "Normal", layer: Layer, shape: tuple[int, ...],
                  w_full: np.ndarray, prunable: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Candidate supports (non-zero patterns) to re-fit on, each with the OBS-swept weights that chose it (or
        None): the current zeros, and with --criterion obs zeros chosen here on the pruned model's activations.
        Rows past the weight matrix (the bias) are always free."""
        current = w_full != 0
        current[prunable:] = True
        found = [(current, None)]
        # a grouped conv keeps wanda's zeros: the OBS sweep starts from the dense solution, which is not block-diagonal
        choice = self.job.reselect.get(layer.weight) if layer.groups == 1 else None
        if choice is not None:
            hessian = Hessian(total.gram, self.job.damp)
            chosen = obs_sweep(hessian.solve(total.cross), hessian, prunable, zeros=choice.zeros,
                               pattern=choice.pattern, order=layer.pattern_order(shape, choice.pattern))
            if not self._finite(node, "OBS choice of zeros", chosen):  # the pruning's own zeros stay
                return found
            mask = chosen != 0
            mask[prunable:] = True
            found.append((mask, chosen))
        return found



def following_bias(index: GraphIndex, node: onnx.NodeProto, outputs: int) -> str | None:
    """The constant [outputs] added right after a bias-free MatMul, or None.

    Why: exporters write a Linear layer as MatMul + Add(bias), so the MatMul alone has no intercept to fit, and the
    mean that removed FFN neurons contributed (GELU outputs are not centred) stayed lost. The fitted intercept is
    added to that constant (its only reader)."""
    if node.op_type != "MatMul":
        return None
    use = sole_use(index, node.output[0])
    if use is None or use.node.op_type != "Add":
        return None
    other = use.node.input[1 - use.index]
    shape = index.shape(other) if index.is_constant(other) else None
    if shape is None or not shape or shape[-1] != outputs or int(np.prod(shape)) != outputs \
            or len(index.consumers_of(other)) != 1:
        return None
    return other


def add_bias(job: Recovery, node: onnx.NodeProto, layer: Layer, values: np.ndarray) -> None:
    """Give a bias-free Conv/Gemm the intercept its re-fit found (as its optional third input)."""
    require_finite(values, f"internal error: recovery computed a bias for {node_label(node)}", OnnxPruneError,
                   "index", "nothing was written; please report this with the model")
    index = job.index
    dtype = onnx.helper.tensor_dtype_to_np_dtype(index.const_tensor(layer.weight).data_type)
    name = index.add_initializer(index.fresh_name(f"{layer.weight}_bias"), values.astype(dtype))
    index.set_input(node, 2, name)
    layer.bias = name
    job.model_changed()


def _compare_plain(result: RecoveryResult, job: Recovery, backup: onnx.ModelProto) -> None:
    """Re-run lsq without the Relu-aware refinement and keep whichever ends closer to the original outputs.

    Why: the refinement lowers every layer's error after its Relu, and on residual CNNs it ends better, but on an
    inverted-residual digits CNN (models/digits_mobile.onnx) with --sparsity 0.7/0.8 the plain fit ended better
    (held-out top-1 90.2% vs 88.5% and 79.3% vs 76.1%, mean of five calibration draws) although each layer's own
    error was lower with the refinement. Choosing by the calibration output error beat either fit alone on average
    over 40 runs (tools/bench_relu_refit.py), at twice the cost.
    """
    pruned = job.pruned
    refined = onnx.ModelProto()
    refined.CopyFrom(pruned.proto)
    pruned.proto.CopyFrom(backup)
    job.original_probe.close()  # the first sweep's sessions are not needed again: free their memory first
    job.pruned_probe().close()
    plain = Recovery(job.original, pruned, job.kept, job.batches, job.changed, job.damp, job.reselect)
    trial = RecoveryResult(result.method)
    error = sweep(plain, get(result.method), LeastSquares(plain, relu_aware=False), trial,
                  f"recovery {result.method} (plain fit)")
    refined_error = result.output_error_after
    if error < refined_error:  # the plain sweep's notes replace the first's (fits it dropped may differ)
        result.layers, result.output_error_after, result.notes = trial.layers, error, trial.notes
        result.notes.append(f"plain lsq kept: output error {error:.4g} on the calibration data, "
                            f"{refined_error:.4g} with the Relu-aware refinement")
    else:
        pruned.proto.CopyFrom(refined)
        result.notes.append(f"Relu-aware lsq kept: output error {refined_error:.4g} on the calibration data, "
                            f"{error:.4g} with the plain fit")
