"""Mobile readiness (onnxruntime's own NNAPI/CoreML usability check) and ORT-format export.

Why onnxruntime's checker and not our own list: it ships with the wheel and encodes which ops each mobile provider
takes and how the graph would be split into partitions, which is what decides if NNAPI/CoreML pay off. We call the
same functions as ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` but in-process, and keep the
numbers instead of its log text.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import pathlib
import sys
import tempfile
import types
from pathlib import Path

from onnxprune.errors import OutputError

CHECKS = {
    "nnapi": ("check_nnapi_partitions", None),
    "coreml_neuralnetwork": ("check_coreml_partitions", "coreml_supported_neuralnetwork_ops.md"),
    "coreml_mlprogram": ("check_coreml_partitions", "coreml_supported_mlprogram_ops.md"),
}


def _import_tool(name: str):
    """Import ``onnxruntime.tools.<name>`` without running ``onnxruntime/tools/__init__.py``.

    Why: that ``__init__`` imports torch whenever torch is installed (about 2.5 s) for a helper we never use. A
    temporary stand-in package with the same search path is registered for the import and removed afterwards, so a
    later ``import onnxruntime.tools`` elsewhere still runs the real ``__init__``.
    """
    full = f"onnxruntime.tools.{name}"
    if full in sys.modules or "onnxruntime.tools" in sys.modules or "torch" in sys.modules:
        return importlib.import_module(full)
    spec = importlib.util.find_spec("onnxruntime")
    stub = types.ModuleType("onnxruntime.tools")
    stub.__path__ = [str(pathlib.Path(spec.origin).parent / "tools")]
    stub.__package__ = "onnxruntime.tools"
    sys.modules["onnxruntime.tools"] = stub
    try:
        return importlib.import_module(full)
    finally:
        if sys.modules.get("onnxruntime.tools") is stub:
            del sys.modules["onnxruntime.tools"]


def _partition_dict(info) -> dict:
    return {
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "partitions": info.num_partitions,
        "partition_sizes": [len(group) for group in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "unsupported_due_to_op": info.nodes_unsupported_due_to_op,
        "unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "suitability": info.suitability().name,  # YES / MAYBE / NO, onnxruntime's verdict
    }


def check_mobile(path: str | Path) -> dict:
    """NNAPI and CoreML partitioning of the model as onnxruntime would optimise it (basic level) for mobile.

    Returns ``{"dynamic_inputs": [...], "nnapi": {...}, "coreml_neuralnetwork": {...}, "coreml_mlprogram": {...}}``;
    each provider entry holds node counts, partitions and the verdict, and — when inputs are dynamic —
    ``if_shapes_fixed``: supported nodes, partitions and verdict if the shapes were fixed. Failures become ``{"error": "..."}``.
    """
    try:
        onnx_model_utils = _import_tool("onnx_model_utils")
        uc = _import_tool("mobile_helpers.usability_checker")
    except ImportError as exc:  # pragma: no cover - part of the onnxruntime wheel
        return {"error": f"onnxruntime mobile helpers not available ({exc})"}
    quiet = logging.getLogger("onnxprune.mobile_check")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            optimized = pathlib.Path(tmp) / Path(path).name
            onnx_model_utils.optimize_model(pathlib.Path(path), optimized, use_external_initializers=True)
            model = onnx_model_utils.ModelProtoWithShapeInfo(optimized).model_with_shape_info
            dynamic_inputs, _ = uc.check_shapes(model.graph, quiet)
            result["dynamic_inputs"] = [value.name for value in dynamic_inputs]
            for key, (func_name, config) in CHECKS.items():
                func = getattr(uc, func_name)
                args = (config,) if config else ()
                info = func(model, True, *args)
                entry = _partition_dict(info)
                if dynamic_inputs:
                    fixed = _partition_dict(func(model, False, *args))
                    entry["if_shapes_fixed"] = {k: fixed[k] for k in ("supported_nodes", "partitions", "suitability")}
                result[key] = entry
    except Exception as exc:  # the checker is best effort; never fail validation because of it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["error"] = f"{type(exc).__name__}: {first}"
    return result


def export_ort(model_path: str | Path, out_dir: str | Path) -> list[str]:
    """Write ``<name>.ort`` and ``<name>.required_operators.config`` (for a reduced mobile build) into ``out_dir``.

    Uses onnxruntime's converter with the fixed optimisation style only: the runtime style writes a temporary folder
    beside the input model, and nothing should appear next to the user's files.
    """
    converter = _import_tool("convert_onnx_models_to_ort")
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # silence its INFO "Created config"

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--export-ort {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--export-ort {out}: cannot create folder ({exc.strerror or exc})") from None
    before = {p.name for p in out.iterdir()}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            converter.convert_onnx_models_to_ort(pathlib.Path(model_path), output_dir=out.resolve(),
                                                 optimization_styles=[converter.OptimizationStyle.Fixed])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputError(f"--export-ort: onnxruntime could not convert {model_path} to ORT format ({first})") from None
    stem = Path(model_path).stem
    written = sorted(str(out / p.name) for p in out.iterdir()
                     if p.name.startswith(stem) and (p.name not in before or p.suffix in (".ort", ".config")))
    return written


def ship_for_mobile(model_path: str | Path, out_dir: str | Path, check: bool = True) -> dict:
    """``prune --export-ort DIR`` without ``--validate``: the final model (quantized when ``--quantize`` ran) in ORT
    format, and onnxruntime's NNAPI/CoreML verdict on that same file, so what is shipped is what was checked.

    Returns ``{"ort_export": [files], "mobile": {...} or None}``.

    Raises:
        OutputError: the folder cannot be written or onnxruntime cannot convert the model (exit 4).
    """
    return {"ort_export": export_ort(model_path, out_dir), "mobile": check_mobile(model_path) if check else None}
