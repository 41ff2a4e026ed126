"""The CLI: default command, outputs, JSON, and every bad input with its documented exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest

from conftest import MODELS
from cli_support import run_main, snapshot


def test_channels_default_command_and_default_output(model_copy, tmp_path, capsys):
    path = model_copy("resnet_bn.onnx")
    before = path.read_bytes()
    code, stdout, stderr = run_main([path, "--channels", "0.3", "--json", tmp_path / "r.json"], capsys)
    assert code == 0, stderr
    out = tmp_path / "resnet_bn.pruned.onnx"
    assert out.exists() and path.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["output"] == str(out)
    pruned = [g for g in report["groups"] if g["after"] < g["before"]]
    assert pruned and "groups" in stdout
    for g in report["groups"]:  # every group is pruned, or the report says why not
        assert g["after"] < g["before"] or g["blocked"] or "kept whole" in (g["note"] or "")
        assert g["after"] == g["before"] or g["after"] % report["round_to"] == 0


def test_prune_subcommand_is_the_same(model_copy, tmp_path, capsys):
    path = model_copy("vgg_bn.onnx")
    code_a, _, err_a = run_main(["prune", path, "--sparsity", "0.5", "-o", tmp_path / "a.onnx"], capsys)
    code_b, _, err_b = run_main([path, "--sparsity", "0.5", "-o", tmp_path / "b.onnx"], capsys)
    assert code_a == code_b == 0, err_a + err_b
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_inspect_lists_layers(tmp_path, capsys):
    code, out, err = run_main(["inspect", MODELS / "resnet_bn.onnx", "--json", tmp_path / "i.json"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "i.json").read_text())
    assert len(data["layers"]) == 11 and data["opset"] == 13 and data["macs"] > 0
    assert "/fc/Gemm" in out and "total:" in out


@pytest.mark.parametrize("args, code, message", [
    (["{dir}/missing.onnx", "--sparsity", "0.5"], 3, "no such file"),
    (["{dir}", "--sparsity", "0.5"], 3, "directory"),
    (["{empty}", "--sparsity", "0.5"], 3, "empty"),
    (["{text}", "--sparsity", "0.5"], 3, "not a readable ONNX model"),
    (["{trunc}", "--sparsity", "0.5"], 3, "ONNX"),
    (["{model}", "--sparsity", "1.5"], 2, "outside [0, 1)"),
    (["{model}", "--sparsity", "-0.1"], 2, "outside [0, 1)"),
    (["{model}", "--channels", "abc"], 2, "not a number"),
    (["{model}", "--pattern", "2-4"], 2, "N:M"),
    (["{model}", "--pattern", "4:2"], 2, "0 < N < M"),
    (["{model}", "--channels", "0.3", "--input-shape", "input:1xAx3"], 2, "NAME:DIMS"),
    (["{model}"], 2, "nothing to do"),
    (["{model}", "--sparsity", "0.5", "-o", "{dir}/no/such/folder/out.onnx"], 4, "does not exist"),
    (["{model}", "--sparsity", "0.5", "-o", "{model}"], 4, "refusing"),
    (["inspect", "{text}"], 3, "not a readable ONNX model"),
])
def test_bad_input_exit_codes_and_nothing_lost(tmp_path, model_copy, capsys, args, code, message):
    model = model_copy("resnet_bn.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("not a model at all\n" * 20)
    (tmp_path / "trunc.onnx").write_bytes(model.read_bytes()[:4000])
    before = snapshot(tmp_path)
    names = {"dir": tmp_path, "model": model, "empty": tmp_path / "empty.onnx", "text": tmp_path / "text.onnx",
             "trunc": tmp_path / "trunc.onnx"}
    exit_code, out, err = run_main([a.format(**names) for a in args], capsys)
    assert exit_code == code, err
    assert message in err
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before  # inputs byte-identical, no partial output left behind


def test_nothing_to_prune_is_not_an_error(tmp_path, capsys):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }""")
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    code, out, err = run_main([path, "--sparsity", "0.5"], capsys)
    assert code == 0, err
    assert "no prunable weights" in out


def test_real_subprocess_and_debug_flag(tmp_path, model_copy):
    path = model_copy("mobilenetv2_bn.onnx")
    done = subprocess.run([sys.executable, "-c", "from onnxprune.cli.main import main; main()", str(path),
                           "--channels", "0.3", "--sparsity", "0.3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mobilenetv2_bn.pruned.onnx").exists()
    bad = subprocess.run([sys.executable, "-c", "from onnxprune.cli.main import main; main()",
                          str(tmp_path / "nope.onnx"), "--sparsity", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 3 and bad.stderr.startswith("onnxprune: error:") and "Traceback" not in bad.stderr
    debug = subprocess.run([sys.executable, "-c", "from onnxprune.cli.main import main; main()",
                            str(tmp_path / "nope.onnx"), "--sparsity", "0.5", "--debug"], capture_output=True,
                           text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr

