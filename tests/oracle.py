"""Test helpers around the exactness oracle (the oracle itself is onnxprune.prune.verify, which --verify uses), and
running a model in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.prune.verify import masked_model, run  # noqa: F401  (re-exported for the tests)
from onnxprune.prune.verify import random_feeds as _random_feeds


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return _random_feeds(model, batch, seed, fill_unknown=batch)  # every dynamic dim (batch, H, W) = ``batch``


def assert_matches(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   rtol: float = 1e-3, atol: float = 1e-4) -> None:
    for e, a in zip(run(expected, feeds), run(actual, feeds)):
        assert e.shape == a.shape, (e.shape, a.shape)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)


def first_output(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` on ``feeds`` in a default CPU session; a saved model is loaded by onnxruntime
    from its path, external data included."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
