#!/usr/bin/env python
"""Budgets against uniform ratios (issue 16 item 2): what ``--target-macs`` and ``--target-latency`` give, measured.

Two tables, every number measured in this run:

* digits residual CNN (trained, committed): uniform ``--channels 0.5`` (layer scope) against ``--target-macs`` set to
  the MACs the uniform run kept and to 0.25 (with every aim, with greedy and even only, and in ``--more-rounds``), all ``--round-to 1`` with ``--calib`` and lsq recovery; MACs kept (graph/stats.py),
  held-out top-1 on ``models/digits_val.npz`` (359 samples: one sample is 0.28 points), top-1 agreement with the
  original on the calibration inputs, and the prune time.
* full-size MobileNetV2 224 (random weights: latency only; ``tools/make_fullsize.py``): uniform ``--channels 0.3``,
  ``--target-macs`` at the MACs it kept and ``--target-latency F``; MACs kept and the speedup over the original on
  ORT CPU, all models timed in one interleaved loop (rotating order, median per model, ratio of medians). Its
  ``--calib`` is random normal inputs (``--calib-samples``), and ``--recover none`` (random weights: recovery would
  only cost time).

Usage (from the repository root)::

    python tools/bench_budget.py                        # both tables
    python tools/bench_budget.py --skip-mobilenet       # digits only (about two minutes idle)
    python tools/bench_budget.py --skip-mobilenet --compare-at 0.25 --compare-at 0.34 --more-rounds 6
    python tools/bench_budget.py --fullsize-dir /tmp/fullsize --latency 0.55 --runs 200
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.formatting import table
from onnxprune.graph.io import load_model
from onnxprune.graph.stats import model_stats
from onnxprune.passes.state import PruneOptions
from onnxprune.pipeline import prune_file
from onnxprune.search.budget import AIMS, prune_to_budget
from onnxprune.validate.providers import create_session

MODELS = ROOT / "models"


def macs(path: Path) -> int:
    return model_stats(load_model(path)).macs


def top1(path: Path, inputs: np.ndarray) -> np.ndarray:
    session, _ = create_session(path, "CPUExecutionProvider")
    return np.concatenate([session.run(None, {"input": inputs[i:i + 64]})[0].argmax(1)
                           for i in range(0, len(inputs), 64)])


def run(label: str, job, source: Path, out: Path, options: PruneOptions) -> tuple[str, Path, float, object]:
    start = time.perf_counter()
    report = job(source, out, options)
    return label, out, time.perf_counter() - start, report


def digits(folder: Path, rounds: int, more_rounds: int | None, compare_at: list[float]) -> None:
    """Uniform against budgets: at the uniform run's MACs with every aim; at each ``compare_at`` target with the aims
    the search compared before the global one (greedy and even) and with every aim; at 0.25 in ``more_rounds``."""
    source = MODELS / "digits_resnet.onnx"
    calib = str(MODELS / "digits_calib.npz")
    val = np.load(MODELS / "digits_val.npz")
    calib_inputs = np.load(calib)["input"]
    base = {"round_to": 1, "calib": calib}
    uniform = run("--channels 0.5 (layer scope)", prune_file, source, folder / "uniform.onnx",
                  PruneOptions(channels=0.5, **base))
    kept = round(macs(uniform[1]) / macs(source), 4)
    plans = [(kept, rounds, AIMS)] + [(t, rounds, aims) for t in compare_at for aims in (("even", "greedy"), AIMS)]
    plans += [(0.25, more_rounds, AIMS)] if more_rounds else []
    runs = [uniform]
    for k, (target, steps, aims) in enumerate(plans):
        label = f"--target-macs {target:g}, {steps} rounds, aims {'+'.join(aims)}"
        runs.append(run(label, partial(prune_to_budget, aims=aims), source, folder / f"budget{k}.onnx",
                        PruneOptions(target_macs=target, steps=steps, **base)))
    truth, reference = val["labels"], top1(source, calib_inputs)
    rows = [["original", "1.000", f"{100 * np.mean(top1(source, val['input']) == truth):.1f}", "100.0", "-", "-", "-"]]
    for label, path, seconds, report in runs:
        held_out = 100 * np.mean(top1(path, val["input"]) == truth)
        kept_counts = ", ".join(str(g.after) for g in report.groups if not g.blocked)
        aims = "-" if report.budget is None else " ".join(r.choice for r in report.budget.rounds)
        rows.append([label, f"{macs(path) / macs(source):.3f}", f"{held_out:.1f}",
                     f"{100 * np.mean(top1(path, calib_inputs) == reference):.1f}", f"{seconds:.1f}", kept_counts,
                     aims])
    print(f"\ndigits_resnet.onnx, --round-to 1, --calib {calib} (lsq recovery)")
    print(table(["pruning", "MACs kept", "held-out top-1 %", "calib agreement %", "seconds", "kept per group",
                 "aim taken per round"], rows))


def interleaved_speedups(paths: list[Path], runs: int, threads: int) -> list[float]:
    """Median latency of the first model over each model's, all timed in one loop in rotating order."""
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    sessions = [create_session(p, "CPUExecutionProvider", threads)[0] for p in paths]
    for s in sessions:
        for _ in range(5):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    for i in range(runs):
        order = list(range(len(paths)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in order:
            start = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - start)
    medians = [float(np.median(t)) for t in times]
    return [medians[0] / m for m in medians]


def mobilenet(folder: Path, fullsize: Path, latency: float, runs: int, threads: int, samples: int,
              rounds: int) -> None:
    source = fullsize / "mobilenetv2_224.onnx"
    if not source.exists():
        from make_fullsize import ensure_models

        ensure_models(fullsize, names=("mobilenetv2",))
    calib = folder / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((samples, 3, 224, 224)).astype(np.float32))
    base = {"calib": str(calib), "recover": "none", "latency_threads": threads}
    uniform = run("--channels 0.3 (layer scope)", prune_file, source, folder / "m_uniform.onnx",
                  PruneOptions(channels=0.3, **base))
    kept = round(macs(uniform[1]) / macs(source), 4)
    jobs = [uniform,
            run(f"--target-macs {kept:g}", prune_to_budget, source, folder / "m_macs.onnx",
                PruneOptions(target_macs=kept, steps=rounds, **base)),
            run(f"--target-latency {latency:g}", prune_to_budget, source, folder / "m_latency.onnx",
                PruneOptions(target_latency=latency, steps=rounds, **base))]
    speedups = interleaved_speedups([source] + [path for _, path, _, _ in jobs], runs, threads)
    rows = [[label, f"{macs(path) / macs(source):.3f}", f"{speed:.2f}x",
             "-" if report.budget is None else f"{report.budget.reached:.3f}", f"{seconds:.0f}"]
            for (label, path, seconds, report), speed in zip(jobs, speedups[1:])]
    print(f"\nmobilenetv2_224.onnx (random weights), ORT CPU threads={threads or 'default'}, {runs} interleaved runs "
          f"per model, --calib {samples} random samples, --recover none, search rounds {rounds}")
    print(table(["pruning", "MACs kept", "speedup (median)", "search's own measure", "seconds"], rows))
    for label, _, _, report in jobs[1:]:
        print(f"  {label}: path " + " ".join(f"{r.goal:.3f}->{r.reached:.3f}" for r in report.budget.rounds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument("--fullsize-dir", default=os.path.join(tempfile.gettempdir(), "onnxprune_fullsize"))
    ap.add_argument("--latency", type=float, default=0.55, help="--target-latency for MobileNetV2 (default 0.55)")
    ap.add_argument("--runs", type=int, default=100, help="interleaved timed runs per model")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="--steps for the searches (default 3, as the CLI's)")
    ap.add_argument("--compare-at", type=float, action="append",
                    help="digits: --target-macs to run with and without the global aim (repeatable; default 0.25)")
    ap.add_argument("--more-rounds", type=int, default=None,
                    help="digits: one more --target-macs 0.25 row with this many rounds")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tools"))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_digits:
            digits(Path(tmp), args.rounds, args.more_rounds, args.compare_at or [0.25])
        if not args.skip_mobilenet:
            mobilenet(Path(tmp), Path(args.fullsize_dir), args.latency, args.runs, args.threads,
                      args.calib_samples, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
