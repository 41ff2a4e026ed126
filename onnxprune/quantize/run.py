"""Quantize a loaded model in place: write it to a temporary folder, let onnxruntime.quantization work on files
there, load the result back. The folder is removed on every path, errors included."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.data.loader import Feed
from onnxprune.errors import ConfigError, OnnxPruneError
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.check import sort_nodes
from onnxprune.quantize.bias import BiasCorrection, correct_biases
from onnxprune.quantize.gptq import GptqResult, round_layers
from onnxprune.quantize.kinds import GEMM_SPLIT, KINDS, QuantJob
from onnxprune.quantize.weights import layer_weights, lost_zeros

HELPER_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INTEGER_OPS = {"ConvInteger", "MatMulInteger"}
# --quant-recover: what static int8 does about its error on the calibration data, before (gptq: weights rounded to
# the quantizer's grid with compensation) and after quantizing (bias: per-channel output means folded into biases)
QUANT_RECOVERY = {"none": (), "bias": ("bias",), "gptq": ("gptq",), "gptq+bias": ("gptq", "bias")}
DEFAULT_QUANT_RECOVERY = "bias"


class ZerosLost(OnnxPruneError):
    """Quantization moved a pruned zero: the promise of symmetric weights broke (a bug; exit 1)."""


@dataclass
class QuantizationResult:
    """What ``--quantize`` did, for the report.

    Attributes:
        kind: the ``--quantize`` choice; method: the calibration method (static int8 only).
        params: weight values of the quantized layers; zeros_before / zeros_after: exact zeros among them.
        float_nodes: nodes of the input that still compute in float32 (excluded, or not quantizable by the kind).
        size_before / size_after: serialized model bytes.
        preprocessed: onnxruntime's quant_pre_process ran (it may fail on some models; then it is skipped).
        bias_correction: static int8 only: the quantization error's per-channel mean folded into the biases, kept
            when it brought the outputs closer to the float model's on the calibration data.
        gptq: static int8 with ``--quant-recover gptq``: the weights rounded to the quantizer's grid beforehand.
    """

    kind: str
    method: str | None
    params: int = 0
    zeros_before: int = 0
    zeros_after: int = 0
    float_nodes: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    preprocessed: bool = False
    bias_correction: BiasCorrection | None = None
    gptq: GptqResult | None = None
    notes: list[str] = field(default_factory=list)


def excluded_nodes(model: onnx.ModelProto, exclude: tuple[str, ...]) -> list[str]:
    """Nodes matching an ``--exclude`` glob by their name or the name of one of their inputs or outputs."""
    return [n.name for n in model.graph.node
            if any(fnmatch.fnmatchcase(x, p) for p in exclude for x in (n.name, *n.input, *n.output))]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization prints calibration progress to stdout and logs advice as root warnings; the CLI's
    stdout is the report, so both are held back (failures still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _preprocess(source: Path, target: Path) -> str | None:
    """onnxruntime's recommended preprocessing (shape inference, graph optimization such as Conv+BN folding);
    returns why it failed, or None. Its symbolic shape inference fails on some models: the caller goes on without."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:  # onnx's shape inference, not the symbolic one: that needs sympy, and results must not depend on it
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    except Exception as exc:  # any failure of an optional step: quantize the model as it is
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None if target.is_file() else "no output written"


def _float_nodes(before: onnx.ModelProto, after: onnx.ModelProto, kind: str, exclude: list[str]) -> list[str]:
    """Nodes of ``before`` that compute in float32 in ``after``."""
    if kind == "fp16":  # the converter keeps exactly the blocked nodes in float32
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        return [n.name for n in after.graph.node if n.name in exclude or n.op_type in DEFAULT_OP_BLOCK_LIST]
    producers = {out: node.op_type for node in after.graph.node for out in node.output}
    present = {n.name: n for n in after.graph.node}
    floats = []
    for node in before.graph.node:
        if node.op_type in HELPER_OPS:
            continue
        now = [present[n] for n in (node.name, node.name + GEMM_SPLIT) if n in present]
        if not now or any(n.op_type in INTEGER_OPS for n in now):
            continue  # replaced by an integer node or fused into a quantized one
        if not any(producers.get(x) in ("DequantizeLinear", "DynamicQuantizeLinear") for n in now for x in n.input):
            floats.append(node.name)
    return floats


def check_request(kind: str, calibrated: bool, external: bool, model: onnx.ModelProto | None = None) -> None:
    """Refuse what cannot be quantized, before any work.

    Raises:
        ConfigError: an unknown kind; static int8 without calibration data; an external-data model; a model that is
            quantized already (onnxruntime's quantizers expect float weights).
    """
    if kind not in KINDS:
        raise ConfigError(f"--quantize {kind}: choose one of {', '.join(KINDS)}")
    if KINDS[kind].needs_calibration and not calibrated:
        raise ConfigError(f"--quantize {kind} calibrates activations and needs calibration data (--calib); "
                          "--quantize int8-dynamic needs none")
    if external:
        raise ConfigError("--quantize: models with external data (or over 2 GB) are not supported yet")
    quantized = sorted({n.op_type for n in (model.graph.node if model is not None else ())
                        if n.op_type in HELPER_OPS | INTEGER_OPS or n.op_type.startswith(("QLinear", "MatMulNBits"))})
    if quantized:
        raise ConfigError(f"--quantize {kind}: the model is quantized already ({', '.join(quantized)}); prune it "
                          "without --quantize")


