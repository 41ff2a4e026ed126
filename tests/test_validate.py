"""`onnxprune validate` and the validation library: numbers against direct computations, exit codes, JSON schema.

Kept fast: latency runs/warmup are tiny and the mobile check runs only where it is under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxprune.data.loader import DataOptions, load_data
from onnxprune.data.sources import Preprocess
from onnxprune.errors import ConfigError, DataError, ProviderUnavailable, ValidationFailed
from onnxprune.validate import SCHEMA, ValidateOptions, evaluate_model, run_validation
from onnxprune.validate.accuracy import Agreement
from onnxprune.validate.providers import resolve
from cli_support import run_main
from oracle import first_output

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "models" / "digits_resnet.onnx"
PLAIN = ROOT / "models" / "digits_plain.onnx"
VAL = ROOT / "models" / "digits_val.npz"
FAST = ValidateOptions(runs=0, mobile=False)


def fast(path: Path | None = None, limit: int | None = None, batch_size: int | None = None) -> ValidateOptions:
    """Validation without latency and the mobile check, on ``path`` (None: generated inputs)."""
    return replace(FAST, data=DataOptions(path=None if path is None else str(path), limit=limit,
                                          batch_size=batch_size))


def main_cli():
    from onnxprune.cli.main import cli

    return cli


def direct_accuracy(path: Path) -> tuple[float, float]:
    data = np.load(VAL)
    logits = first_output(path, {"input": data["input"]})
    labels = data["labels"]
    top1 = float(np.mean(logits.argmax(1) == labels))
    top5 = float(np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits, labels)]))
    return top1, top5


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """digits_resnet with its classifier weights scrambled: a pruning gone wrong."""
    model = onnx.load(str(RESNET))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    values = numpy_helper.to_array(weight).copy()
    rng = np.random.default_rng(0)
    values += rng.normal(0, 2 * values.std(), values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = tmp_path_factory.mktemp("damaged") / "digits_damaged.onnx"
    onnx.save(model, str(path))
    return path


def test_committed_digits_files_are_small_and_trained():
    total = sum(p.stat().st_size for p in (RESNET, PLAIN, VAL))
    assert total < 1_000_000
    data = np.load(VAL)
    assert data["input"].shape[1:] == (1, 8, 8) and data["labels"].shape == (len(data["input"]),)
    for path in (RESNET, PLAIN):
        assert direct_accuracy(path)[0] > 0.95


@pytest.mark.parametrize("pruned", [RESNET, PLAIN])
def test_accuracy_matches_direct_computation(pruned):
    report = run_validation(RESNET, pruned, fast(VAL, batch_size=32))
    acc = report.accuracy
    top1_o, top5_o = direct_accuracy(RESNET)
    top1_p, top5_p = direct_accuracy(pruned)
    assert acc["samples"] == len(np.load(VAL)["labels"])
    assert acc["classes"] == 10
    assert acc["original"]["top1"] == pytest.approx(top1_o, abs=1e-12)
    assert acc["original"]["top5"] == pytest.approx(top5_o, abs=1e-12)
    assert acc["pruned"]["top1"] == pytest.approx(top1_p, abs=1e-12)
    assert acc["pruned"]["top5"] == pytest.approx(top5_p, abs=1e-12)
    assert acc["top1_drop"] == pytest.approx(top1_o - top1_p, abs=1e-12)


def test_identical_models_agree_perfectly():
    report = run_validation(RESNET, RESNET, fast(VAL, batch_size=7))
    out = report.outputs["logits"]
    assert out["cosine_mean"] == 1.0 and out["cosine_min"] == 1.0
    assert out["max_abs_error"] == 0.0 and out["mean_abs_error"] == 0.0
    assert out["top1_agreement"] == 1.0 and out["identical"] and out["snr_db"] is None
    assert report.accuracy["top1_drop"] == 0.0
    report.check_thresholds()  # no thresholds: passes
    assert "inf" in report.render()


def test_agreement_matches_numpy_over_batches():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(50, 7)).astype(np.float32)
    out = ref + rng.normal(scale=0.1, size=ref.shape).astype(np.float32)
    agree = Agreement()
    for start in range(0, 50, 16):
        agree.update(ref[start:start + 16], out[start:start + 16])
    res = agree.result()
    a, b = ref.astype(np.float64), out.astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert res["cosine_mean"] == pytest.approx(cos.mean())
    assert res["cosine_min"] == pytest.approx(cos.min())
    assert res["max_abs_error"] == pytest.approx(np.abs(a - b).max())
    assert res["mean_abs_error"] == pytest.approx(np.abs(a - b).mean())
    assert res["snr_db"] == pytest.approx(10 * np.log10((a**2).sum() / ((a - b) ** 2).sum()))
    assert res["top1_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))


def test_json_schema_and_latency(tmp_path, capsys):
    out = tmp_path / "report.json"
    code, stdout, stderr = run_main(["validate", RESNET, PLAIN, "--data", VAL, "--limit", "40", "--runs", "4",
                                     "--warmup", "1", "--json", out], capsys)
    assert code == 0, stderr
    assert "accuracy" in stdout and "latency" in stdout and "mobile readiness" in stdout
    d = json.loads(out.read_text())
    assert d["schema"] == SCHEMA
    assert set(d) >= {"original", "pruned", "data", "accuracy", "outputs", "latency", "size", "mobile", "ort_export",
                      "thresholds", "environment"}
    assert set(d["data"]) >= {"source", "samples", "labels", "batch_size", "provider", "notes"}
    assert d["data"]["samples"] == 40 and d["data"]["labels"] is True
    assert set(d["accuracy"]) >= {"output", "samples", "classes", "original", "pruned", "top1_drop", "top5_drop"}
    assert set(d["outputs"]["logits"]) >= {"shape", "classification", "top1_agreement", "cosine_mean", "cosine_min",
                                           "max_abs_error", "mean_abs_error", "snr_db", "identical"}
    (lat,) = d["latency"]
    assert lat["provider"] == "cpu" and lat["runs"] == 4 and lat["speedup"] > 0
    for key in ("original", "pruned"):
        assert set(lat[key]) >= {"median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "load_ms", "memory_bytes"}
        assert set(d["size"][key]) == {"params", "macs", "file_size"}
        assert d["size"][key]["params"] > 0
        mob = d["mobile"][key]
        assert set(mob) >= {"dynamic_inputs", "nnapi", "coreml_neuralnetwork", "coreml_mlprogram"}
        assert set(mob["nnapi"]) >= {"nodes", "supported_nodes", "partitions", "unsupported_ops", "suitability"}
    assert d["size"]["original"]["file_size"] == RESNET.stat().st_size
    assert d["thresholds"]["passed"] is True and d["thresholds"]["failures"] == []
    assert set(d["environment"]) >= {"onnxruntime", "available_providers", "memory_method"}


def test_missing_provider_clirunner():
    result = CliRunner().invoke(main_cli(), ["validate", str(RESNET), str(RESNET), "--providers", "cpu,cuda"])
    assert isinstance(result.exception, ProviderUnavailable)
    assert result.exception.exit_code == 6
    message = str(result.exception)
    assert "CUDAExecutionProvider" in message and "available: cpu" in message and "onnxruntime-gpu" in message


@pytest.mark.parametrize("name, package", [("xnnpack", "Android"), ("coreml", "iOS"), ("nnapi", "Android"),
                                           ("tensorrt", "onnxruntime-gpu")])
def test_missing_provider_names_the_package(name, package):
    if name in ("xnnpack", "coreml", "nnapi") and resolve("auto") != ["CPUExecutionProvider"]:
        pytest.skip("this onnxruntime build has more than the CPU provider")
    with pytest.raises(ProviderUnavailable, match=package):
        resolve(name)


def test_missing_provider_exit_code_subprocess():
    proc = subprocess.run([sys.executable, "-c", "from onnxprune.cli.main import main; main()", "validate",
                           str(RESNET), str(RESNET), "--providers", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.startswith("onnxprune: error:") and "available: cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_provider_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown provider"):
        resolve("gpu9000")


def test_max_accuracy_drop_exit_code(damaged, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_main(["validate", str(RESNET), str(damaged), "--data", str(VAL), "--runs", "0",
                                     "--no-mobile", "--max-accuracy-drop", "0.01", "--json", str(out)], capsys)
    assert code == 5, stderr
    assert "max-accuracy-drop" in stderr and "FAILED" in stdout
    d = json.loads(out.read_text())  # the report is written before the threshold fails the run
    assert d["thresholds"]["passed"] is False and d["accuracy"]["top1_drop"] > 0.01
    code, _, stderr = run_main(["validate", str(RESNET), str(RESNET), "--data", str(VAL), "--runs", "0",
                                "--no-mobile", "--max-accuracy-drop", "0.01"], capsys)
    assert code == 0, stderr


def test_min_agreement_threshold(damaged):
    report = run_validation(RESNET, damaged, replace(fast(VAL), min_agreement=0.99))
    assert report.outputs["logits"]["top1_agreement"] < 0.99
    with pytest.raises(ValidationFailed, match="min-agreement"):
        report.check_thresholds()
    assert ValidationFailed.exit_code == 5


def test_max_accuracy_drop_without_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="labelled data"):
        run_validation(RESNET, RESNET, replace(fast(limit=4), max_accuracy_drop=0.01))


def test_generated_inputs_without_data():
    report = run_validation(RESNET, PLAIN, fast(limit=6, batch_size=3))
    assert report.accuracy is None and report.data["samples"] == 6 and report.data["source"] == "generated"
    from onnxprune.graph.io import load_model  # the same generated inputs, run through both models directly

    feed = load_data(load_model(RESNET), DataOptions(limit=6, batch_size=3), None).inputs
    argmax = [first_output(p, feed).argmax(1) for p in (RESNET, PLAIN)]
    assert report.outputs["logits"]["top1_agreement"] == pytest.approx(float(np.mean(argmax[0] == argmax[1])))


def test_npz_with_wrong_input_name_exit_7(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    code, _, stderr = run_main(["validate", str(RESNET), str(RESNET), "--data", str(bad), "--runs", "0",
                                "--no-mobile"], capsys)
    assert code == 7 and "input" in stderr and "images" in stderr


def test_npz_with_wrong_shape_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 9, 9), np.float32))
    with pytest.raises(DataError, match="axis 2"):
        run_validation(RESNET, RESNET, fast(bad))
    np.savez(bad, input=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(DataError, match="rank"):
        run_validation(RESNET, RESNET, fast(bad))


def _dynamic_model(path: Path) -> Path:
    """y = relu(x) with x: [batch, seq, 2] float; seq is a dynamic dim that generated data cannot guess."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "dyn",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_dynamic_dim_needs_input_shape(tmp_path):
    model = _dynamic_model(tmp_path / "dyn.onnx")
    with pytest.raises(ConfigError, match="'seq'.*--input-shape x:"):
        run_validation(model, model, FAST)
    report = run_validation(model, model, fast(limit=3), {"x": [1, 5, 2]})
    assert report.outputs["y"]["shape"] == [5, 2] and report.outputs["y"]["identical"]
    assert report.outputs["y"]["top1_agreement"] is None
    with pytest.raises(ConfigError, match="min-cosine"):
        run_validation(model, model, replace(fast(limit=3), min_agreement=0.9), {"x": [1, 5, 2]})
    with pytest.raises(ConfigError, match="axis 2 is 3"):  # a bad --input-shape is a usage error (exit 2)
        run_validation(model, model, FAST, {"x": [1, 5, 3]})


