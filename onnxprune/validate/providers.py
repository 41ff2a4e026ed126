"""Execution providers: short names, availability checks, plugin registration and session creation.

Why: onnxruntime silently falls back to CPU (with a warning) when asked for a provider its build lacks, so a
"CUDA latency" could really be CPU latency. We check the installed build ourselves and fail with
:class:`ProviderUnavailable` (exit 6), naming what is available and which package brings the missing one.

Plugin providers (onnxruntime >= 1.23) ship as separate pip packages and are registered at run time. The trap:
once registered, ``get_available_providers()`` lists them, yet ``InferenceSession(..., providers=[name])`` silently
runs on CPU; only ``SessionOptions.add_provider_for_devices`` selects them. So every session is built here, in
:func:`create_session`, and its ``get_providers()`` is read back.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
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
    "QNNExecutionProvider": "pip install onnxruntime-qnn (Qualcomm devices)",
    "XnnpackExecutionProvider": "the Android/iOS packages (onnxruntime-android AAR, onnxruntime-c pod) or a "
                                "source build with --use_xnnpack",
    "NnapiExecutionProvider": "the Android package (onnxruntime-android AAR) or a source build with --use_nnapi",
    "CoreMLExecutionProvider": "the iOS/macOS packages (onnxruntime-c / onnxruntime-objc pods, or the macOS "
                               "onnxruntime wheel)",
    "WebGpuExecutionProvider": "an onnxruntime build with WebGPU (onnxruntime-web or --use_webgpu)",
}


@dataclass(frozen=True)
class Plugin:
    """A plugin provider: the Python package that carries its library, and where to get it."""

    module: str  # exposes get_ep_name() and get_library_path()
    pip: str
    extra: str  # onnxprune's extra that installs ``pip``
    threads_option: str | None = None  # provider option for --threads (the plugin runs its own thread pool)


PLUGINS: dict[str, Plugin] = {
    "OpenVINOExecutionProvider": Plugin("onnxruntime_ep_openvino", "onnxruntime-ep-openvino", "openvino",
                                        threads_option="num_of_threads"),
}

@dataclass(frozen=True)
class Registration:
    name: str  # what onnxruntime.register_execution_provider_library was given
    devices: list[ort.OrtEpDevice]  # what sessions are built on


# Plugin providers registered in this process (onnxruntime's registration is process-wide).
_REGISTERED: dict[str, Registration] = {}

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
        # a registered plugin also lists variants such as "OpenVINOExecutionProvider.AUTO": not session providers
        return [p for p in have if p not in NOT_COMPUTE and p.endswith("ExecutionProvider")]
    resolved: list[str] = []
    for name in names:
        full = ALIASES.get(name.lower(), name if name.endswith("ExecutionProvider") else None)
        if full is None:
            raise ConfigError(f"unknown provider '{name}'; use one of {', '.join(sorted(set(ALIASES)))}, auto, "
                              "or a full onnxruntime name such as CUDAExecutionProvider")
        if full in PLUGINS:
            _register_plugin(name, full, built_in=full in have)
        elif full not in have:
            bring = PACKAGES.get(full, "an onnxruntime build that includes it")
            raise ProviderUnavailable(
                f"execution provider '{name}' ({full}) is not in the installed onnxruntime "
                f"{ort.__version__}; available: {', '.join(short_name(p) for p in have if p not in NOT_COMPUTE)} "
                f"({', '.join(have)}). To get it: {bring}")
        if full not in resolved:
            resolved.append(full)
    return resolved


def _register_plugin(name: str, provider: str, built_in: bool) -> None:
    """Import the plugin's package, register its library once per process and find its devices; without the
    package, a ``built_in`` provider (an onnxruntime build that has it) is used as is."""
    if provider in _REGISTERED:
        return
    plugin = PLUGINS[provider]
    try:
        package = importlib.import_module(plugin.module)
    except ImportError:
        if built_in:
            return
        raise ProviderUnavailable(
            f"execution provider '{name}' ({provider}) needs the plugin package {plugin.pip}, which is not "
            f"installed; to get it: pip install '{plugin.pip}' or pip install 'onnxprune[{plugin.extra}]'") from None
    ep_name = package.get_ep_name()
    try:
        ort.register_execution_provider_library(ep_name, package.get_library_path())
    except Exception as exc:  # onnxruntime's Fail; "already registered" (by the caller's own code) is fine
        if "already registered" not in str(exc):
            raise ProviderUnavailable(f"{plugin.pip}: onnxruntime {ort.__version__} could not register "
                                      f"{provider}: {str(exc).strip().splitlines()[0]}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == provider]
    if not devices:
        raise ProviderUnavailable(f"{plugin.pip} is installed and registered, but {provider} found no device "
                                  "on this machine")
    _REGISTERED[provider] = Registration(ep_name, devices)


def unregister_plugins() -> None:
    """Undo :func:`resolve`'s registrations (after their sessions are gone): a registered plugin stays in
    ``get_available_providers()`` for the rest of the process, which changes what ``auto`` means."""
    for provider in list(_REGISTERED):
        ort.unregister_execution_provider_library(_REGISTERED.pop(provider).name)


def device(provider: str) -> str | None:
    """What ``provider`` runs on, e.g. ``cpu (Intel(R) Xeon(R) Processor)``; None when onnxruntime does not say."""
    registered = _REGISTERED.get(provider)
    devices = registered.devices if registered else [d for d in ort.get_ep_devices() if d.ep_name == provider]
    if not devices:
        return None
    return "; ".join(f"{d.device.type.name.lower()} ({d.ep_metadata.get('FULL_DEVICE_NAME') or d.device.vendor})"
                     for d in devices)


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options for timing: no spinning, so an idle session's thread pool does not steal the other session's cores
    while original and pruned are measured interleaved."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # for node_counts()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def create_session(path: str | Path | bytes, provider: str, threads: int = 0) -> tuple[ort.InferenceSession, float]:
    """A session on exactly ``path`` (a file, or a serialized model held in memory: search workers write no files)
    on exactly ``provider``, and its load time in seconds.

    A provider that is installed but cannot start (driver or library missing) makes onnxruntime fall back to CPU;
    that is reported as :class:`ProviderUnavailable` rather than timed as if it worked.
    """
    options = session_options(threads)
    plugin = _REGISTERED.get(provider)
    if plugin:
        option = PLUGINS[provider].threads_option
        options.add_provider_for_devices(plugin.devices, {option: str(threads)} if option and threads else {})
    source = path if isinstance(path, bytes) else str(path)
    start = time.perf_counter()
    try:
        sess = (ort.InferenceSession(source, sess_options=options) if plugin
                else ort.InferenceSession(source, sess_options=options, providers=[provider]))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if provider != "CPUExecutionProvider" and ("provider" in first.lower() or "cuda" in first.lower()):
            raise ProviderUnavailable(f"{short_name(provider)}: could not create a session: {first}") from None
        where = "the model in memory" if isinstance(path, bytes) else path
        raise InputModelError(f"{where}: onnxruntime cannot load the model ({first})") from None
    elapsed = time.perf_counter() - start
    if sess.get_providers()[0] != provider:
        raise ProviderUnavailable(f"{short_name(provider)} is installed but could not be initialised "
                                  f"(onnxruntime fell back to {', '.join(sess.get_providers())})")
    return sess, elapsed


def node_counts(sess: ort.InferenceSession) -> dict[str, int] | None:
    """Nodes per provider after partitioning (which part of the model really ran on the plugin); None on an
    onnxruntime too old to say."""
    if not hasattr(sess, "get_provider_graph_assignment_info"):
        return None
    counts: dict[str, int] = {}
    for subgraph in sess.get_provider_graph_assignment_info():
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return counts
