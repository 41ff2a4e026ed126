"""``--verify``: it proves the channel removal or fails with exit 4 and writes nothing; it never passes silently.

Every path runs on an inline model and on the external-data one (``resnet_dynamo.onnx`` + ``.data``), whose pruned
tensors are streamed into the output's unfinished data file while the oracle needs them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, prune_model
from onnxprune.prune.structured import ChannelPlan, apply_plan

from conftest import MODELS, ZOO
from cli_support import run_main, snapshot

BOTH = ["resnet_bn.onnx", "resnet_dynamo.onnx"]
PROVED = "verified the channel removal"
LATER = "on purpose, so the saved model is not expected to equal the masked original"


def dynamic_hw(tmp_path: Path, name: str) -> Path:
    """``name`` with its input's H and W made dynamic ("height", "width"), beside a copy of its external data."""
    model = onnx.load(str(MODELS / name), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, label in zip(dims[2:], ("height", "width")):
        d.Clear()
        d.dim_param = label
    for tensor in model.graph.initializer:  # keep the data file name: the copy reads the same external data
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            shutil.copy(MODELS / next(e.value for e in tensor.external_data if e.key == "location"), tmp_path)
    path = tmp_path / ("dyn_" + name)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", [*BOTH, "densenet_bn.onnx"])
def test_verify_proves_the_removal_and_says_so(model_copy, tmp_path, capsys, name):
    path = model_copy(name)
    code, out, err = run_main([path, "--channels", "0.4", "--round-to", "1", "--verify"], capsys)
    assert code == 0, err
    assert f"{PROVED}: on random inputs (input 2x3x32x32)" in out
    assert "masked to zero (max relative difference" in out
    assert LATER not in out  # nothing changed the weights after the removal
    assert (tmp_path / name.replace(".onnx", ".pruned.onnx")).exists()


def test_verify_says_later_steps_changed_weights(model_copy, capsys):
    path = model_copy("resnet_dynamo.onnx")
    code, out, err = run_main([path, "--channels", "0.3", "--round-to", "1", "--sparsity", "0.5", "--verify"], capsys)
    assert code == 0, err
    assert PROVED in out
    assert f"weight sparsity zeroed weights {LATER}" in out


def test_verify_says_recovery_changed_weights(tmp_path, capsys):
    for name in ("digits_resnet.onnx", "digits_calib.npz"):
        shutil.copy(MODELS / name, tmp_path / name)
    code, out, err = run_main([tmp_path / "digits_resnet.onnx", "--channels", "0.4", "--round-to", "1", "--criterion",
                               "l1", "--calib", tmp_path / "digits_calib.npz", "--calib-limit", "32", "--verify"],
                              capsys)
    assert code == 0, err
    assert "recovery lsq:" in out and PROVED in out
    assert f"recovery (lsq) re-fitted weights {LATER}" in out


@pytest.mark.parametrize("name", BOTH)
def test_verify_needs_static_dims_besides_the_batch(tmp_path, capsys, name):
    path = dynamic_hw(tmp_path, name)
    before = snapshot(tmp_path)
    code, out, err = run_main([path, "--channels", "0.3", "--round-to", "1", "--verify"], capsys)
    assert code == 4, err
    assert not out and err.startswith("onnxprune: error: --verify cannot run: input 'input' [batch, 3, height, "
                                      "width] has dynamic dims (height, width)")
    assert "give --input-shape input:1x3xNxN" in err and "Nothing was written" in err
    assert snapshot(tmp_path) == before
    code, out, err = run_main([path, "--channels", "0.3", "--round-to", "1", "--verify", "--input-shape",
                               "input:1x3x32x32"], capsys)
    assert code == 0, err
    assert f"{PROVED}: on random inputs (input 1x3x32x32)" in out


@pytest.mark.parametrize("name", BOTH)
def test_verify_of_an_unknown_input_name_is_a_usage_error(model_copy, tmp_path, capsys, name):
    path = model_copy(name)
    before = snapshot(tmp_path)
    code, out, err = run_main([path, "--channels", "0.3", "--verify", "--input-shape", "image:1x3x32x32"], capsys)
    assert code == 2, err
    assert not out and err.startswith("onnxprune: error:") and "'image'" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", BOTH)
def test_verify_of_a_model_too_big_to_hold_fails(model_copy, tmp_path, monkeypatch, capsys, name):
    monkeypatch.setattr("onnxprune.graph.io.INLINE_LIMIT_BYTES", 1000)
    path = model_copy(name)
    before = snapshot(tmp_path)
    code, _, err = run_main([path, "--channels", "0.3", "--verify"], capsys)
    assert code == 4, err
    assert "--verify cannot run: the model is" in err and "prune without --verify" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", BOTH)
def test_verify_without_channels_is_a_usage_error(model_copy, tmp_path, capsys, name):
    path = model_copy(name)
    before = snapshot(tmp_path)
    code, _, err = run_main([path, "--sparsity", "0.5", "--verify"], capsys)
    assert code == 2, err
    assert "--verify proves a channel removal: give --channels" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", BOTH)
def test_verify_catches_one_wrong_weight_and_writes_nothing(model_copy, tmp_path, monkeypatch, capsys, name):
    """Remove the planned channels, then change one value of one pruned weight (streamed to the output's data file
    for the external-data model): exit 4 and the folder is exactly as before."""

    def broken_apply(groups, plan):
        kept = apply_plan(groups, plan)
        model = groups.index.model
        tensor = next(t for t in model.proto.graph.initializer if any(d.tensor == t.name for d in kept))
        values = model.array(tensor).copy()
        values.flat[0] += 1.0
        model.replace(tensor, values)
        return kept

    monkeypatch.setattr("onnxprune.passes.channels.apply_plan", broken_apply)
    path = model_copy(name)
    before = snapshot(tmp_path)
    code, out, err = run_main([path, "--channels", "0.3", "--round-to", "1", "--verify"], capsys)
    assert code == 4, err
    assert not out and err.startswith("onnxprune: error: internal error: --verify found the pruned model differs "
                                      "from the original with the removed channels masked")
    assert snapshot(tmp_path) == before


def test_verify_catches_a_wrong_removal_and_writes_nothing(model_copy, tmp_path, monkeypatch, capsys):
    """Sabotage apply_plan (remove other channels than planned): --verify must refuse to write the result."""

    def wrong_apply(groups, plan):
        shifted = {gid: np.array(sorted({(int(c) + 1) % groups.groups[gid].size for c in ids}))
                   for gid, ids in plan.remove.items()}
        return apply_plan(groups, ChannelPlan(shifted))

    monkeypatch.setattr("onnxprune.passes.channels.apply_plan", wrong_apply)
    path = model_copy("resnet_bn.onnx")
    before = snapshot(tmp_path)
    code, _, err = run_main([path, "--channels", "0.3", "--round-to", "1", "--verify"], capsys)
    assert code == 4, err
    assert "differs from the original" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ZOO)
def test_verify_accepts_every_zoo_model(name):
    """No false alarm: the library path on every zoo model (external data loaded into memory by onnx.load)."""
    report = prune_model(from_proto(onnx.load(str(MODELS / name))),
                         PruneOptions(channels=0.5, round_to=1, verify=True))
    assert any(g.after < g.before for g in report.groups)
    proofs = [n for n in report.notes if n.startswith(PROVED)]
    assert len(proofs) == 1, report.notes
    removed = sum(g.before - g.after for g in report.groups)
    assert f"with {removed} channel(s) removed" in proofs[0]


def test_verify_reports_when_nothing_was_removed():
    """Every group excluded: no removal happened, and the note says so instead of claiming a proof."""
    report = prune_model(from_proto(onnx.load(str(MODELS / "resnet_bn.onnx"))),
                         PruneOptions(channels=0.5, round_to=1, verify=True, exclude=("*",)))
    assert all(g.after == g.before for g in report.groups)
    assert not any(n.startswith(PROVED) for n in report.notes)
    assert any(n.startswith("--verify: no channel was removed") for n in report.notes), report.notes
