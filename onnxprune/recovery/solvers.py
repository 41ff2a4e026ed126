"""Least-squares solvers behind ``--recover lsq``: normal equations, ridge fits on a support (zeros stay zero), and
the Relu-aware refinement. Pure numpy on Gram matrices and rows; lsq.py decides what to fit and where.

The Relu-aware objective: where the original value is below the Relu's threshold ("floor") every value there
becomes the same 0, so only overshooting the floor counts. It is convex and piecewise quadratic, and its curvature
never exceeds the layer's Gram matrix, so majorise-minimise steps w <- w - H^-1 grad lower it every time at the
cost of two matrix products each.
"""

from __future__ import annotations

import numpy as np

from onnxprune.recovery.obs import Hessian, obs_sweep

EXACT_FLOPS = 3e9  # per-output exact solves above this cost are replaced by the one-pass OBS update
RELU_FLOPS = 3e11  # budget of a layer's Relu-aware refinement (fewer than 3 steps affordable: plain lsq only)
RELU_ITERATIONS = 30


def relu_steps(rows: int, features: int, outputs: int) -> int:
    """How many Relu-aware steps (two [rows x features] x [features x outputs] products each) fit RELU_FLOPS."""
    return int(min(RELU_ITERATIONS, RELU_FLOPS // max(2.0 * rows * features * outputs, 1.0)))


def one_sided(a: np.ndarray, y: np.ndarray, floor: np.ndarray, sign: np.ndarray, w: np.ndarray) -> float:
    """Squared error where the target is live; where it is below the Relu floor only the overshoot counts."""
    p = a @ w.astype(a.dtype)
    live = sign * (y - floor) > 0
    err = np.where(live, p - y, np.maximum(sign * (p - floor), 0.0))
    return float(np.sum(err.astype(np.float64) ** 2))


def relu_refit(a: np.ndarray, y: np.ndarray, floor: np.ndarray, sign: np.ndarray, w: np.ndarray,
                support: np.ndarray, hessian: Hessian, iterations: int = RELU_ITERATIONS) -> tuple[np.ndarray, float]:
    """Minimise the one-sided error plus the ridge term (as the plain fit has) by majorise-minimise steps
    w <- w - H^-1 grad, with H the damped Gram matrix of all rows: the one-sided error's curvature never exceeds
    it, so every step lowers the objective, and each costs two matrix products instead of a solve per output. Zeros
    stay zero (the step is solved on each output's support). Returns the weights and their one-sided error."""
    live = sign * (y - floor) > 0
    goal = np.where(live, y, floor)
    solve = _support_solver(hessian, support)
    previous = None
    for _ in range(iterations):
        p = a @ w.astype(a.dtype)
        residual = np.where(live | (sign * (p - floor) > 0), p - goal, 0).astype(a.dtype)
        objective = float(np.sum(residual.astype(np.float64) ** 2)) + hessian.lam * float(np.sum(w * w))
        if previous is not None and previous - objective <= 1e-6 * previous:
            break
        previous = objective
        grad = (a.T @ residual).astype(np.float64) + hessian.lam * w
        w = np.where(support, w - solve(grad), 0.0)
    return w, one_sided(a, y, floor, sign, w)


def _support_solver(hessian: Hessian, support: np.ndarray):
    """x -> H^-1 x solved on each output's support, with the inverses computed once (one per distinct support)."""
    if support.all():
        inverse = hessian.inverse
        return lambda g: inverse @ g
    damped = hessian.damped()
    parts = []
    for cols in _patterns(support).values():
        s = support[:, cols[0]]
        parts.append((s, cols, np.linalg.inv(damped[np.ix_(s, s)]) if s.any() else None))

    def solve(g: np.ndarray) -> np.ndarray:
        out = np.zeros_like(g)
        for s, cols, inverse in parts:
            if inverse is not None:
                out[np.ix_(s, cols)] = inverse @ g[np.ix_(s, cols)]
        return out
    return solve


def _patterns(support: np.ndarray) -> dict[bytes, list[int]]:
    """Outputs grouped by their support column."""
    patterns: dict[bytes, list[int]] = {}
    for o in range(support.shape[1]):
        patterns.setdefault(support[:, o].tobytes(), []).append(o)
    return patterns


class Normal:
    """Accumulated normal equations of a least-squares problem: A^T A, A^T Y, ||Y||^2 and the row count."""

    def __init__(self, k: int, o: int) -> None:
        self.gram = np.zeros((k, k))
        self.cross = np.zeros((k, o))
        self.yy = 0.0
        self.rows = 0

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        self.gram += a.T @ a
        self.cross += a.T @ y
        self.yy += float((y * y).sum())
        self.rows += len(a)

    def __add__(self, other: "Normal") -> "Normal":
        out = Normal(*self.cross.shape)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.yy, out.rows = self.yy + other.yy, self.rows + other.rows
        return out

    def error(self, w: np.ndarray) -> float:
        """||A w - Y||^2 (a matrix product: BLAS, not an einsum loop)."""
        return float(np.sum(w * (self.gram @ w)) - 2 * np.sum(w * self.cross) + self.yy)


def refit(hessian: Hessian, cross: np.ndarray, support: np.ndarray, prunable: int,
           start: np.ndarray | None = None) -> np.ndarray:
    """The best weights on ``support`` (rows past ``prunable``, a bias, are always free): exact per output when
    that is affordable, else the sequential OBS update from the dense solution (or ``start``, already swept)."""
    support = support.copy()
    support[prunable:] = True
    if support.all():
        return hessian.solve(cross)
    if float(np.sum(support.sum(0).astype(np.float64) ** 3)) <= EXACT_FLOPS:
        return _ridge(hessian, cross, support)
    if start is not None:
        return start
    return obs_sweep(hessian.solve(cross), hessian, prunable, mask=~support[:prunable])


def _ridge(hessian: Hessian, cross: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Solve each output column on its own support: w_S = (G_SS + lam I)^-1 C_S."""
    out = np.zeros_like(cross)
    for cols in _patterns(support).values():
        s = support[:, cols[0]]
        if not s.any():
            continue
        sub = hessian.gram[np.ix_(s, s)] + hessian.lam * np.eye(int(s.sum()))
        out[np.ix_(s, cols)] = np.linalg.solve(sub, cross[np.ix_(s, cols)])
    return out
