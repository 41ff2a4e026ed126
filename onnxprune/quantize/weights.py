"""The layers' weights as they will be computed with, read back from a float, QDQ, integer or float16 model, so the
zeros pruning made can be counted after quantization (and proved kept, position by position)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.channels.qdq import dequantize

# op -> (the weight input, the weight's zero point input or None); dynamic quantization renames Conv to ConvInteger
WEIGHT_SLOTS = {"Conv": (1, None), "ConvTranspose": (1, None), "Gemm": (1, None), "MatMul": (1, None),
                "ConvInteger": (1, 3), "MatMulInteger": (1, 3)}
# onnxruntime's dynamic quantizer names a replaced node <name>_quant, a Gemm's <name>_MatMul_quant
QUANTIZED_SUFFIXES = ("_MatMul_quant", "_quant")


def layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name (without the dynamic quantizer's suffix) -> the weight it computes with, dequantized to float64.

    Only constant weights are read: an initializer, or a DequantizeLinear of initializers; other weights are
    activations or computed and have no zeros of pruning's making."""
    constants = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(constants[name]) if name in constants else None

    weights = {}
    for node in model.graph.node:
        slots = WEIGHT_SLOTS.get(node.op_type)
        if slots is None or node.domain not in ("", "ai.onnx") or len(node.input) <= slots[0]:
            continue
        slot, zero_slot = slots
        name = node.input[slot]
        values = constant(name)
        if values is not None:
            zero = constant(node.input[zero_slot]) if zero_slot is not None and len(node.input) > zero_slot else None
            axis = 0  # ConvInteger's and MatMulInteger's per-channel zero points index the output channels
            values = dequantize(values, None, zero, axis if node.op_type == "ConvInteger" else -1)
        elif name in producers and producers[name].op_type == "DequantizeLinear":
            dq = producers[name]
            values = constant(dq.input[0])
            if values is None:
                continue
            scale = constant(dq.input[1])
            zero = constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            values = dequantize(values, scale, zero, axis)
        else:
            continue
        weights[_original_name(node.name)] = values
    return weights


def _original_name(name: str) -> str:
    suffix = next((s for s in QUANTIZED_SUFFIXES if name.endswith(s)), "")
    return name[:len(name) - len(suffix)]


def lost_zeros(before: np.ndarray, after: np.ndarray) -> int:
    """How many exact zeros of ``before`` are not exactly zero in ``after``, position by position (``after`` may be
    the transpose: a Gemm rewritten as a MatMul); for any other layout only the counts can be compared."""
    if before.ndim == 2 and before.shape != after.shape and before.T.shape == after.shape:
        after = after.T
    if before.shape == after.shape:
        return int(np.count_nonzero((before == 0) & (after != 0)))
    return max(0, int(np.count_nonzero(before == 0) - np.count_nonzero(after == 0)))
