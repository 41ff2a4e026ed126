"""Plugin execution providers: OpenVINO for real (``onnxruntime-ep-openvino``), and the missing-plugin error.

Why for real: a plugin asked for by name through ``providers=[...]`` silently runs on CPU, so only a test that reads
the session's providers back and compares outputs with CPU shows that ``--providers openvino`` timed OpenVINO.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxprune.validate import providers
from cli_support import run_main

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "models" / "digits_resnet.onnx"
VAL = ROOT / "models" / "digits_val.npz"
OPENVINO = "OpenVINOExecutionProvider"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


needs_openvino = pytest.mark.skipif(
    not _importable("onnxruntime_ep_openvino"),
    reason="onnxruntime-ep-openvino is not importable (pip install -e '.[openvino]')")


@pytest.fixture(autouse=True)
def _leave_onnxruntime_as_found():
    """Registration is process-wide: unregister after each test, or later tests' ``auto`` would include OpenVINO."""
    yield
    gc.collect()  # sessions first: a library is unregistered only after the sessions that use it are released
    providers.unregister_plugins()


@needs_openvino
def test_validate_times_openvino_and_reports_its_device(tmp_path, capsys):
    out = tmp_path / "v.json"
    code, stdout, err = run_main(["validate", RESNET, RESNET, "--data", VAL, "--limit", "64", "--providers",
                                  "cpu,openvino", "--runs", "3", "--warmup", "1", "--no-mobile", "--json", out],
                                 capsys)
    assert code == 0, err
    cpu, ov = json.loads(out.read_text())["latency"]
    assert cpu["session_providers"] == ["CPUExecutionProvider"]
    assert ov["provider"] == "openvino" and ov["provider_name"] == OPENVINO
    assert ov["session_providers"][0] == OPENVINO  # not a silent CPU fallback
    assert ov["original"]["nodes_by_provider"].get(OPENVINO, 0) > 0
    assert ov["original"]["median_ms"] > 0 and ov["pruned"]["median_ms"] > 0 and ov["speedup"] > 0
    assert ov["device"] and f"openvino on {ov['device']}" in stdout


@needs_openvino
def test_openvino_outputs_agree_with_cpu():
    """Measured on the digits validation set: max |logit difference| 0.084 against logits up to 9.9 (0.85%; OpenVINO
    runs bf16 on CPUs with AMX/AVX512-BF16), top-1 agreement 100%. Allowed: 2% of the largest logit, 99%."""
    providers.resolve("cpu,openvino")
    feed = {"input": np.load(VAL)["input"]}
    cpu, _ = providers.create_session(RESNET, "CPUExecutionProvider")
    ov, _ = providers.create_session(RESNET, OPENVINO)
    assert ov.get_providers()[0] == OPENVINO
    want, got = cpu.run(None, feed)[0], ov.run(None, feed)[0]
    assert np.abs(want - got).max() <= 0.02 * np.abs(want).max()
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.99


@needs_openvino
def test_prune_validate_on_openvino(tmp_path, capsys):
    out, report = tmp_path / "pruned.onnx", tmp_path / "v.json"
    code, _, err = run_main([RESNET, "--channels", "0.5", "--round-to", "1", "-o", out, "--validate", "--data", VAL,
                             "--providers", "openvino", "--runs", "2", "--warmup", "1", "--no-mobile",
                             "--json", report], capsys)
    assert code == 0, err
    (ov,) = json.loads(report.read_text())["validation"]["latency"]
    assert ov["session_providers"][0] == OPENVINO and ov["speedup"] > 0


def test_missing_plugin_is_exit_6_naming_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # the import fails
    monkeypatch.setattr(providers, "_REGISTERED", {})
    monkeypatch.setattr(providers, "available", lambda: ["CPUExecutionProvider"])  # no built-in OpenVINO either
    code, _, err = run_main(["validate", RESNET, RESNET, "--providers", "cpu,openvino"], capsys)
    assert code == 6
    assert len(err.strip().splitlines()) == 1
    assert "onnxruntime-ep-openvino" in err and "onnxprune[openvino]" in err


@needs_openvino
def test_quantized_model_validates_on_openvino(tmp_path):
    """What ships after --quantize int8 runs on OpenVINO, Q/DQ nodes included, and scores there as on CPU (measured:
    digits_resnet --channels 0.3 --quantize int8, 98.89% top-1 on both, tools/bench_deploy.py). Allowed: 1 point."""
    from onnxprune.data.loader import DataOptions
    from onnxprune.pipeline import PruneOptions, prune_file
    from onnxprune.validate import ValidateOptions, run_validation

    out = tmp_path / "int8.onnx"
    prune_file(RESNET, out, PruneOptions(channels=0.3, calib=str(ROOT / "models" / "digits_calib.npz"), recover="bn",
                                         quantize="int8"))
    options = ValidateOptions(data=DataOptions(path=str(VAL)), runs=2, warmup=1, mobile=False)
    on_cpu = run_validation(RESNET, out, options)
    on_ov = run_validation(RESNET, out, ValidateOptions(data=options.data, providers="openvino", runs=2, warmup=1,
                                                       mobile=False))
    (ov,) = on_ov.latency
    assert ov["session_providers"][0] == OPENVINO
    nodes = ov["pruned"]["nodes_by_provider"]
    assert nodes.get(OPENVINO, 0) > 0 and set(nodes) == {OPENVINO}  # the whole QDQ graph, none left to CPU
    assert abs(on_ov.accuracy["pruned"]["top1"] - on_cpu.accuracy["pruned"]["top1"]) <= 0.01
