"""Latency as a cost: a table measured per group and channel count on the provider asked for (HALP's idea).

Why measured: MACs do not predict latency where layers are memory-bound (depthwise convs: MobileNetV2 at
``--channels 0.3`` keeps 0.51 of the MACs but is only 1.6x faster), and each provider has its own kernels and
blocks. For every group, the current model with only that group pruned to a table count is timed against the
current model, interleaved; a count between the measured ones is interpolated linearly (0 removed: no change).
Effects are taken to add up over groups; the search re-measures the whole model after every round, so what the
sum misses is corrected by the next round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from onnxprune.data.loader import Feed
from onnxprune.validate.providers import create_session, resolve

TABLE_COUNTS = (0.25, 0.5)  # table entries per group: these fractions of its current channels removed
WARMUP = 3
RUNS = 15  # interleaved pairs per table entry (min of each side: the least disturbed run)
MEASURE_RUNS = 60  # interleaved pairs when a round's result is measured against the original (median of each side)


class LatencyMeter(Protocol):
    """Times candidates against a reference; tests inject a fake with a known latency model."""

    name: str

    def ratios(self, reference: bytes, candidates: Iterable[bytes], feed: Feed) -> list[float]:
        """Latency of each candidate (a serialized model) over the reference's, on ``feed``: table entries."""

    def measure(self, reference: bytes, model: bytes, feed: Feed) -> float:
        """Latency of ``model`` over the reference's, measured with care: whether the budget is met."""


class OrtMeter:
    """onnxruntime sessions on ``provider`` (a ``--providers`` entry), each candidate timed interleaved with the
    reference; sessions do not spin (validate/providers.py), so the idle one does not steal the other's core."""

    def __init__(self, provider: str = "cpu", threads: int = 0, runs: int = RUNS, warmup: int = WARMUP) -> None:
        self.provider = resolve(provider)[0]
        self.threads, self.runs, self.warmup = threads, runs, warmup
        self.name = f"measured on {self.provider}"

    def ratios(self, reference: bytes, candidates: Iterable[bytes], feed: Feed) -> list[float]:
        ref, _ = create_session(reference, self.provider, self.threads)
        return [self._ratio(ref, candidate, feed, self.runs, min) for candidate in candidates]

    def measure(self, reference: bytes, model: bytes, feed: Feed) -> float:
        ref, _ = create_session(reference, self.provider, self.threads)
        return self._ratio(ref, model, feed, MEASURE_RUNS, np.median)

    def _ratio(self, ref, candidate: bytes, feed: Feed, runs: int, summary) -> float:
        sess, _ = create_session(candidate, self.provider, self.threads)
        for _ in range(self.warmup):
            ref.run(None, feed)
            sess.run(None, feed)
        times: dict[int, list[float]] = {0: [], 1: []}
        for i in range(runs):
            for key, s in ((0, ref), (1, sess)) if i % 2 == 0 else ((1, sess), (0, ref)):
                start = time.perf_counter()
                s.run(None, feed)
                times[key].append(time.perf_counter() - start)
        return float(summary(times[1]) / summary(times[0]))


def table_counts(size: int, allowed: Sequence[int]) -> list[int]:
    """Channel counts to remove for a group's table entries: the allowed kept counts nearest to each fraction of
    :data:`TABLE_COUNTS` (``allowed``: kept counts the group may have, below its size)."""
    counts = []
    for fraction in TABLE_COUNTS:
        if allowed:
            keep = min(allowed, key=lambda k: (abs(k - size * (1 - fraction)), k))
            counts.append(size - keep)
    return sorted(set(counts))


SHRINK = 0.5  # weight of a group's own timing against the MACs-proportional fit over all groups


def shrink_to_macs(points: dict[int, dict[int, float]], macs) -> dict[int, dict[int, float]]:
    """Table entries pulled halfway towards ``slope * MACs change``, the slope fitted over all entries.

    Why: one group's effect on a whole model's latency is a few percent, near the noise of a shared machine; summed
    over 25 groups (MobileNetV2) the noise decided the allocation and rounds missed their goals as measured. The fit
    keeps what MACs explain of latency on this provider, each group's own timing keeps what they do not (memory-bound
    depthwise layers). A fit that says removing MACs does not save time (slope <= 0: the timings were all noise, as
    measured near a target on a busy machine, where the search then saw nothing left to remove) falls back to latency
    proportional to MACs. ``macs``: the analytic cost model of the current model (search/cost.py).
    """
    base = macs.total
    pairs = [(gid, n, macs.cost({gid: n}) / base - 1.0, value) for gid, entries in points.items()
             for n, value in entries.items()]
    denominator = sum(m * m for _, _, m, _ in pairs)
    if not pairs or denominator <= 0:
        return points
    slope = sum(m * v for _, _, m, v in pairs) / denominator
    if slope <= 0:
        slope = 1.0
    out: dict[int, dict[int, float]] = {gid: {} for gid in points}
    for gid, n, m, value in pairs:
        out[gid][n] = SHRINK * value + (1 - SHRINK) * slope * m
    return out


def interpolate(points: dict[int, float], removed: int) -> float:
    """Latency change (ratio - 1) at ``removed`` channels from the measured ``points`` (removed -> ratio - 1):
    linear through (0, 0) and the points, extended past the last one along its last segment."""
    xs = [0, *sorted(points)]
    ys = [0.0, *(points[x] for x in sorted(points))]
    if removed <= xs[-1]:
        return float(np.interp(removed, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (removed - xs[-1])
