"""The data stage: one loader serves ``--calib`` and ``validate --data`` with the same preprocessing, and a run loads
its calibration data once (``--steps`` included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.data import sources
from onnxprune.data.loader import DataOptions, load_data, load_feeds
from onnxprune.data.sources import Dataset, Preprocess
from onnxprune.graph.io import load_model
from onnxprune.pipeline import PruneOptions, prune_model

from cli_support import run_main
from conftest import MODELS

RESNET = MODELS / "digits_resnet.onnx"
CALIB = MODELS / "digits_calib.npz"
VAL = MODELS / "digits_val.npz"
# the image options a user gives once on the prune command, and what the CLI must make of them
IMAGE_ARGS = ["--resize", "9", "--center-crop", "8", "--mean", "0.5", "--std", "0.25", "--scale", "0.5",
              "--layout", "nchw"]
GIVEN = Preprocess(resize=9, center_crop=8, mean=(0.5,), std=(0.25,), scale=0.5, layout="NCHW")


def _digits(path: Path, n: int) -> Dataset:
    data = np.load(path)
    labels = data["labels"][:n] if "labels" in data.files else None
    return Dataset({"input": data["input"][:n]}, labels, source=str(path))


def test_npz_feeds_calibration_and_validation_alike():
    """The batches calibration gets are validation's samples cut into batches; image options leave an npz alone."""
    model = load_model(RESNET)
    options = DataOptions(path=str(CALIB), limit=40, batch_size=16, preprocess=GIVEN)
    feeds = load_feeds(model, options, None)
    assert [len(f["input"]) for f in feeds] == [16, 16, 8]
    whole = load_data(model, options, None)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), whole.inputs["input"])
    np.testing.assert_array_equal(whole.inputs["input"], np.load(CALIB)["input"][:40])


def test_calib_and_data_get_the_image_options(tmp_path, capsys, monkeypatch):
    """``--mean/--std/--layout/...`` given once reach both the ``--calib`` and the ``--data`` image folder (before
    this, calibration always got the default preprocessing)."""
    calib, val = tmp_path / "calib_images", tmp_path / "val_images"
    calib.mkdir()
    val.mkdir()
    seen: list[tuple[Path, Preprocess]] = []

    def fake_folder(path: Path, specs, pre: Preprocess, limit: int | None = None) -> Dataset:
        seen.append((Path(path), pre))
        return _digits(CALIB if Path(path) == calib else VAL, 64)

    monkeypatch.setattr(sources, "load_image_folder", fake_folder)
    code, _, err = run_main([str(RESNET), "--channels", "0.5", "--round-to", "1", "--criterion", "l1", "--recover",
                             "none", "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--validate", "--data",
                             str(val), "--runs", "0", "--no-mobile", *IMAGE_ARGS], capsys)
    assert code == 0, err
    assert seen == [(calib, GIVEN), (val, GIVEN)]


def test_steps_load_the_calibration_data_once(monkeypatch):
    reads: list[Path] = []
    real = sources.load_npz

    def counting(path: Path, *args, **kwargs) -> Dataset:
        reads.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sources, "load_npz", counting)
    report = prune_model(load_model(RESNET), PruneOptions(channels=0.5, steps=3, round_to=1, criterion="l1",
                                                          recover="none", calib=str(CALIB), calib_limit=64))
    assert len(report.recovery.steps) == 3  # three rounds ran, and the final error was measured on the same data
    assert report.recovery.output_error_after is not None
    assert reads == [CALIB]


def _image_folder(root: Path, n: int) -> np.ndarray:
    """PNG files from the digits samples (one class folder per label); returns their 0..255 pixels in file order."""
    image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (pip install pillow)")
    data = np.load(VAL)
    pixels = np.round(data["input"][:n, 0] * 255).astype(np.uint8)
    order = []
    for i, (img, label) in enumerate(zip(pixels, data["labels"][:n])):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
        order.append((f"class_{label}", f"{i:03d}.png", i))
    return pixels[[i for *_, i in sorted(order)]]


def test_image_folder_is_prepared_alike_for_calibration_and_validation(tmp_path):
    pixels = _image_folder(tmp_path / "images", 24)
    model = load_model(RESNET)
    pre = Preprocess(mean=(0.5,), std=(0.25,), scale=1 / 255, layout="NCHW")
    options = DataOptions(path=str(tmp_path / "images"), batch_size=10, preprocess=pre)
    expected = ((pixels.astype(np.float32) / 255 - 0.5) / 0.25)[:, None]
    validation = load_data(model, options, None).inputs["input"]
    calibration = np.concatenate([f["input"] for f in load_feeds(model, options, None)])
    np.testing.assert_allclose(validation, expected, atol=1e-5)
    np.testing.assert_array_equal(calibration, validation)
    default = load_data(model, DataOptions(path=str(tmp_path / "images")), None).inputs["input"]
    assert not np.allclose(default, validation)  # the options changed the tensors
