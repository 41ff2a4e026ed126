"""The basis the hidden stream is sliced to (pure numpy; the caller decides which activations to feed).

Pre-LN (SliceGPT, Ashkboos et al. 2024): once every writer of the stream subtracts its own mean and LayerNorm
becomes RMSNorm, the model is invariant under any orthogonal Q applied to the stream (writers W -> W Q, readers
W -> Q^T W, since ||x Q|| = ||x||). Q is taken as the principal directions of the normalised stream on calibration
data, so slicing its last components removes the directions the readers see least. One Q is shared by every
position of the stream, so the residual path needs no extra matrices (SliceGPT uses one per block and rotates the
shortcut between them, which costs a k x k MatMul on every residual connection).

Post-LN: nothing is invariant (the norm after each Add sees the channels themselves), so whole channels are kept by
a score: their energy after the norm times the squared weight rows of the layers that read them (activation-aware,
like ``act`` for channels), summed over the norms after each one is divided by its mean.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import DataError
from onnxprune.finite import require_finite


def keep_count(width: int, fraction: float) -> int:
    """Hidden channels kept when ``fraction`` of ``width`` is removed (at least one)."""
    return max(1, width - int(round(fraction * width)))


class StreamCovariance:
    """Sum of z^T z over tokens, z the stream normalised per token the way the model's norms will see it
    (centred first for LayerNorm models, whose writers get centred)."""

    def __init__(self, width: int, centre: bool, epsilon: float) -> None:
        self.gram = np.zeros((width, width))
        self.centre = centre
        self.epsilon = epsilon
        self.rows = 0

    def add(self, values: np.ndarray) -> None:
        z = values.reshape(-1, values.shape[-1]).astype(np.float64)
        if self.centre:
            z = z - z.mean(axis=1, keepdims=True)
        z = z / np.sqrt(np.mean(z * z, axis=1, keepdims=True) + self.epsilon)
        self.gram += z.T @ z
        self.rows += len(z)


def principal_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, variances): eigenvectors of ``gram`` as columns, by decreasing eigenvalue; Q is orthogonal."""
    require_finite(gram, "the covariance of the stream on the calibration data", DataError)
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    return vectors[:, order], values[order]


def channel_scores(energies: list[np.ndarray], reader_rows: list[np.ndarray]) -> np.ndarray:
    """Per hidden channel: sum over norms of (mean square after the norm) x (squared reader weight rows), each norm's
    share divided by its mean so that every norm counts alike."""
    total = np.zeros_like(energies[0], dtype=np.float64)
    for energy, rows in zip(energies, reader_rows):
        share = energy * rows
        mean = share.mean()
        total += share / mean if mean > 0 else share
    require_finite(total, "the hidden-channel scores on the calibration data", DataError)
    return total


def selection(width: int, kept: np.ndarray) -> np.ndarray:
    """The [width, k] 0/1 matrix that keeps channels ``kept`` (a basis like a rotation, for the same rewrite)."""
    return np.eye(width)[:, np.sort(kept)]
