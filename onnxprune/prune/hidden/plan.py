"""Choose the basis of the hidden stream from calibration data: which treatment a model gets, and what it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.data.probe import Probe
from onnxprune.graph.index import GraphIndex
from onnxprune.prune.hidden.basis import (StreamCovariance, channel_scores, keep_count, principal_basis,
                                          selection)
from onnxprune.prune.hidden.stream import Stream


@dataclass
class HiddenPlan:
    """``full`` [d, d] rewrites the model into an exact equivalent (the reference); ``sliced`` [d, k] is its first
    k columns. ``kept``: the reference's indices the sliced model keeps (0..k-1 after a rotation)."""

    post_ln: bool
    full: np.ndarray
    sliced: np.ndarray
    kept: np.ndarray
    fold: bool  # norms become RMSNorm, their scale and shift move into the readers (pre-LN)
    centre: bool  # writers subtract their mean (pre-LN with LayerNorm)
    variance_kept: float | None  # pre-LN: share of the normalised stream's variance in the kept directions

    @property
    def treatment(self) -> str:
        if self.post_ln:
            return "post-LN: channels kept by activation x reader-weight score, norms over fewer channels " \
                   "(approximate; recovery re-fits readers and writers)"
        return ("pre-LN: " + ("writers centred, LayerNorm -> RMSNorm, " if self.centre else "")
                + "one PCA rotation of the stream (exact before slicing), last components sliced")


def plan_hidden(stream: Stream, index: GraphIndex, original: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                fraction: float) -> HiddenPlan:
    """The basis for removing ``fraction`` of the hidden width of ``stream`` (found in ``index``), measured on the
    ``original`` model's activations for ``batches``."""
    width = stream.width
    keep = keep_count(width, fraction)
    if stream.post_ln:
        scores = _post_ln_scores(stream, index, original, batches)
        kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
        return HiddenPlan(True, np.eye(width), selection(width, kept), kept, False, False, None)
    centre = not stream.rms
    covariance = StreamCovariance(width, centre, float(np.mean([n.epsilon for n in stream.norms])))
    names = [n.x for n in stream.norms]
    for values in Probe(original, names, batches).iterate(names):
        for v in values:
            covariance.add(v)
    q, variances = principal_basis(covariance.gram)
    share = float(variances[:keep].sum() / variances.sum()) if variances.sum() > 0 else 1.0
    return HiddenPlan(False, q, q[:, :keep], np.arange(keep), True, centre, share)


def _post_ln_scores(stream: Stream, index: GraphIndex, original: onnx.ModelProto,
                    batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    names = [n.y for n in stream.norms]
    energy = [np.zeros(stream.width) for _ in names]
    rows = [0] * len(names)
    for values in Probe(original, names, batches).iterate(names):
        for k, v in enumerate(values):
            flat = v.reshape(-1, v.shape[-1]).astype(np.float64)
            energy[k] += (flat * flat).sum(axis=0)
            rows[k] += len(flat)
    reader_rows = []
    for n in stream.norms:
        total = np.zeros(stream.width)
        for r in stream.readers:
            if r.norm is not n:
                continue
            if r.node is None:
                total += 1.0
                continue
            weight = np.moveaxis(index.const_value(r.node.input[r.slot]).astype(np.float64), r.axis, 0)
            total += (weight * weight).sum(axis=1)
        reader_rows.append(total)
    return channel_scores([e / max(r, 1) for e, r in zip(energy, rows)], reader_rows)
