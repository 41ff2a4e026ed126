"""What ships after ``--quantize``: ``validate`` judges the quantized file against the fp32 original, and
``--export-ort`` exports that same quantized file with the mobile check run on it (issue 15, items 4 and 6)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.data.loader import DataOptions
from onnxprune.validate import ValidateOptions, run_validation
from onnxprune.validate.mobile import ship_for_mobile
from onnxprune.validate.report import render_shipped

MODELS = Path(__file__).parent.parent / "models"
MODEL, CALIB, VAL = MODELS / "digits_resnet.onnx", MODELS / "digits_calib.npz", MODELS / "digits_val.npz"


def _logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": np.load(VAL)["input"]})[0]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One ``prune --channels 0.3 --calib --recover bn --quantize int8 --export-ort DIR --json J`` run without
    ``--validate``, through the console entry point: (the int8 model, the export folder, the JSON report)."""
    folder = tmp_path_factory.mktemp("deploy")
    out, export, report = folder / "int8.onnx", folder / "ort", folder / "report.json"
    from onnxprune.cli.main import main

    try:
        main([str(a) for a in (MODEL, "--channels", "0.3", "--calib", CALIB, "--recover", "bn", "--quantize", "int8",
                               "-o", out, "--export-ort", export, "--json", report)])
    except SystemExit as exc:
        assert not exc.code
    return out, export, json.loads(report.read_text())


def test_export_ort_without_validate_ships_the_quantized_model(shipped):
    out, export, report = shipped
    ort_file = export / "int8.ort"
    assert sorted(p.name for p in export.iterdir()) == ["int8.ort", "int8.required_operators.config"]
    # the ORT file computes what the quantized .onnx computes (and not what a float model would)
    np.testing.assert_allclose(_logits(ort_file), _logits(out), rtol=0, atol=1e-5)
    config = (export / "int8.required_operators.config").read_text()
    assert "QuantizeLinear" in config and "DequantizeLinear" in config
    # the mobile check ran on that same file: its quantize/dequantize nodes are what CoreML cannot take
    data = report["mobile_export"]
    assert data["ort_export"] == [str(ort_file), str(export / "int8.required_operators.config")]
    coreml = data["mobile"]["coreml_neuralnetwork"]
    assert {"ai.onnx:QuantizeLinear", "ai.onnx:DequantizeLinear"} <= set(coreml["unsupported_ops"])
    assert data["mobile"]["nnapi"]["nodes"] > len(onnx.load(MODEL).graph.node)  # Q/DQ pairs were added


def test_shipped_report_text_and_no_mobile_check(shipped, tmp_path):
    out, _, report = shipped
    text = render_shipped(report["mobile_export"])
    assert "final model" in text and "NNAPI" in text and "int8.ort" in text
    bare = ship_for_mobile(out, tmp_path, check=False)
    assert bare["mobile"] is None and (tmp_path / "int8.ort").is_file()
    assert "NNAPI" not in render_shipped(bare)


def test_validate_judges_the_quantized_file_against_the_fp32_original(shipped):
    out = shipped[0]
    options = ValidateOptions(data=DataOptions(path=str(VAL)), runs=3, warmup=1, mobile=False)
    report = run_validation(MODEL, out, options)
    labels = np.load(VAL)["labels"]
    original, quantized = _logits(MODEL).argmax(axis=1), _logits(out).argmax(axis=1)
    assert report.accuracy["original"]["top1"] == pytest.approx(np.mean(original == labels))
    assert report.accuracy["pruned"]["top1"] == pytest.approx(np.mean(quantized == labels))
    assert report.outputs["logits"]["top1_agreement"] == pytest.approx(np.mean(original == quantized))
    assert report.size["original"]["file_size"] == MODEL.stat().st_size
    assert report.size["pruned"]["file_size"] == out.stat().st_size < 0.5 * MODEL.stat().st_size
    assert report.latency[0]["pruned"]["median_ms"] > 0 and report.latency[0]["runs"] == 3
    # --max-accuracy-drop judges the quantized file: a threshold under its measured drop fails, one above passes
    drop = report.accuracy["top1_drop"]
    assert drop > 0
    strict = run_validation(MODEL, out, replace(options, runs=0, max_accuracy_drop=drop / 2))
    loose = run_validation(MODEL, out, replace(options, runs=0, max_accuracy_drop=drop * 2))
    assert strict.failures() and not loose.failures()
