"""The quantization kinds (``--quantize``), one small class each in a registry, and the calibration methods.

Why symmetric int8 weights everywhere: with zero point 0, a weight that is exactly 0.0 quantizes to the integer 0 and
dequantizes to exactly 0.0 again, so the zeros pruning made survive quantization (an asymmetric grid would move them
to the nearest multiple of the scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxprune.data.loader import Feed

GEMM_SPLIT = "_MatMul"  # the dynamic quantizer's name for the MatMul half of a Gemm it splits

# --quant-method: the onnxruntime CalibrationMethod member each name stands for
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class QuantJob:
    """One quantization: the float model on disk, where the result goes, and what the options asked for.

    Attributes:
        source: the float model file (preprocessed when onnxruntime's preprocessing succeeded).
        target: the file the quantized model is written to.
        batches: calibration batches (static int8 only).
        method: a key of :data:`METHODS`.
        exclude: names of the nodes to keep float.
    """

    source: Path
    target: Path
    batches: list[Feed] | None
    method: str
    exclude: tuple[str, ...]


class QuantKind:
    """One ``--quantize`` choice. ``run`` writes ``job.target`` from ``job.source``."""

    name: str = ""
    description: str = ""
    needs_calibration: bool = False
    preprocess: bool = True  # onnxruntime recommends quant_pre_process before its int8 quantizers

    def run(self, job: QuantJob) -> None:
        raise NotImplementedError


KINDS: dict[str, QuantKind] = {}


def quant_kind(cls: type[QuantKind]) -> type[QuantKind]:
    """Class decorator: register one instance under ``cls.name``."""
    KINDS[cls.name] = cls()
    return cls


class _BatchReader:
    """Feeds the prune job's calibration batches to onnxruntime's calibrator (a CalibrationDataReader)."""

    def __init__(self, batches: list[Feed]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)


def _weight_options() -> dict[str, object]:
    """Symmetric weights; tensors whose type onnx cannot infer (after onnxruntime's contrib ops, e.g. a fused
    Attention) are float, the only type these models quantize from."""
    return {"WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT}


@quant_kind
class Int8Static(QuantKind):
    name = "int8"
    description = ("static QDQ: per-channel symmetric int8 weights, uint8 activations calibrated on --calib "
                   "(--quant-method)")
    needs_calibration = True

    def run(self, job: QuantJob) -> None:
        from onnxruntime import quantization as q

        class Reader(_BatchReader, q.CalibrationDataReader):
            pass

        q.quantize_static(str(job.source), str(job.target), Reader(job.batches or []), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8,
                          calibrate_method=getattr(q.CalibrationMethod, METHODS[job.method]),
                          nodes_to_exclude=list(job.exclude), extra_options=_weight_options())


@quant_kind
class Int8Dynamic(QuantKind):
    name = "int8-dynamic"
    description = "dynamic: per-channel symmetric int8 weights, activations quantized at run time (MatMul-heavy models)"

    def run(self, job: QuantJob) -> None:
        from onnxruntime import quantization as q

        # it splits a Gemm into <name>_MatMul and <name>_Add before it looks at the exclusions
        exclude = [*job.exclude, *(name + GEMM_SPLIT for name in job.exclude)]
        q.quantize_dynamic(str(job.source), str(job.target), per_channel=True, weight_type=q.QuantType.QInt8,
                           nodes_to_exclude=exclude, extra_options=_weight_options())


@quant_kind
class Float16(QuantKind):
    name = "fp16"
    description = "float16 weights and activations; the model's inputs and outputs stay float32"
    preprocess = False

    def run(self, job: QuantJob) -> None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(job.source))
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(job.exclude))
        onnx.save(converted, str(job.target))


def help_text() -> str:
    return "Quantize the result: " + "; ".join(f"{k.name}: {k.description}" for k in KINDS.values()) + "."


def names() -> list[str]:
    return list(KINDS)
