#!/usr/bin/env python
"""Sensitivity analysis on 1 local worker against N: wall time side by side, interleaved, and the results compared.

Issue 16's target: full-size ResNet-18 (13 groups, 12 of them prunable, x 3 ratios) on 2 local workers >= 1.7x faster
than on 1. Each configuration runs ``run_sensitivity`` in this process (1 worker: the tasks run here; N: a spawn
pool); repeats alternate the order (1, N), (N, 1), ... so that drifting machine load hits both. The table shows the
median wall time, the speedup over 1 worker, and the mean per-task time split into prune / compare / latency (what
the README's scale-out estimate is built from). Results must be identical across worker counts (checked: exit 1 if
not). Calibration data is random (a ResNet with random weights has no real data); it is written to a temporary
folder that is removed afterwards.

Usage (from the repository root)::

    python tools/bench_graph_libs.py --write-fullsize /tmp/onnxprune_fullsize      # resnet18_224.onnx and others
    python tools/bench_sensitivity.py --model /tmp/onnxprune_fullsize/resnet18_224.onnx            # the target
    python tools/bench_sensitivity.py --model ... --only 'conv4' --only 'conv18' --repeats 1     # a shorter run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.data import sources  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.pipeline import PruneOptions  # noqa: E402
from onnxprune.search.sensitivity import SensitivityOptions, run_sensitivity  # noqa: E402

WALL_FIELDS = ("seconds", "prune_s", "compare_s", "latency_s")


def _calibration(model_path: str, samples: int, folder: Path) -> str:
    spec = sources.input_specs(load_model(model_path).proto)[0]
    shape = [samples] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
    path = folder / "calib.npz"
    np.savez(path, **{spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, default=2, help="compared with 1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="random calibration samples")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--criterion", default="l1", help="l1 (default here: recon's Hessians dominate otherwise)")
    ap.add_argument("--recover", default="none")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model in each task (0: no latency)")
    ap.add_argument("--only", action="append", default=[], help="groups to measure (globs, repeatable)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_sensitivity_") as tmp:
        calib = _calibration(args.model, args.samples, Path(tmp))
        base = PruneOptions(calib=calib, criterion=args.criterion)
        options = SensitivityOptions(prune=base, ratios=tuple(float(r) for r in args.ratios.split(",")),
                                     only=tuple(args.only), recover=args.recover, runs=args.runs, warmup=1)
        walls: dict[int, list[float]] = {1: [], args.workers: []}
        results = {}
        for rep in range(args.repeats):
            for workers in ((1, args.workers) if rep % 2 == 0 else (args.workers, 1)):
                started = time.perf_counter()
                result = run_sensitivity(args.model, SensitivityOptions(**{**options.__dict__, "workers": workers}))
                walls[workers].append(time.perf_counter() - started)
                results.setdefault(workers, []).append(result)
                print(f"  repeat {rep + 1}: {workers} worker(s) {walls[workers][-1]:.1f} s", file=sys.stderr)

    def comparable(result) -> list[dict]:
        rows = [asdict(r) for r in result.rows]
        for row in rows:
            for name in WALL_FIELDS:
                row.pop(name)
            row.pop("speedup")  # measured latency differs run to run
        return rows

    reference = comparable(results[1][0])
    identical = all(comparable(r) == reference for runs in results.values() for r in runs)
    first = results[1][0]
    print(f"{args.model}: {len(first.groups)} groups x {len(options.ratios)} ratios x "
          f"{len(first.options['recover'])} recoveries = {len(first.rows)} tasks; {args.samples} calibration samples, "
          f"criterion {args.criterion}, {args.runs} timed runs per model; median of {args.repeats} interleaved runs")
    print(f"{'workers':>8} {'wall s':>8} {'speedup':>8} {'task s':>7} {'prune s':>8} {'compare s':>10} "
          f"{'latency s':>10}")
    base_wall = statistics.median(walls[1])
    for workers, times in walls.items():
        rows = [row for result in results[workers] for row in result.rows]
        mean = {name: statistics.mean(getattr(r, name) for r in rows) for name in WALL_FIELDS}
        print(f"{workers:>8} {statistics.median(times):>8.1f} {base_wall / statistics.median(times):>7.2f}x "
              f"{mean['seconds']:>7.2f} {mean['prune_s']:>8.2f} {mean['compare_s']:>10.2f} {mean['latency_s']:>10.2f}")
    print(f"results identical across worker counts (latency aside): {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
