"""Bad data is an error, not a silent result: NaN/inf, no samples and 0-d arrays in calibration or validation data,
NaN weights, and scores or fits that come out non-finite.

Every CLI case checks the exit code, that stderr is one line naming the file and the first bad sample, and that the
folder holds exactly what it held before (no output, no temporary file).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.data.probe import Probe
from onnxprune.errors import DataError
from onnxprune.finite import first_nonfinite
from onnxprune.graph.io import from_proto, load_model
from onnxprune.pipeline import PruneOptions, prune_model
from onnxprune.recovery.recover import _output_error
from onnxprune.data.loader import DataOptions, load_data

from conftest import MANIFEST, MODELS
from cli_support import assert_one_error, run_main, snapshot

NAN_WEIGHT = {"digits_resnet.onnx": "layer1.conv1.weight", "resnet_dynamo.onnx": "layer1.0.conv1.weight"}


@pytest.fixture
def copy_model(model_copy, tmp_path):
    """``model_copy`` for zoo models (with their external data), a plain copy for the digits models."""

    def copy(name: str) -> Path:
        return model_copy(name) if name in MANIFEST else Path(shutil.copy(MODELS / name, tmp_path / name))

    return copy


def _samples(model: str, n: int = 24) -> np.ndarray:
    """Finite calibration inputs for ``model`` (real digits for the digits model, else random)."""
    if model.startswith("digits"):
        return np.load(MODELS / "digits_calib.npz")["input"][:n]
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _bad_npz(folder: Path, model: str, variant: str) -> tuple[Path, str]:
    """An npz for ``model`` broken one way, and the message fragment its error must contain."""
    x = _samples(model).copy()
    path = folder / f"{variant}.npz"
    if variant == "nan":
        x[17, 0, 1, 2] = np.nan
        fragment = "array 'input' has NaN at sample 17"
    elif variant == "inf":
        x[5, 0, 0, 0] = -np.inf
        fragment = "array 'input' has -inf at sample 5"
    elif variant == "empty":
        x = x[:0]
        fragment = "array 'input' has no samples"
    else:
        x = np.float32(1.0)
        fragment = "array 'input' is a 0-d scalar"
    np.savez(path, input=x)
    return path, fragment


@pytest.mark.parametrize("model", ["digits_resnet.onnx", "resnet_dynamo.onnx"])
@pytest.mark.parametrize("variant", ["nan", "inf", "empty", "scalar"])
@pytest.mark.parametrize("use", ["calibration", "validation"])
def test_bad_data_is_exit_7_and_leaves_nothing(copy_model, tmp_path, capsys, model, variant, use):
    path = copy_model(model)
    npz, fragment = _bad_npz(tmp_path, model, variant)
    before = snapshot(tmp_path)
    if use == "calibration":
        args = [path, "--channels", "0.3", "--calib", npz, "-o", tmp_path / "out.onnx"]
    else:
        args = ["validate", path, path, "--data", npz, "--runs", "0", "--no-mobile", "--json", tmp_path / "report.json"]
    code, _, err = run_main(args, capsys)
    assert code == 7, err
    assert_one_error(err, f"{npz}: ", fragment)
    assert snapshot(tmp_path) == before


def test_prune_then_validate_with_bad_data_is_exit_7(copy_model, tmp_path, capsys):
    path = copy_model("digits_resnet.onnx")
    npz, fragment = _bad_npz(tmp_path, "digits_resnet.onnx", "nan")
    code, _, err = run_main([str(path), "--sparsity", "0.5", "-o", str(tmp_path / "out.onnx"), "--validate",
                             "--data", str(npz), "--runs", "0", "--no-mobile"], capsys)
    assert code == 7, err
    assert_one_error(err, fragment)


def test_bad_labels_name_the_sample(tmp_path):
    model = load_model(MODELS / "digits_resnet.onnx")
    x = _samples("digits_resnet.onnx", 8)
    for labels, fragment in ((np.array([0, 1, 2, np.nan, 4, 5, 6, 7]), "labels 'labels' has NaN at sample 3"),
                             (np.array([0, 1, 2, 3, -4, 5, 6, 7]), "labels 'labels' has -4 at sample 4")):
        np.savez(tmp_path / "l.npz", input=x, labels=labels)
        with pytest.raises(DataError, match=fragment):
            load_data(model, DataOptions(path=str(tmp_path / "l.npz")), None)


def test_float64_beyond_float32_is_inf_after_the_cast(tmp_path):
    x = _samples("digits_resnet.onnx", 4).astype(np.float64)
    x[2, 0, 0, 0] = 1e300
    np.savez(tmp_path / "big.npz", input=x)
    with pytest.raises(DataError, match="'input' cast to float32 has inf at sample 2"):
        load_data(load_model(MODELS / "digits_resnet.onnx"), DataOptions(path=str(tmp_path / "big.npz")), None)


def test_first_nonfinite():
    assert first_nonfinite(np.ones((3, 2), np.float32)) is None
    assert first_nonfinite(np.arange(6)) is None  # integers cannot be NaN
    assert first_nonfinite(np.zeros((0, 4))) is None
    x = np.ones((4, 2, 2))
    x[3, 1, 0], x[2, 0, 1] = np.nan, -np.inf
    assert first_nonfinite(x) == (2, "-inf")
    assert first_nonfinite(np.float64(np.inf)) == (None, "inf")
    assert first_nonfinite(np.array([1.0, np.nan])) == (1, "NaN")


def _nan_weight_copy(folder: Path, model: str) -> Path:
    """``model`` with one NaN in a weight (external data stays external, in a data file of its own)."""
    proto = onnx.load(str(MODELS / model))
    tensor = next(t for t in proto.graph.initializer if t.name == NAN_WEIGHT[model])
    values = numpy_helper.to_array(tensor).copy()
    values[2, 0, 0, 0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    path = folder / f"nan_{model}"
    external = model == "resnet_dynamo.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=external, location=f"{path.name}.data")
    return path


@pytest.mark.parametrize("model", ["digits_resnet.onnx", "resnet_dynamo.onnx"])
@pytest.mark.parametrize("args", [["--channels", "0.3"], ["--sparsity", "0.5"], ["--channels", "0.3", "--calib"],
                                  ["--sparsity", "0.5", "--calib"]])
def test_nan_weight_is_an_input_model_error(tmp_path, capsys, model, args):
    """l1 scores, wanda/obs scores and calibration activations of a NaN weight name it (exit 3), never a choice by
    position (NaN compares neither higher nor lower)."""
    path = _nan_weight_copy(tmp_path, model)
    if args[-1] == "--calib":
        np.savez(tmp_path / "calib.npz", input=_samples(model))
        args = [*args, str(tmp_path / "calib.npz")]
    before = snapshot(tmp_path)
    code, _, err = run_main([path, *args, "-o", tmp_path / "out.onnx"], capsys)
    assert code == 3, err
    assert_one_error(err, f"weight '{NAN_WEIGHT[model]}' has NaN")
    assert snapshot(tmp_path) == before


def _digits(tmp_path: Path) -> tuple:
    np.savez(tmp_path / "calib.npz", input=_samples("digits_resnet.onnx", 64))
    return from_proto(onnx.load(str(MODELS / "digits_resnet.onnx"))), str(tmp_path / "calib.npz")


def test_nonfinite_recon_scores_raise(tmp_path, monkeypatch):
    import onnxprune.importance.recon as reconstruction

    monkeypatch.setattr(reconstruction._Consumer, "costs", lambda self, channels: np.full(len(channels), np.nan))
    model, calib = _digits(tmp_path)
    with pytest.raises(DataError, match=r"group '.+': recon score has NaN at channel 0"):
        prune_model(model, PruneOptions(channels=0.3, criterion="recon", calib=calib, recover="none"))


@pytest.mark.parametrize("solver, fragment", [("refit", "the lsq fit has NaN"),
                                              ("relu_refit", "the Relu-aware refinement has NaN")])
def test_nonfinite_fit_is_dropped_and_said(tmp_path, monkeypatch, solver, fragment):
    """A fit with NaN is never used: its layer keeps its weights, a note says so, and the output error stays a
    number (formerly: "lsq kept: output error nan")."""
    import onnxprune.recovery.lsq as recover

    real = getattr(recover, solver)

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        weights = out[0] if isinstance(out, tuple) else out
        weights = np.full_like(weights, np.nan)
        return (weights, float("nan")) if isinstance(out, tuple) else weights

    monkeypatch.setattr(recover, solver, poisoned)
    model, calib = _digits(tmp_path)
    report = prune_model(model, PruneOptions(channels=0.3, calib=calib, recover="lsq", round_to=1))
    assert any(fragment in note for note in report.notes), report.notes
    assert np.isfinite(report.recovery.output_error_before) and np.isfinite(report.recovery.output_error_after)
    assert not any("nan" in note.replace("NaN", "") for note in report.notes), report.notes
    for tensor in model.proto.graph.initializer:
        assert first_nonfinite(numpy_helper.to_array(tensor)) is None, tensor.name


def _mul_relu(k: float) -> onnx.ModelProto:
    """z = relu(x * [k, 1]): a model that overflows float32 for large k."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.float32([k, 1]), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_probe_refuses_nonfinite_activations_and_names_the_cause():
    x = np.ones((5, 2), np.float32)
    x[3, 0] = 1e10
    batches = [{"x": x[:2]}, {"x": x[2:]}]
    with pytest.raises(DataError, match="tensor 'z' is inf at calibration sample 3 although the data and weights"):
        list(Probe(_mul_relu(1e30), ["z"], batches).iterate(["z"]))
    x[4, 1] = np.nan  # a library caller passing unchecked data: the data is named, not the model
    with pytest.raises(DataError, match="calibration data: input 'x' has NaN at sample 4"):
        list(Probe(_mul_relu(1.0), ["z"], [{"x": x[:2]}, {"x": x[2:]}]).iterate(["z"]))


def test_nan_output_error_is_an_error():
    class Fixed:
        def __init__(self, value: float) -> None:
            self.value = value

        def iterate(self, names):
            yield [np.full((2, 3), self.value, np.float32)]

    proto = helper.make_model(helper.make_graph([], "g", [], [helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [2, 3])]))
    assert _output_error(Fixed(1.0), Fixed(1.0), proto) == 0.0
    with pytest.raises(DataError, match="output error on the calibration data has NaN"):
        _output_error(Fixed(1.0), Fixed(np.nan), proto)
