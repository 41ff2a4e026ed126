"""GPTQ before static int8 quantization (``--quant-recover gptq``): every weight the quantizer will quantize is
rounded, in float, to the very grid the quantizer will use, in OBS order, each rounding error compensated on the
weights of the inputs not rounded yet with the layer's input Hessian from the calibration data (Frantar et al.,
"GPTQ", 2023: the SparseGPT sweep of recovery/obs.py with a grid instead of zeros).

Why it then survives quantization unchanged: onnxruntime's static QDQ quantizer gives each output channel the scale
s = max|w| / 127 (symmetric int8, range -127..127; ``compute_scale_zp``: 2 max|w| / 254, stored as float32) and
stores rint(w / s). A weight that already is q * s (float32) quantizes to q again, so the quantizer reproduces the
rounded values exactly, provided every channel keeps its max|w|: the weight holding it is left as it is (it is on
the grid: +-127 s), like the pruned zeros (0 is on every grid). Both are visited in the sweep but always take back
their original value, so they never keep a compensation, and the error of putting them back is itself compensated.

Which layers: Conv, Gemm and MatMul with a constant float weight not shared between nodes (the QDQ quantizer's
per-channel axis is the layer view's output axis: Conv 0, Gemm 0 with transB else 1, MatMul 1); excluded nodes
stay float. The Hessian is that of the float model's inputs (as with bias correction, the reference is the float
model), and per layer the result is kept only when its output error on the calibration rows, tr(D^T H D) for the
weight change D, is below plain round-to-nearest's; otherwise the layer is left to the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.data.loader import Feed
from onnxprune.data.probe import Probe
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.layers import MAX_ROWS_PER_BATCH, NOT_FITTED, Layer, layer_of
from onnxprune.recovery.obs import Hessian, obs_sweep

QMAX = 127  # symmetric int8: onnxruntime's range is -127..127
DAMP = 0.01  # GPTQ's default damping, relative to the Hessian's mean diagonal
OPS = ("Conv", "Gemm", "MatMul")
ROWS_PER_FEATURE = 2  # conv rows sampled: at least this many per feature over all batches (a wide layer's Hessian
# from fewer rows than features is singular, and rounding fitted to it looks far better on them than it is)


@dataclass
class GptqResult:
    """What :func:`round_layers` did: layers rounded (kept), layers where round-to-nearest was no worse, and their
    summed output error on the calibration rows, round-to-nearest vs GPTQ (over the kept layers)."""

    layers: int = 0
    not_better: int = 0
    error_nearest: float = 0.0
    error_gptq: float = 0.0
    skipped: list[str] = field(default_factory=list)


def grid_scale(w: np.ndarray) -> np.ndarray:
    """The per-column scale onnxruntime gives a [K, O] weight matrix's output channels (float32): 2 max|w| / 254,
    computed in float64 and stored as float32; 1.0 for an all-zero channel (its ``min_scale`` rule)."""
    absmax = np.max(np.abs(w.astype(np.float32)), axis=0).astype(np.float64)
    scale = (2 * absmax / (2 * QMAX)).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)


def to_grid(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The nearest grid points q * scale (q in -127..127), as the quantizer dequantizes them (float32 product)."""
    q = np.clip(np.rint(values / scale.astype(np.float64)), -QMAX, QMAX)
    return (q.astype(np.float32) * scale).astype(np.float64)


def gptq_round(w: np.ndarray, hessian: Hessian, scale: np.ndarray, free: int = 0) -> np.ndarray:
    """Round ``w`` [K, O] onto the grid of ``scale`` [O], compensating on the rows not rounded yet; zeros stay zero
    and each column's largest |w| stays as it is. Rows are visited in descending Hessian diagonal (GPTQ's act
    order: the inputs with the most energy first, while the most rows are left to absorb their error); the last
    ``free`` rows (a bias: the quantizer keeps it nearly continuous, int32) are visited last and only compensate."""
    w = w.astype(np.float64)
    rounded = w.shape[0] - free
    held = w == 0
    held[np.argmax(np.abs(w[:rounded]), axis=0), np.arange(w.shape[1])] = True

    def project(row: int, column: np.ndarray) -> np.ndarray:
        return column if row >= rounded else np.where(held[row], w[row], to_grid(column, scale))

    order = np.argsort(-np.diag(hessian.gram)[:rounded], kind="stable")
    return obs_sweep(w, hessian, rounded, order=order, project=project)


def layer_error(gram: np.ndarray, change: np.ndarray) -> float:
    """||X D||^2 on the calibration rows, from their Gram matrix: tr(D^T G D)."""
    return float(np.sum(change * (gram @ change)))


