"""The trained transformers in models/ (tools/make_transformers.py): token data taken as given and checked, and
recovery that neither fits nor scores padding positions.

The BERT encoder is exported three ways (TorchScript, dynamo, onnxruntime-fused); every check that is about the
model's inputs runs on all three, since each writes the embedding and the mask differently (Gather + Sub/Mul,
EmbedLayerNormalization with a mask slot).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.data.loader import DataOptions, load_data
from onnxprune.data.tokens import TokenRule, token_rules
from onnxprune.graph.io import load_model
from onnxprune.pipeline import PruneOptions, prune_file

from cli_support import assert_one_error, run_main, snapshot
from conftest import MODELS

TRANSFORMERS = json.loads((MODELS / "MANIFEST.json").read_text())["transformers"]
BERTS = ["bert_tiny.onnx", "bert_tiny_dynamo.onnx", "bert_tiny_fused.onnx"]
TOKENS = ["input_ids", "attention_mask", "token_type_ids"]
CALIB, VAL = MODELS / "bert_calib.npz", MODELS / "bert_val.npz"


def _tokens(path: Path = CALIB, n: int | None = None) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k][:n] for k in TOKENS}


def _run(model: str | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_committed_files_are_listed_small_and_agree():
    """Every file MANIFEST.json lists exists, the new files stay under 2 MB together, and the three BERT exports
    compute the same function on held-out data."""
    assert set(TRANSFORMERS) == {"digits_vit.onnx", *BERTS}
    files = [MODELS / f for f in [*TRANSFORMERS, "bert_calib.npz", "bert_val.npz"]]
    assert sum(f.stat().st_size for f in files) < 2_000_000
    feeds = _tokens(VAL, 16)
    outputs = [_run(MODELS / name, feeds) for name in BERTS]
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], atol=1e-4)
    fused_ops = {n.op_type for n in onnx.load(str(MODELS / "bert_tiny_fused.onnx")).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"} <= fused_ops


def test_token_data_has_real_padding():
    for path in (CALIB, VAL):
        data = _tokens(path)
        assert all(data[k].dtype == np.int64 and data[k].shape == data["input_ids"].shape for k in TOKENS)
        lengths = data["attention_mask"].sum(1)
        assert lengths.min() < lengths.max() == data["input_ids"].shape[1]
        assert np.all(data["input_ids"][data["attention_mask"] == 0] == 0)


@pytest.mark.parametrize("name", BERTS)
def test_every_export_says_what_its_token_inputs_hold(name):
    """The embedding tables (200 words, 2 token types) and the mask are found however the exporter wrote them."""
    assert token_rules(onnx.load(str(MODELS / name))) == {
        "input_ids": TokenRule("input_ids", rows=200), "token_type_ids": TokenRule("token_type_ids", rows=2),
        "attention_mask": TokenRule("attention_mask", mask=True)}


def test_int32_tokens_are_taken_as_given(tmp_path):
    """Integer data keeps its values: no float conversion, no normalisation (int32 becomes the model's int64)."""
    model = load_model(MODELS / "bert_tiny.onnx")
    given = {k: v.astype(np.int32) for k, v in _tokens(n=10).items()}
    path = tmp_path / "int32.npz"
    np.savez(path, **given)
    loaded = load_data(model, DataOptions(path=str(path), limit=10), None).inputs
    for key, value in loaded.items():
        assert value.dtype == np.int64
        np.testing.assert_array_equal(value, given[key])


@pytest.fixture
def bad_npz(tmp_path):
    def write(change) -> Path:
        data = _tokens(n=8)
        change(data)
        path = tmp_path / "bad.npz"
        np.savez(path, **data)
        return path
    return write


def _negative(d):
    d["input_ids"][3, 2] = -1


def _too_large(d):
    d["token_type_ids"][5, 0] = 2


def _short_mask(d):
    d["attention_mask"] = d["attention_mask"][:, :-1]


def _mask_of_two(d):
    d["attention_mask"][1, 0] = 2


def _empty_sample(d):
    d["attention_mask"][6] = 0


def _float_ids(d):
    d["input_ids"] = d["input_ids"].astype(np.float32)


BAD = [(_negative, "array 'input_ids' has token id -1 at sample 3; the model's embedding takes ids 0..199"),
       (_too_large, "array 'token_type_ids' has token id 2 at sample 5; the model's embedding takes ids 0..1"),
       (_short_mask, "array 'attention_mask' has 31 at axis 1 ('seq') but 'input_ids' has 32; the model needs them "
                     "equal"),
       (_mask_of_two, "array 'attention_mask' is an attention mask but has values other than 0 and 1 (sample 1)"),
       (_empty_sample, "array 'attention_mask' masks out every position of sample 6"),
       (_float_ids, "input 'input_ids': data has dtype float32, the model expects int64")]


@pytest.mark.parametrize("name", BERTS)
@pytest.mark.parametrize("change, fragment", BAD, ids=[c.__name__.strip("_") for c, _ in BAD])
def test_bad_token_data_is_exit_7(name, change, fragment, bad_npz, tmp_path, capsys):
    """--calib refuses bad token data before any work, with one line and nothing written."""
    path = bad_npz(change)
    model = Path(shutil.copy(MODELS / name, tmp_path / name))
    before = snapshot(tmp_path)
    code, _, err = run_main([model, "--channels", "0.3", "--calib", path, "-o", tmp_path / "out.onnx"], capsys)
    assert code == 7, err
    assert_one_error(err, fragment)
    assert snapshot(tmp_path) == before


def test_validate_data_refuses_bad_tokens_too(bad_npz, capsys):
    code, _, err = run_main(["validate", MODELS / "bert_tiny.onnx", MODELS / "bert_tiny_dynamo.onnx", "--data",
                             bad_npz(_negative)], capsys)
    assert code == 7, err
    assert_one_error(err, "token id -1 at sample 3")


@pytest.mark.parametrize("name", ["bert_tiny.onnx", "bert_tiny_fused.onnx"])
def test_generated_data_is_valid_token_data(name):
    """Without --data, ids are drawn within their tables and masks are all ones (integers in [0, 10) were not valid
    token types, and onnxruntime failed on them)."""
    model = load_model(MODELS / name)
    shapes = {k: [1, 16] for k in TOKENS}
    data = load_data(model, DataOptions(limit=8, batch_size=4), shapes)
    assert data.inputs["input_ids"].max() > 10 and data.inputs["token_type_ids"].max() <= 1
    assert np.all(data.inputs["attention_mask"] == 1)
    assert np.isfinite(_run(MODELS / name, data.inputs)).all()


def _with_padding_ids(ids_at_padding: int, tmp_path: Path) -> Path:
    data = _tokens(n=64)
    data["input_ids"][data["attention_mask"] == 0] = ids_at_padding
    path = tmp_path / f"pad{ids_at_padding}.npz"
    np.savez(path, **data)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert_tiny.onnx", "bert_tiny_fused.onnx"])
def test_recovery_ignores_padding_positions(name, tmp_path):
    """What sits at padding positions cannot change the real tokens' outputs (the mask keeps it out of attention),
    so it must not change the fit either: two calibration sets that differ only in the ids at padding positions give
    the same recovered weights. A fit or an output error that counted padding rows would differ. (The criterion is
    l1, so the same channels are removed whatever the data.)"""
    results = []
    for ids in (0, 123):
        out = tmp_path / f"out{ids}.onnx"
        report = prune_file(MODELS / name, out, PruneOptions(channels=0.3, criterion="l1", round_to=1,
                                                             calib=str(_with_padding_ids(ids, tmp_path))))
        results.append((report, {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}))
    (first, weights0), (second, weights1) = results
    assert weights0.keys() == weights1.keys()
    if first.recovery.layers or name != "bert_tiny_fused.onnx":  # the fused graph may have nothing prunable yet
        assert any(f.accepted for f in first.recovery.layers)
        assert first.recovery.output_error_after == pytest.approx(second.recovery.output_error_after, rel=1e-9)
    for key, value in weights0.items():
        np.testing.assert_allclose(weights1[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_padding_ids_do_change_padding_activations():
    """Guard for the test above: the two calibration sets really differ where recovery must not look."""
    a, b = _tokens(n=8), _tokens(n=8)
    b["input_ids"][b["attention_mask"] == 0] = 123
    out_a, out_b = _run(MODELS / "bert_tiny.onnx", a), _run(MODELS / "bert_tiny.onnx", b)
    pad = a["attention_mask"] == 0
    np.testing.assert_allclose(out_a[~pad], out_b[~pad], atol=1e-5)
    assert np.abs(out_a[pad] - out_b[pad]).max() > 0.1


LINEAR_PAIR = """
<ir_version: 8, opset_import: ["" : 17]>
pair (float[N, 6, 8] x) => (float[N, 6, 4] y) {
    h = MatMul(x, w1)
    hb = Add(h, b1)
    r = Relu(hb)
    o = MatMul(r, w2)
    y = Add(o, b2)
}
"""


def _linear_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Linear -> Relu -> Linear written as exporters write Linear (MatMul + Add), and calibration data for it."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(LINEAR_PAIR)
    values = {"w1": 0.3 * rng.standard_normal((8, 16)), "b1": rng.standard_normal(16) + 4.0,
              "w2": rng.standard_normal((16, 4)), "b2": rng.standard_normal(4)}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items())
    path, calib = tmp_path / "pair.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(path))
    np.savez(calib, x=rng.standard_normal((64, 6, 8)).astype(np.float32))
    return path, calib


def test_lsq_fits_the_intercept_of_a_matmul_into_the_add_after_it(tmp_path, monkeypatch):
    """Removed Relu channels have a positive mean that the kept ones reproduce only partly (with b1 around 4 the Relus
    are nearly always on, so the kept channels are close to an affine map of x); the MatMul has no intercept of its
    own, so lsq moves one into the Add's constant (no node added) and ends closer to the original (measured: relative
    output error 0.00210 against 0.00226 without; the ridge damping keeps the intercept small)."""
    from onnxprune.recovery import lsq

    path, calib = _linear_pair(tmp_path)
    options = PruneOptions(channels=0.5, criterion="l1", round_to=1, calib=str(calib))
    with_intercept = prune_file(path, tmp_path / "a.onnx", options)
    monkeypatch.setattr(lsq, "following_bias", lambda *args: None)
    without = prune_file(path, tmp_path / "b.onnx", options)
    assert with_intercept.recovery.output_error_after < 0.97 * without.recovery.output_error_after
    fitted = onnx.load(str(tmp_path / "a.onnx"))
    b2 = next(onnx.numpy_helper.to_array(t) for t in fitted.graph.initializer if t.name == "b2")
    original_b2 = next(onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == "b2")
    assert np.abs(b2 - original_b2).max() > 0.1
    assert [n.op_type for n in fitted.graph.node] == ["MatMul", "Add", "Relu", "MatMul", "Add"]


def _masked_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.reshape(-1) != 0
    a, b = a.reshape(-1, a.shape[-1])[keep].astype(np.float64), b.reshape(-1, b.shape[-1])[keep].astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.slow
def test_bert_ffn_pruning_with_calibration_keeps_the_held_out_output(tmp_path):
    """--channels 0.3 (FFN only today): held-out cosine at real tokens 0.972 without --calib, 0.990 with (recon +
    lsq); the issue's target for the whole model (heads too) is >= 0.95."""
    val = _tokens(VAL)
    reference = _run(MODELS / "bert_tiny.onnx", val)
    cosines = []
    for calib in (None, str(CALIB)):
        prune_file(MODELS / "bert_tiny.onnx", tmp_path / "out.onnx", PruneOptions(channels=0.3, calib=calib))
        cosines.append(_masked_cosine(reference, _run(tmp_path / "out.onnx", val), val["attention_mask"]))
    assert 0.95 <= cosines[1] and cosines[0] + 0.01 < cosines[1], cosines


@pytest.mark.slow
def test_digits_vit_keeps_its_top1_within_one_point(tmp_path):
    """The issue's ViT target, accuracy half: --channels 0.3 --calib within one point of the original's held-out
    top-1 (measured 96.94% -> 96.66%; the MACs half, <= 0.70, needs heads: FFN only keeps 0.79)."""
    with np.load(MODELS / "digits_val.npz") as data:
        images, labels = data["input"], data["labels"]
    prune_file(MODELS / "digits_vit.onnx", tmp_path / "vit.onnx",
               PruneOptions(channels=0.3, calib=str(MODELS / "digits_calib.npz")))
    top1 = [float(np.mean(_run(path, {"input": images}).argmax(1) == labels))
            for path in (MODELS / "digits_vit.onnx", tmp_path / "vit.onnx")]
    assert top1[0] > 0.95 and top1[1] >= top1[0] - 0.01, top1


@pytest.mark.slow
def test_bn_recovery_matches_layer_norm_statistics(tmp_path):
    """--recover bn on a transformer rewrites LayerNorm scales/biases (per channel, at real tokens) and brings the
    held-out output closer than no recovery (measured 0.975 -> 0.980 at --channels 0.3)."""
    val = _tokens(VAL)
    reference = _run(MODELS / "bert_tiny.onnx", val)
    cosines, reports = [], []
    for method in ("none", "bn"):
        reports.append(prune_file(MODELS / "bert_tiny.onnx", tmp_path / "out.onnx",
                                  PruneOptions(channels=0.3, recover=method, calib=str(CALIB))))
        cosines.append(_masked_cosine(reference, _run(tmp_path / "out.onnx", val), val["attention_mask"]))
    assert {f.kind for f in reports[1].recovery.layers} == {"ln-moments"} and reports[1].recovery.kept
    assert cosines[0] + 0.002 < cosines[1], cosines


@pytest.mark.parametrize("name", BERTS)
def test_cli_calib_and_validate_with_token_data(name, tmp_path, capsys):
    """--calib, --validate and --data on every export: exit 0 and an agreement row for the hidden states."""
    model = Path(shutil.copy(MODELS / name, tmp_path / name))
    code, out, err = run_main([model, "--channels", "0.3", "--calib", CALIB, "--calib-limit", "16", "--criterion", "l1", "--recover",
                               "none", "-o", tmp_path / "out.onnx", "--validate", "--data", VAL, "--limit", "16",
                               "--runs", "0", "--no-mobile"], capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("last_hidden_state"))
    cosine = float(row.split()[2])  # over all positions, padding included
    assert 0.8 < cosine and (cosine < 1.0 or name == "bert_tiny_fused.onnx")  # fused ops may have no rules yet


@pytest.mark.parametrize("name", BERTS)
def test_verify_draws_valid_token_ids_and_proves_heads_and_ffn(tmp_path, capsys, name):
    """--verify's random inputs respect the token-type table (2 rows here): ids in [0, 4) made onnxruntime refuse
    the original, so --verify could not run on a BERT export; now it proves the heads/FFN removal."""
    shapes = [a for n in ("input_ids", "attention_mask", "token_type_ids") for a in ("--input-shape", f"{n}:2x16")]
    code, out, err = run_main([MODELS / name, "--channels", "0.3", "--verify", "-o", tmp_path / "out.onnx", *shapes],
                              capsys)
    assert code == 0, err
    assert "verified the channel removal" in out and "max relative difference 0" in out