def test_export_ort_writes_into_dir_only(tmp_path):
    out = tmp_path / "ort"
    report = run_validation(RESNET, PLAIN, replace(fast(limit=2), export_ort=str(out)))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["digits_plain.ort", "digits_plain.required_operators.config"]
    assert report.ort_export == [str(out / n) for n in names]
    assert not (PLAIN.parent / "digits_plain.ort").exists()
    assert "ai.onnx;" in (out / "digits_plain.required_operators.config").read_text()


def test_image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    data = np.load(VAL)
    root = tmp_path / "imgs"
    for i, (img, label) in enumerate(zip(data["input"][:30], data["labels"][:30])):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pil.fromarray(np.round(img[0] * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    opts = DataOptions(path=str(root), preprocess=Preprocess(scale=1 / 255))
    from onnxprune.graph.io import load_model

    dataset = load_data(load_model(RESNET), opts, None)
    assert dataset.inputs["input"].shape == (30, 1, 8, 8)
    # the loader walks classes (sorted folder names), then file names: rebuild that order from the source
    order = sorted(range(30), key=lambda i: (f"class_{data['labels'][i]}", f"{i}.png"))
    assert np.abs(dataset.inputs["input"] - data["input"][order]).max() <= 0.5 / 255 + 1e-6
    classes = sorted({f"class_{label}" for label in data["labels"][:30]})
    assert dataset.labels.tolist() == [classes.index(f"class_{data['labels'][i]}") for i in order]
    sess = ort.InferenceSession(str(RESNET), providers=["CPUExecutionProvider"])
    acc = evaluate_model(sess, dataset, 8)
    assert acc["samples"] == 30 and acc["top1"] > 0.8


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match="Pillow"):
        run_validation(RESNET, RESNET, fast(tmp_path))