def _layers(index: GraphIndex, keep_float: set[str]) -> tuple[list[tuple[onnx.NodeProto, Layer]], list[str]]:
    """The layers to round, and why other weighted layers the quantizer will quantize are not (e.g. a weight
    shared by two nodes, a reduction over MAX_FEATURES: its Hessian would not fit)."""
    found, skipped = [], []
    for node in index.graph.node:
        if node.op_type not in OPS or node.name in keep_float:
            continue
        layer = layer_of(index, node)
        if not isinstance(layer, Layer):  # NOT_FITTED: no constant weight (e.g. attention's activation MatMuls)
            if layer != NOT_FITTED:
                skipped.append(f"{node.name or node.output[0]} ({layer})")
        elif layer.weight in index.initializers and index.initializers[layer.weight].data_type == onnx.TensorProto.FLOAT:
            found.append((node, layer))
    return found, skipped


def _grams(proto: onnx.ModelProto, layers: list[tuple[onnx.NodeProto, Layer]], features: list[int],
           batches: list[Feed]) -> list[np.ndarray]:
    """Each layer's Gram matrix X^T X of its input rows (conv: im2col patches at sampled positions), with a last
    feature of ones (the bias's input)."""
    names = list(dict.fromkeys(t for node, _ in layers for t in (node.input[0], node.output[0])))
    grams: list[np.ndarray | None] = [None] * len(layers)
    rng = np.random.default_rng(0)
    for values in Probe(proto, names, batches, label="float model").iterate(names):
        seen = dict(zip(names, values))
        for i, (node, layer) in enumerate(layers):
            limit = max(MAX_ROWS_PER_BATCH, -(-ROWS_PER_FEATURE * features[i] // len(batches)))
            rows, _ = layer.rows(node, seen[node.input[0]], seen[node.output[0]], rng, limit)
            rows = np.hstack([rows, np.ones((len(rows), 1))])  # the bias's input, last
            gram = rows.T @ rows
            grams[i] = gram if grams[i] is None else grams[i] + gram
    return grams


def round_layers(model: LoadedModel, batches: list[Feed], keep_float: tuple[str, ...] = ()) -> GptqResult:
    """Round the weights the static int8 quantizer will quantize onto its grid, GPTQ's way, in place.

    Args:
        model: the float model exactly as the quantizer will read it (after its preprocessing).
        batches: the calibration batches; keep_float: names of nodes the quantizer leaves float.
    """
    result = GptqResult()
    index = GraphIndex(model)
    layers, result.skipped = _layers(index, set(keep_float))
    if not layers or not batches:
        return result
    shapes = [index.initializers[layer.weight].dims for _, layer in layers]
    features = [int(np.prod(dims)) // int(dims[layer.weight_out_axis]) for dims, (_, layer) in zip(shapes, layers)]
    for (node, layer), gram in zip(layers, _grams(model.proto, layers, features, batches)):
        change = _round_layer(index, layer, gram)
        if change is None:
            result.not_better += 1
            continue
        result.layers += 1
        result.error_nearest += change[0]
        result.error_gptq += change[1]
    return result


def _round_layer(index: GraphIndex, layer: Layer, gram: np.ndarray) -> tuple[float, float] | None:
    """Round one layer in place (its bias, when it has one, compensates too): the output error on the calibration
    rows of round-to-nearest and of GPTQ, or None (left as it is) when GPTQ is no better."""
    weight = index.const_value(layer.weight)
    matrix = layer.to_matrix(weight.astype(np.float64))
    k = matrix.shape[0]
    bias = index.const_value(layer.bias).reshape(-1).astype(np.float64) if layer.bias in index.initializers else None
    full = np.vstack([matrix, np.zeros((1, matrix.shape[1])) if bias is None else bias[None, :]])
    scale = grid_scale(matrix)
    nearest, rounded = np.vstack([to_grid(matrix, scale), full[-1:]]), full.copy()
    blocks = [(np.r_[f.start:f.stop, k], o) for f, o in layer.blocks(matrix.shape)]
    free = int(bias is not None)
    for f, o in blocks:
        f = f if free else f[:-1]
        rounded[np.ix_(f, np.arange(o.start, o.stop))] = gptq_round(full[np.ix_(f, np.arange(o.start, o.stop))],
                                                                   Hessian(gram[np.ix_(f, f)], DAMP), scale[o], free)
    before = sum(layer_error(gram[np.ix_(f, f)], (nearest - full)[f, o]) for f, o in blocks)
    after = sum(layer_error(gram[np.ix_(f, f)], (rounded - full)[f, o]) for f, o in blocks)
    if not after < before:
        return None
    index.initializers[layer.weight].CopyFrom(numpy_helper.from_array(
        layer.from_matrix(rounded[:k], weight.shape).astype(np.float32), layer.weight))
    if bias is not None:
        shape = numpy_helper.to_array(index.initializers[layer.bias]).shape
        index.initializers[layer.bias].CopyFrom(numpy_helper.from_array(
            rounded[k].reshape(shape).astype(np.float32), layer.bias))
    return before, after
