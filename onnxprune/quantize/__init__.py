"""Quantization after pruning and recovery (``--quantize``): onnxruntime.quantization run on the pruned model, with
the same calibration batches the prune job already holds, and a check that every pruned zero stays exactly zero."""

from onnxprune.quantize.run import QuantizationResult, quantize_model
from onnxprune.quantize.kinds import KINDS, METHODS

__all__ = ["KINDS", "METHODS", "QuantizationResult", "quantize_model"]
