"""``--recover bn``: moment matching, the cheap recovery that re-fits no weights.

At every BatchNormalization the pruned model's per-channel input statistics are measured and the running
mean/variance are rewritten so that the BN output has the same mean and spread as in the original model (a no-op
when nothing upstream changed); a LayerNormalization's scale and bias get the same per-channel matching of its
output (transformers). Convs and Gemms with a bias and no BN after them get the equivalent bias correction
(the folded-BN case).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import Dim
from onnxprune.data.probe import Moments
from onnxprune.graph.index import attr, node_label
from onnxprune.recovery.padding import drop_padding, real_rows
from onnxprune.recovery.recover import LayerFix, Recovery, RecoveryResult
from onnxprune.recovery.registry import register


@register("bn", "moment matching of BatchNorm/LayerNorm statistics / biases",
          ops=frozenset({"BatchNormalization", "Conv", "Gemm", "LayerNormalization"}))
class MomentMatching:
    """Only nodes whose activation input changed are revisited: a changed weight alone shifts no statistics here."""

    def __init__(self, job: Recovery) -> None:
        self.job = job
        graph = job.pruned.proto.graph
        # outputs that a BatchNormalization normalises: their producer's bias is left to the BN
        self.bn_after = {job.index.producer[n.input[0]].node.output[0] for n in graph.node
                         if n.op_type == "BatchNormalization" and n.input[0] in job.index.producer}

    def fix(self, node: onnx.NodeProto) -> LayerFix | None:
        job = self.job
        if not (node.input and node.input[0] in job.affected):
            return None
        if node.op_type == "BatchNormalization":
            return self.fix_bn(node)
        if node.op_type == "LayerNormalization":
            return self.fix_layer_norm(node)
        if len(node.input) > 2 and node.input[2] and node.output[0] not in self.bn_after \
                and node.output[0] not in job.index.graph_outputs \
                and job.index.is_constant(node.input[2]) and job.index.rank(node.input[2]) == 1:
            return self.fix_bias(node, node.input[2])
        return None

    def finish(self, result: RecoveryResult, backup: onnx.ModelProto) -> None:
        """Nothing to compare: one sweep."""

    def fix_bn(self, node: onnx.NodeProto) -> LayerFix:
        """Moment matching, kept per channel only where it brings the normalised values closer to the original's."""
        job = self.job
        tensor = node.input[0]
        mo, mp = Moments(), Moments()
        cross = None
        for o, p in job.paired(tensor):
            mo.add(o, 1)
            mp.add(p, 1)
            o = _take_axis(o, job.kept, tensor, 1)
            prod = np.moveaxis(o.astype(np.float64) * p, 1, 0).reshape(p.shape[1], -1).sum(1)
            cross = prod if cross is None else cross + prod
        mu_o, var_o = _take(mo.mean, job.kept, tensor, 1), _take(mo.var, job.kept, tensor, 1)
        mu_p, var_p = mp.mean, mp.var
        eo2, ep2, eop = var_o + mu_o ** 2, var_p + mu_p ** 2, cross / max(mp.n, 1)
        eps = float(attr(node, "epsilon", 1e-5))
        mean, var = (job.index.const_value(node.input[i]).astype(np.float64) for i in (3, 4))
        scale = np.sqrt(var + eps)
        sd_o, sd_p = np.sqrt(var_o), np.sqrt(var_p)
        ok = sd_o > 1e-8
        ratio = np.where(ok, sd_p / np.where(ok, sd_o, 1.0), 1.0)
        new_mean = np.where(ok, mu_p - (mu_o - mean) * ratio, mean + (mu_p - mu_o))
        new_scale = scale * ratio

        def error(m: np.ndarray, s: np.ndarray) -> np.ndarray:
            """E[((x_p - m)/s - (x_o - mean)/scale)^2] per channel, from first and second moments."""
            a, b, c, d = 1 / s, -m / s, 1 / scale, -mean / scale
            return (a * a * ep2 + 2 * a * b * mu_p + b * b + c * c * eo2 + 2 * c * d * mu_o + d * d
                    - 2 * (a * c * eop + a * d * mu_p + b * c * mu_o + b * d))

        valid = new_scale > 1e-6
        new_scale = np.where(valid, new_scale, scale)
        before, after = error(mean, scale), error(new_mean, new_scale)
        better = valid & (after < before)
        job.set_const(node.input[3], np.where(better, new_mean, mean).astype(np.float32))
        job.set_const(node.input[4], np.where(better, np.maximum(new_scale ** 2 - eps, 1e-12), var)
                      .astype(np.float32))
        return LayerFix(node_label(node), "bn-moments", float(before.mean()),
                        float(np.where(better, after, before).mean()), bool(better.any()))

    def fix_layer_norm(self, node: onnx.NodeProto) -> LayerFix | str | None:
        """Give a LayerNormalization's output, per channel, the original's mean and spread (at real tokens of a token
        model, recover.py): scale and bias absorb the affine map from the pruned statistics to the original's.

        Measured on bert_tiny (`--recover bn --calib`, held-out cosine at real tokens): 0.975 -> 0.980 at
        `--channels 0.3`, 0.948 -> 0.955 at 0.5. After lsq it changes nothing measurable (README, Transformers), so
        only this method does it."""
        job = self.job
        out = node.output[0]
        rank = job.index.rank(out)
        axis = int(attr(node, "axis", -1))
        if rank is None or axis not in (-1, rank - 1) or len(node.input) < 3 or not node.input[2] \
                or not all(job.index.is_constant(n) for n in node.input[1:3]):
            return f"{node_label(node)}: LayerNorm moments skipped (needs a last-axis norm with constant scale and bias)"
        mo, mp = Moments(), Moments()
        for feed, (o, p) in zip(job.batches, job.paired(out)):
            keep = real_rows(feed, job.mask, o)
            mo.add(drop_padding(o, keep), o.ndim - 1 - (keep is not None))
            mp.add(drop_padding(p, keep), p.ndim - 1 - (keep is not None))
        mu_o, sd_o = _take(mo.mean, job.kept, out, rank - 1), np.sqrt(_take(mo.var, job.kept, out, rank - 1))
        mu_p, sd_p = mp.mean, np.sqrt(mp.var)
        ratio = np.where(sd_p > 1e-8, sd_o / np.maximum(sd_p, 1e-8), 1.0)
        shift = mu_o - ratio * mu_p
        scale, bias = (job.index.const_value(node.input[i]).astype(np.float64) for i in (1, 2))
        job.set_const(node.input[1], (ratio.reshape(scale.shape) * scale).astype(np.float32))
        job.set_const(node.input[2], (ratio.reshape(bias.shape) * bias + shift.reshape(bias.shape)).astype(np.float32))
        before = float(np.mean((mu_o - mu_p) ** 2 + (sd_o - sd_p) ** 2))
        return LayerFix(node_label(node), "ln-moments", before, 0.0, True)

    def fix_bias(self, node: onnx.NodeProto, bias_name: str) -> LayerFix:
        """Shift the bias by the difference of the original and pruned per-channel output means."""
        job = self.job
        out = node.output[0]
        mo, mp = Moments(), Moments()
        axis = 1
        for o, p in job.paired(out):
            mo.add(o, axis)
            mp.add(p, axis)
        shift = _take(mo.mean, job.kept, out, axis) - mp.mean
        bias = job.index.const_value(bias_name).astype(np.float64)
        job.set_const(bias_name, (bias + shift.reshape(bias.shape)).astype(np.float32))
        return LayerFix(node_label(node), "bias-correction", float(np.mean(shift ** 2)), 0.0, True)


def _take(values: np.ndarray, kept: dict[Dim, np.ndarray], tensor: str, axis: int) -> np.ndarray:
    """The entries of an original per-channel array that survive in the pruned tensor."""
    idx = kept.get(Dim(tensor, axis))
    return values if idx is None else values[idx]


def _take_axis(values: np.ndarray, kept: dict[Dim, np.ndarray], tensor: str, axis: int) -> np.ndarray:
    """An original activation cut to the channels that survive in the pruned tensor."""
    idx = kept.get(Dim(tensor, axis))
    return values if idx is None else np.take(values, idx, axis=axis)
