"""Execution providers: short names, availability checks and session creation.

Why: onnxruntime silently falls back to CPU (with a warning) when asked for a provider its build lacks, so a
"CUDA latency" could really be CPU latency. We check the installed build ourselves and fail with
:class:`ProviderUnavailable` (exit 6), naming what is available and which package brings the missing one.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort

from onnxprune.errors import ConfigError, InputModelError, ProviderUnavailable

ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}

PACKAGES: dict[str, str] = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (plus matching CUDA/cuDNN libraries)",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu (plus TensorRT libraries)",
    "ROCMExecutionProvider": "an onnxruntime ROCm build (AMD GPUs)",
    "MIGraphXExecutionProvider": "onnxruntime-migraphx or an onnxruntime MIGraphX build",
    "DmlExecutionProvider": "pip install onnxruntime-directml (Windows)",
    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino",
    "QNNExecutionProvider": "pip install onnxruntime-qnn (Qualcomm devices)",
    "XnnpackExecutionProvider": "the Android/iOS packages (onnxruntime-android AAR, onnxruntime-c pod) or a "
                                "source build with --use_xnnpack",
    "NnapiExecutionProvider": "the Android package (onnxruntime-android AAR) or a source build with --use_nnapi",
    "CoreMLExecutionProvider": "the iOS/macOS packages (onnxruntime-c / onnxruntime-objc pods, or the macOS "
                               "onnxruntime wheel)",
    "WebGpuExecutionProvider": "an onnxruntime build with WebGPU (onnxruntime-web or --use_webgpu)",
}

# Providers that are not compute devices: never picked by "auto".
NOT_COMPUTE = {"AzureExecutionProvider"}


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda`` (the name users type)."""
    for alias, full in ALIASES.items():
        if full == provider:
            return alias
    return provider.removesuffix("ExecutionProvider").lower()


def available() -> list[str]:
    return list(ort.get_available_providers())


def resolve(spec: str) -> list[str]:
    """``cpu,cuda`` / full names / ``auto`` -> onnxruntime provider names, all installed (or ProviderUnavailable)."""
    have = available()
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ConfigError("--providers is empty; use e.g. cpu, cuda, xnnpack or auto")
    if names == ["auto"]:
        return [p for p in have if p not in NOT_COMPUTE]
    resolved: list[str] = []
    for name in names:
        full = ALIASES.get(name.lower(), name if name.endswith("ExecutionProvider") else None)
        if full is None:
            raise ConfigError(f"unknown provider '{name}'; use one of {', '.join(sorted(set(ALIASES)))}, auto, "
                              "or a full onnxruntime name such as CUDAExecutionProvider")
        if full not in have:
            bring = PACKAGES.get(full, "an onnxruntime build that includes it")
            raise ProviderUnavailable(
                f"execution provider '{name}' ({full}) is not in the installed onnxruntime "
                f"{ort.__version__}; available: {', '.join(short_name(p) for p in have if p not in NOT_COMPUTE)} "
                f"({', '.join(have)}). To get it: {bring}")
        if full not in resolved:
            resolved.append(full)
    return resolved


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options for timing: no spinning, so an idle session's thread pool does not steal the other session's cores
    while original and pruned are measured interleaved."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def create_session(path: str | Path, provider: str, threads: int = 0) -> tuple[ort.InferenceSession, float]:
    """A session on exactly ``provider`` and its load time in seconds.

    A provider that is installed but cannot start (driver or library missing) makes onnxruntime fall back to CPU;
    that is reported as :class:`ProviderUnavailable` rather than timed as if it worked.
    """
    start = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if provider != "CPUExecutionProvider" and ("provider" in first.lower() or "cuda" in first.lower()):
            raise ProviderUnavailable(f"{short_name(provider)}: could not create a session: {first}") from None
        raise InputModelError(f"{path}: onnxruntime cannot load the model ({first})") from None
    elapsed = time.perf_counter() - start
    if sess.get_providers()[0] != provider:
        raise ProviderUnavailable(f"{short_name(provider)} is installed but could not be initialised "
                                  f"(onnxruntime fell back to {', '.join(sess.get_providers())})")
    return sess, elapsed