def quantize_model(model: LoadedModel, kind: str, method: str, batches: list[Feed] | None,
                   exclude: tuple[str, ...] = (), recover: str = DEFAULT_QUANT_RECOVERY) -> QuantizationResult:
    """Replace ``model.proto`` by its quantized form and say what changed.

    Args:
        kind: a key of :data:`~onnxprune.quantize.kinds.KINDS`; method: a key of ``METHODS`` (static int8).
        batches: the calibration batches (static int8 needs them).
        exclude: ``--exclude`` globs; matching nodes stay float.
        recover: static int8: a key of :data:`QUANT_RECOVERY` (bias correction is kept only where it helps).

    Raises:
        ConfigError: static int8 without calibration data; an external-data model; a model quantized already.
        ZerosLost: a weight that was exactly zero is not after quantization.
    """
    check_request(kind, bool(batches), model.external, model.proto)
    if recover not in QUANT_RECOVERY:
        raise ConfigError(f"--quant-recover {recover}: choose one of {', '.join(QUANT_RECOVERY)}")
    steps = QUANT_RECOVERY[recover] if KINDS[kind].needs_calibration and batches else ()
    chosen = KINDS[kind]
    result = QuantizationResult(kind, method if chosen.needs_calibration else None)
    before = onnx.ModelProto()
    before.CopyFrom(model.proto)
    keep_float = excluded_nodes(before, exclude)
    with tempfile.TemporaryDirectory(prefix="onnxprune-quantize-") as folder, _quiet():
        source, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        onnx.save(before, str(source))
        result.size_before = source.stat().st_size
        if chosen.preprocess:
            failure = _preprocess(source, Path(folder) / "preprocessed.onnx")
            result.preprocessed = failure is None
            if failure is None:
                source = Path(folder) / "preprocessed.onnx"
            else:
                result.notes.append(f"--quantize: onnxruntime's preprocessing failed ({failure}); quantized without it")
        reference = source  # the float model the quantized one is compared with
        if "gptq" in steps:
            source = _round_weights(result, reference, Path(folder) / "rounded.onnx", batches, keep_float)
        chosen.run(QuantJob(source, target, batches, method, tuple(keep_float)))
        result.size_after = target.stat().st_size
        quantized = onnx.load(str(target))
        if "bias" in steps:
            result.bias_correction = fix = correct_biases(quantized, onnx.load(str(reference)), batches)
            result.size_after = len(quantized.SerializeToString())
            if fix.layers:
                result.notes.append(
                    f"--quantize {kind}: bias correction of {fix.layers} layers: output error on the calibration data "
                    f"{fix.error_before:.4g} -> {fix.error_after:.4g}, "
                    + ("kept" if fix.kept else "not kept (no better than the plain quantized model)"))
    sort_nodes(quantized.graph)  # the float16 converter appends its input casts at the end
    _count_zeros(result, layer_weights(before), layer_weights(quantized))
    result.float_nodes = _float_nodes(before, quantized, kind, keep_float)
    model.proto.CopyFrom(quantized)
    return result


def _round_weights(result: QuantizationResult, source: Path, target: Path, batches: list[Feed],
                   keep_float: list[str]) -> Path:
    """GPTQ on the float model the quantizer will read (``source``), written to ``target``; returns that file."""
    rounded = LoadedModel(onnx.load(str(source)))
    result.gptq = fit = round_layers(rounded, batches, tuple(keep_float))
    onnx.save(rounded.proto, str(target))
    note = (f"--quantize {result.kind}: GPTQ rounding of {fit.layers} layers: their output error on the calibration "
            f"data {fit.error_nearest:.4g} (round to nearest) -> {fit.error_gptq:.4g}")
    if fit.not_better:
        note += f"; {fit.not_better} layers no better than round to nearest, left to the quantizer"
    if fit.skipped:
        more = f" and {len(fit.skipped) - 5} more" if len(fit.skipped) > 5 else ""
        note += f"; not rounded: {', '.join(fit.skipped[:5])}{more}"
    result.notes.append(note)
    return target


def _count_zeros(result: QuantizationResult, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    lost = []
    for name, weight in before.items():
        if name not in after:
            continue  # kept float (excluded): unchanged
        result.params += weight.size
        result.zeros_before += int(np.count_nonzero(weight == 0))
        result.zeros_after += int(np.count_nonzero(after[name] == 0))
        if lost_zeros(weight, after[name]):
            lost.append(f"{name} ({lost_zeros(weight, after[name])})")
    if lost:
        raise ZerosLost(f"--quantize {result.kind}: pruned zeros did not survive quantization in {', '.join(lost)}")
