"""Optimal Brain Surgeon for single weights (``--criterion obs``), computed the SparseGPT way.

Why: magnitude and Wanda choose the weights to zero before anything is re-fitted; OBS chooses them by how much of
the layer's output is lost *after* the remaining weights are updated, from the Gram matrix H = X^T X of the layer's
calibration inputs. Visiting the inputs (columns of W) in a fixed order and using the Cholesky factor of H^-1
(Frantar & Alistarh, SparseGPT, 2023) makes one layer an O(K^3 + O K^2) computation instead of a greedy search, so a
4608-wide layer takes about a second.

The same sweep with the mask given instead of chosen is the fast form of "re-fit the kept weights" for layers too
wide for an exact per-output solve, and with a ``project`` onto a quantization grid instead of zeros it is GPTQ
(Frantar et al., 2023; quantize/gptq.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BLOCK = 128  # columns whose mask is chosen together (SparseGPT's adaptive mask selection)


def _block_counts(total: int, columns: int, block: int) -> list[int]:
    """How many of ``total`` zeros fall in each block of columns, so that the blocks add up exactly."""
    edges = list(range(0, columns, block)) + [columns]
    cumulative = [round(total * e / columns) for e in edges]
    return [b - a for a, b in zip(cumulative, cumulative[1:])]


class Hessian:
    """A layer's damped Gram matrix H = X^T X + damp*mean(diag) I, with its inverse and the Cholesky factors the sweep
    needs computed once (each is O(K^3): the dominant cost for wide layers). Features never seen (zero diagonal)
    get a unit diagonal, which leaves them decoupled."""

    def __init__(self, gram: np.ndarray, damp: float) -> None:
        self.gram = gram
        self.lam = damp * float(np.mean(np.diag(gram))) + 1e-12
        self._inverse: np.ndarray | None = None
        self._factors: dict[bytes, np.ndarray] = {}

    def damped(self) -> np.ndarray:
        h = self.gram.copy()
        dead = np.diag(h) <= 0
        h[dead, dead] = 1.0
        h[np.diag_indices_from(h)] += self.lam
        return h

    @property
    def inverse(self) -> np.ndarray:
        if self._inverse is None:
            inverse = np.linalg.inv(self.damped())
            self._inverse = (inverse + inverse.T) / 2
        return self._inverse

    def solve(self, cross: np.ndarray) -> np.ndarray:
        """The dense ridge solution H^-1 C (a solve is 3x cheaper than an inverse when none is needed)."""
        return self._inverse @ cross if self._inverse is not None else np.linalg.solve(self.damped(), cross)

    def factor(self, perm: np.ndarray) -> np.ndarray:
        """Upper U with U^T U = H^-1 with features in the order ``perm``."""
        key = perm.tobytes()
        if key not in self._factors:
            self._factors[key] = np.linalg.cholesky(self.inverse[np.ix_(perm, perm)]).T
        return self._factors[key]


def obs_sweep(weights: np.ndarray, hessian: Hessian, prunable: int, *, zeros: int | None = None,
              pattern: tuple[int, int] | None = None, mask: np.ndarray | None = None,
              order: np.ndarray | None = None,
              project: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Zero weights and update the rest so the layer's output on the calibration inputs changes least.

    Args:
        weights: [K, O]: feature rows (the reduction dimension), one column per output.
        hessian: of the calibration rows, in the same feature order as ``weights``.
        prunable: rows ``0..prunable-1`` may be zeroed; rows after them (a bias row) are only updated.
        zeros: choose exactly this many zeros among the prunable rows (OBS saliency w^2 / [H^-1]_ii, per block).
        pattern: (N, M): keep N of every M consecutive prunable rows in ``order``, per output.
        mask: [prunable, O] booleans, True = zero: the weights to remove are given; only the update is computed.
        order: the order in which prunable rows are visited (a permutation of 0..prunable-1); N:M groups must be
            consecutive in it.
        project: (feature row, that row's weights [O] as updated so far) -> the values it takes instead of zero or
            itself (GPTQ: the nearest point of a grid); the error is spread over the rows not visited yet as for
            zeros. It replaces ``mask``/``zeros``/``pattern`` and leaves always-zero inputs' weights to it.
    Returns:
        The new [K, O] weights (float64).
    """
    k_all, _ = weights.shape
    order = np.arange(prunable) if order is None else np.asarray(order)
    perm = np.concatenate([order, np.arange(prunable, k_all)])
    w = weights[perm].T.astype(np.float64).copy()  # [O, K] in visiting order, as in SparseGPT
    given = None if mask is None else mask[order].T
    if given is None and project is None:  # weights on inputs that are always zero cost nothing to remove
        w[:, np.flatnonzero(np.diag(hessian.gram)[order] <= 0)] = 0.0
    u = hessian.factor(perm)
    block = BLOCK if pattern is None else pattern[1] * max(1, BLOCK // pattern[1])
    counts = _block_counts(zeros or 0, prunable, block) if zeros is not None else None
    for b, start in enumerate(range(0, k_all, block)):
        end = min(start + block, k_all)
        w1 = w[:, start:end].copy()
        u1 = u[start:end, start:end]
        err = np.zeros_like(w1)
        drop = np.zeros(w1.shape, dtype=bool)
        cols = max(0, min(end, prunable) - start)  # prunable columns in this block
        if given is not None:
            drop[:, :cols] = given[:, start:start + cols]
        elif counts is not None and cols:
            saliency = w1[:, :cols] ** 2 / np.diag(u1)[:cols] ** 2
            chosen = np.zeros(saliency.size, dtype=bool)
            if counts[b]:
                chosen[np.argpartition(saliency.reshape(-1), counts[b] - 1)[: counts[b]]] = True
            drop[:, :cols] = chosen.reshape(saliency.shape)
        for i in range(end - start):
            if pattern is not None and i < cols and i % pattern[1] == 0:
                m = pattern[1]
                saliency = w1[:, i:i + m] ** 2 / np.diag(u1)[i:i + m] ** 2
                lowest = np.argsort(saliency, axis=1, kind="stable")[:, : m - pattern[0]]
                np.put_along_axis(drop[:, i:i + m], lowest, True, axis=1)
            column = w1[:, i]
            kept = np.where(drop[:, i], 0.0, column) if project is None else project(int(perm[start + i]), column)
            e = (column - kept) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = kept
            err[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err @ u[start:end, end:]
    out = np.empty_like(w)
    out[:, perm] = w
    return out.T
