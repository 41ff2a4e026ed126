"""Running a model on calibration data and reducing the activations it needs on the fly.

Why a module of its own: scoring and recovery both need intermediate tensors, but never all of them at once. A
:class:`Probe` registers every tensor of interest as an extra graph output once, then each ``run`` asks onnxruntime
for only the few tensors needed now (onnxruntime computes just what those outputs need), batch by batch, and the
caller folds each batch into small statistics (per-channel moments, Gram matrices) before the next one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import ConfigError


class Probe:
    """An onnxruntime session over ``proto`` that can return any listed intermediate tensor."""

    def __init__(self, proto: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]]) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        present = {o.name for o in model.graph.output}
        for name in dict.fromkeys(tensors):
            if name not in present:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several types
            raise ConfigError(f"cannot run the model for calibration: {str(exc).splitlines()[0]}") from None
        self.batches = batches

    def iterate(self, names: list[str]) -> Iterator[list[np.ndarray]]:
        """For each calibration batch, the values of ``names``."""
        fetch = [n for n in names if n not in self.batches[0]] if self.batches else names
        for feed in self.batches:
            values = dict(zip(fetch, self.session.run(fetch, feed))) if fetch else {}
            yield [feed[n] if n in feed else values[n] for n in names]


def to_batches(inputs: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[s : s + batch_size] for k, v in inputs.items()} for s in range(0, n, batch_size)]


def channel_moments(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-index sum, sum of squares and sum of |x| along ``axis`` over every other axis, and the count."""
    moved = np.moveaxis(values.astype(np.float64), axis, 0).reshape(values.shape[axis], -1)
    return moved.sum(1), (moved * moved).sum(1), np.abs(moved).sum(1), moved.shape[1]


class Moments:
    """Running per-channel mean, variance and mean |x| of one tensor axis."""

    def __init__(self) -> None:
        self.s = self.s2 = self.a = None
        self.n = 0

    def add(self, values: np.ndarray, axis: int) -> None:
        s, s2, a, n = channel_moments(values, axis)
        if self.s is None:
            self.s, self.s2, self.a = s, s2, a
        else:
            self.s, self.s2, self.a = self.s + s, self.s2 + s2, self.a + a
        self.n += n

    @property
    def mean(self) -> np.ndarray:
        return self.s / max(self.n, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.s2 / max(self.n, 1) - self.mean ** 2, 0.0)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.a / max(self.n, 1)


def collect_moments(proto: onnx.ModelProto, dims: list, batches: list[dict[str, np.ndarray]],
                    chunk: int = 16) -> dict:
    """Per-channel :class:`Moments` of each (tensor, axis) in ``dims``, a few tensors per pass over the data."""
    tensors = list(dict.fromkeys(d.tensor for d in dims))
    if not tensors or not batches:
        return {}
    probe = Probe(proto, [t for t in tensors if t not in batches[0]], batches)
    result = {d: Moments() for d in dims}
    by_tensor: dict[str, list] = {}
    for d in dims:
        by_tensor.setdefault(d.tensor, []).append(d)
    for start in range(0, len(tensors), chunk):
        names = tensors[start : start + chunk]
        for values in probe.iterate(names):
            for name, value in zip(names, values):
                for d in by_tensor[name]:
                    result[d].add(value, d.axis)
    return result
