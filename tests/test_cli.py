"""The CLI: default command, outputs, JSON, and every bad input with its documented exit code."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxprune.cli.main import cli, main

from conftest import MODELS


def run_cli(args: list[str]) -> tuple[int, str]:
    """Run through main() exactly as the console script does; returns (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue() + err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_channels_default_command_and_default_output(model_copy, tmp_path):
    path = model_copy("resnet_bn.onnx")
    before = path.read_bytes()
    result = CliRunner().invoke(cli, [str(path), "--channels", "0.3", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "resnet_bn.pruned.onnx"
    assert out.exists() and path.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["output"] == str(out)
    pruned = [g for g in report["groups"] if g["after"] < g["before"]]
    assert pruned and "groups" in result.output
    for g in report["groups"]:  # every group is pruned, or the report says why not
        assert g["after"] < g["before"] or g["blocked"] or "kept whole" in (g["note"] or "")
        assert g["after"] == g["before"] or g["after"] % report["round_to"] == 0


def test_prune_subcommand_is_the_same(model_copy, tmp_path):
    path = model_copy("vgg_bn.onnx")
    a = CliRunner().invoke(cli, ["prune", str(path), "--sparsity", "0.5", "-o", str(tmp_path / "a.onnx")])
    b = CliRunner().invoke(cli, [str(path), "--sparsity", "0.5", "-o", str(tmp_path / "b.onnx")])
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_inspect_lists_layers(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(MODELS / "resnet_bn.onnx"), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "i.json").read_text())
    assert len(data["layers"]) == 11 and data["opset"] == 13 and data["macs"] > 0
    assert "/fc/Gemm" in result.output and "total:" in result.output


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
def test_bad_input_exit_codes_and_nothing_lost(tmp_path, model_copy, args, code, message):
    model = model_copy("resnet_bn.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("not a model at all\n" * 20)
    (tmp_path / "trunc.onnx").write_bytes(model.read_bytes()[:4000])
    before = snapshot(tmp_path)
    names = {"dir": tmp_path, "model": model, "empty": tmp_path / "empty.onnx", "text": tmp_path / "text.onnx",
             "trunc": tmp_path / "trunc.onnx"}
    exit_code, output = run_cli([a.format(**names) for a in args])
    assert exit_code == code, output
    assert message in output
    assert "Traceback" not in output
    assert snapshot(tmp_path) == before  # inputs byte-identical, no partial output left behind


def test_nothing_to_prune_is_not_an_error(tmp_path):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }""")
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    code, output = run_cli([str(path), "--sparsity", "0.5"])
    assert code == 0, output
    assert "no prunable weights" in output


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


def test_verify_proves_the_removal(model_copy, tmp_path):
    path = model_copy("densenet_bn.onnx")
    code, output = run_cli([str(path), "--channels", "0.4", "--round-to", "1", "--verify"])
    assert code == 0, output
    assert "verified the channel removal: on random inputs (input 2x3x32x32)" in output


def test_verify_catches_a_wrong_removal_and_writes_nothing(model_copy, tmp_path, monkeypatch):
    """Sabotage apply_plan (remove other channels than planned): --verify must refuse to write the result."""
    import numpy as np

    import onnxprune.pipeline as pipeline
    from onnxprune.prune.structured import ChannelPlan, apply_plan

    def wrong_apply(groups, plan):
        shifted = {gid: np.array(sorted({(int(c) + 1) % groups.groups[gid].size for c in ids}))
                   for gid, ids in plan.remove.items()}
        return apply_plan(groups, ChannelPlan(shifted))

    monkeypatch.setattr("onnxprune.passes.channels.apply_plan", wrong_apply)
    path = model_copy("resnet_bn.onnx")
    before = snapshot(tmp_path)
    code, output = run_cli([str(path), "--channels", "0.3", "--round-to", "1", "--verify"])
    assert code == 4, output
    assert "differs from the original" in output
    assert snapshot(tmp_path) == before
