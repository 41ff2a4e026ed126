"""Bias correction after static int8 quantization: each quantized layer's mean output error on the calibration data,
per output channel, folded into its int32 bias (Nagel et al. 2019, "Data-free quantization", empirical form).

Why: rounding weights and clipping activations shifts a layer's output mean a little in every channel; the shift adds
up along the network. The error is ``float output - dequantized quantized output`` for the same calibration samples,
and its per-channel mean is exactly what a bias can absorb. Layers are corrected one at a time in graph order, each
measured on the quantized model with the earlier corrections in place (so no shift is corrected twice). The reference
is the float model the quantizer worked from (same tensor names: onnxruntime keeps them).

Why not always: on a model with little shift it only moves biases by a rounding step, and on some it overshoots, so
:func:`correct_biases` keeps the result only when the model's outputs end closer to the float model's on the
calibration data (the caller reports which). Zeros of pruning are weights, not biases: they are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.channels.registry import Dim
from onnxprune.data.loader import Feed
from onnxprune.data.probe import Probe, collect_moments

BIAS_SLOT = {"Conv": 2, "Gemm": 2}
RENAMED_OUTPUT = "_QuantizeLinear_Input"  # onnxruntime renames a graph output y it quantizes: y_QuantizeLinear_Input
INT32 = np.iinfo(np.int32)


@dataclass
class BiasCorrection:
    """What :func:`correct_biases` did: layers corrected, and the model-output error (mean squared, against the float
    model on the calibration data) without and with the correction; ``kept`` says which model was kept."""

    layers: int = 0
    error_before: float = 0.0
    error_after: float = 0.0
    kept: bool = False


@dataclass(frozen=True)
class _Layer:
    output: str  # the layer's output in the reference model
    measured: str  # where the quantized model's value is read (after its Q/DQ pair when there is one)
    bias: str  # the int32 initializer behind the bias's DequantizeLinear
    scale: str  # the bias's dequantization scale (per channel or per tensor)


def _layers(quantized: onnx.ModelProto, reference: onnx.ModelProto) -> list[_Layer]:
    """Quantized Conv/Gemm nodes with an int32 bias dequantized from an initializer, whose output the reference has."""
    constants = {t.name: t for t in quantized.graph.initializer}
    producers = {out: node for node in quantized.graph.node for out in node.output}
    known = {out for node in reference.graph.node for out in node.output}
    found = []
    for node in quantized.graph.node:
        slot = BIAS_SLOT.get(node.op_type)
        output = node.output[0].removesuffix(RENAMED_OUTPUT)
        if slot is None or len(node.input) <= slot or output not in known:
            continue
        dq = producers.get(node.input[slot])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in constants:
            continue
        if constants[dq.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        found.append(_Layer(output, _dequantized(quantized, node.output[0]), dq.input[0], dq.input[1]))
    return found


def _dequantized(model: onnx.ModelProto, tensor: str) -> str:
    """``tensor`` as the next layer sees it: the output of the QuantizeLinear -> DequantizeLinear pair after it (the
    pair also applies a Relu the quantizer folded away), or ``tensor`` itself when it is not quantized."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for q in consumers.get(tensor, []):
        if q.op_type == "QuantizeLinear":
            for dq in consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    return tensor


def _channel_means(proto: onnx.ModelProto, tensors: list[str], batches: list[Feed]) -> dict[str, np.ndarray]:
    moments = collect_moments(proto, [Dim(t, 1) for t in tensors], batches)
    return {dim.tensor: m.mean for dim, m in moments.items()}


def _output_error(proto: onnx.ModelProto, reference: dict[str, list[np.ndarray]], batches: list[Feed]) -> float:
    names = list(reference)
    total = count = 0.0
    for i, values in enumerate(Probe(proto, names, batches, label="quantized model").iterate(names)):
        for name, value in zip(names, values):
            diff = value.astype(np.float64) - reference[name][i]
            total += float(np.sum(diff * diff))
            count += diff.size
    return total / max(count, 1.0)


def _fold(proto: onnx.ModelProto, layer: _Layer, error: np.ndarray) -> bool:
    """``bias_int += round(error / scale)``, saturated to int32, in place; False for a bias it cannot read."""
    tensors = {t.name: t for t in proto.graph.initializer}
    bias = numpy_helper.to_array(tensors[layer.bias]).astype(np.int64)
    scale = numpy_helper.to_array(tensors[layer.scale]).astype(np.float64)
    if error.shape != bias.shape:
        return False  # a layout this does not understand (e.g. a bias broadcast from one value): leave it
    step = np.rint(error / np.where(scale == 0, np.inf, scale)).astype(np.int64)
    tensors[layer.bias].CopyFrom(numpy_helper.from_array(np.clip(bias + step, INT32.min, INT32.max).astype(np.int32),
                                                         layer.bias))
    return True


def correct_biases(quantized: onnx.ModelProto, reference: onnx.ModelProto, batches: list[Feed]) -> BiasCorrection:
    """Correct ``quantized``'s int32 biases in place when that brings its outputs closer to ``reference``'s.

    Args:
        quantized: the QDQ model onnxruntime wrote; reference: the float model it was quantized from.
        batches: the calibration batches (the ones the activation ranges were calibrated on).
    """
    result = BiasCorrection()
    layers = _layers(quantized, reference)
    outputs = [o.name for o in reference.graph.output]
    if not layers or not batches:
        return result
    wanted = _channel_means(reference, [layer.output for layer in layers], batches)
    reference_out = {name: [] for name in outputs}
    for values in Probe(reference, outputs, batches, label="float model").iterate(outputs):
        for name, value in zip(outputs, values):
            reference_out[name].append(value.astype(np.float64))
    corrected = onnx.ModelProto()
    corrected.CopyFrom(quantized)
    for layer in layers:
        now = _channel_means(corrected, [layer.measured], batches)[layer.measured]
        result.layers += _fold(corrected, layer, wanted[layer.output] - now)
    result.error_before = _output_error(quantized, reference_out, batches)
    result.error_after = _output_error(corrected, reference_out, batches)
    if result.error_after < result.error_before:
        quantized.CopyFrom(corrected)
        result.kept = True
    return result
