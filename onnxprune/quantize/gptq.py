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
from onnxprune.graph.layers import Layer, layer_of
from onnxprune.recovery.obs import Hessian, obs_sweep

QMAX = 127  # symmetric int8: onnxruntime's range is -127..127
DAMP = 0.01  # GPTQ's default damping, relative to the Hessian's mean diagonal
OPS = ("Conv", "Gemm", "MatMul")


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


def gptq_round(w: np.ndarray, hessian: Hessian, scale: np.ndarray) -> np.ndarray:
    """Round ``w`` [K, O] onto the grid of ``scale`` [O], compensating on the rows not rounded yet; zeros stay zero
    and each column's largest |w| stays as it is. Rows are visited in descending Hessian diagonal (GPTQ's act
    order: the inputs with the most energy first, while the most rows are left to absorb their error)."""
    w = w.astype(np.float64)
    held = w == 0
    held[np.argmax(np.abs(w), axis=0), np.arange(w.shape[1])] = True

    def project(row: int, column: np.ndarray) -> np.ndarray:
        return np.where(held[row], w[row], to_grid(column, scale))

    order = np.argsort(-np.diag(hessian.gram), kind="stable")
    return obs_sweep(w, hessian, w.shape[0], order=order, project=project)


def layer_error(gram: np.ndarray, change: np.ndarray) -> float:
    """||X D||^2 on the calibration rows, from their Gram matrix: tr(D^T G D)."""
    return float(np.sum(change * (gram @ change)))


def _layers(index: GraphIndex, keep_float: set[str]) -> tuple[list[tuple[onnx.NodeProto, Layer]], list[str]]:
    found, skipped = [], []
    for node in index.graph.node:
        if node.op_type not in OPS or node.name in keep_float:
            continue
        layer = layer_of(index, node)
        if not isinstance(layer, Layer):
            skipped.append(f"{node.name or node.output[0]} ({layer})")
        elif layer.weight in index.initializers and index.initializers[layer.weight].data_type == onnx.TensorProto.FLOAT:
            found.append((node, layer))
    return found, skipped


def _grams(proto: onnx.ModelProto, layers: list[tuple[onnx.NodeProto, Layer]], batches: list[Feed]
           ) -> list[np.ndarray]:
    """Each layer's Gram matrix X^T X of its input rows (conv: im2col patches at sampled positions)."""
    names = list(dict.fromkeys(t for node, _ in layers for t in (node.input[0], node.output[0])))
    grams: list[np.ndarray | None] = [None] * len(layers)
    rng = np.random.default_rng(0)
    for values in Probe(proto, names, batches, label="float model").iterate(names):
        seen = dict(zip(names, values))
        for i, (node, layer) in enumerate(layers):
            rows, _ = layer.rows(node, seen[node.input[0]], seen[node.output[0]], rng)
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
    for (node, layer), gram in zip(layers, _grams(model.proto, layers, batches)):
        weight = index.const_value(layer.weight)
        matrix = layer.to_matrix(weight.astype(np.float64))
        scale = grid_scale(matrix)
        nearest, rounded = to_grid(matrix, scale), matrix.copy()
        for features, outputs in layer.blocks(matrix.shape):
            block = matrix[features, outputs]
            rounded[features, outputs] = gptq_round(block, Hessian(gram[features, features], DAMP), scale[outputs])
        before = sum(layer_error(gram[f, f], nearest[f, o] - matrix[f, o]) for f, o in layer.blocks(matrix.shape))
        after = sum(layer_error(gram[f, f], rounded[f, o] - matrix[f, o]) for f, o in layer.blocks(matrix.shape))
        if not after < before:
            result.not_better += 1
            continue
        result.layers += 1
        result.error_nearest += before
        result.error_gptq += after
        values = layer.from_matrix(rounded, weight.shape).astype(np.float32)
        index.initializers[layer.weight].CopyFrom(numpy_helper.from_array(values, layer.weight))
    return result
