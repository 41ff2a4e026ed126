"""Latency of original against pruned, measured interleaved on one provider; load time and memory.

Why interleaved: machine noise (frequency scaling, other processes) drifts over seconds, so timing all original runs
and then all pruned runs compares two different machines. Alternating (original, pruned), (pruned, original), ...
exposes both to the same drift and to either order, and the speedup is a ratio of medians, never one absolute time.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxprune.validate.accuracy import run_batch
from onnxprune.validate.providers import create_session, device, node_counts, short_name

try:  # optional: exact current RSS; without it we fall back to the peak RSS from getrusage
    import psutil
except ImportError:  # pragma: no cover - psutil is installed in CI
    psutil = None

MEMORY_METHOD = ("psutil RSS increase after loading the session and one run" if psutil is not None
                 else "resource.getrusage peak-RSS increase after loading the session and one run (lower bound: "
                      "0 when the process had already peaked higher)")


def _rss_bytes() -> int:
    if psutil is not None:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean()), "min_ms": float(arr.min())}


@dataclass
class Loaded:
    session: ort.InferenceSession
    load_s: float
    memory_bytes: int


def load_measured(path: str | Path, provider: str, threads: int, feed: dict[str, np.ndarray]) -> Loaded:
    """Create a session, run once, and record load time and the resident memory it added."""
    gc.collect()
    before = _rss_bytes()
    sess, load_s = create_session(path, provider, threads)
    run_batch(sess, feed)
    return Loaded(sess, load_s, max(0, _rss_bytes() - before))


def measure_pair(original: str | Path, pruned: str | Path, provider: str, feed: dict[str, np.ndarray],
                 threads: int = 0, warmup: int = 5, runs: int = 50,
                 on_run: Callable[[int], None] | None = None) -> dict:
    """Interleaved timing of both models on ``provider`` with one fixed input batch; ``on_run(1)`` after each timed
    pair (a progress bar)."""
    orig = load_measured(original, provider, threads, feed)
    prun = load_measured(pruned, provider, threads, feed)
    for _ in range(warmup):
        orig.session.run(None, feed)
        prun.session.run(None, feed)
    times: dict[str, list[float]] = {"original": [], "pruned": []}
    pairs = (("original", orig.session), ("pruned", prun.session))
    for i in range(runs):
        for key, sess in pairs if i % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            sess.run(None, feed)
            times[key].append((time.perf_counter() - start) * 1000)
        if on_run:
            on_run(1)
    result: dict = {"provider": short_name(provider), "provider_name": provider, "device": device(provider),
                    "session_providers": orig.session.get_providers(), "runs": runs, "warmup": warmup,
                    "threads": threads or None, "batch_size": len(next(iter(feed.values())))}
    for key, loaded in (("original", orig), ("pruned", prun)):
        result[key] = {**percentiles(times[key]), "load_ms": loaded.load_s * 1000,
                       "memory_bytes": loaded.memory_bytes, "nodes_by_provider": node_counts(loaded.session)}
    result["speedup"] = result["original"]["median_ms"] / result["pruned"]["median_ms"]
    del orig, prun
    gc.collect()
    return result
