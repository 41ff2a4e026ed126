#!/usr/bin/env python
"""Speed of the result of structured channel pruning (issue 3, item 5).

For every model and ratio: prune with ``PruneOptions(channels=R)`` (default options, i.e. ``round_to`` = the CPU's
NCHWc block) and, for the full-size models at 0.3, also with explicit ``--round-to`` values for comparison; then
report MACs kept, params kept and the onnxruntime CPU latency of the original and the pruned model measured
INTERLEAVED in this one process (A B, B A, A B, ... after warm-up; medians; only ratios are meaningful).

Usage (from the repository root)::

    python tools/bench_channels.py                       # full run (full-size ResNet-18/MobileNetV2 + zoo *_bn)
    python tools/bench_channels.py --quick               # ratio 0.3 only, 10 pairs
    python tools/bench_channels.py --models resnet18 --no-zoo --ratios 0.3 0.5 --pairs 50

Full-size models come from ``tools/make_fullsize.py`` (built into ``--fullsize-dir`` if missing, never committed).
Latency settings: ``intra_op_num_threads`` = ``--threads`` (default 2), ``inter_op_num_threads=1``,
``session.intra_op.allow_spinning=0`` on every session (an idle session's spinning threads would otherwise steal
a core from the one being timed), sequential execution, all graph optimisations.

Columns: ``speedup`` = median over pairs of (original / pruned) of adjacent samples (robust to other load on the
machine drifting during the run; the ratio of the two medians is printed beside it); ``% ideal`` = speedup / (1 / MACs kept).
Targets (issue 3) checked for the full-size models at 0.3 with default options: MACs kept <= 0.52,
speedup >= 1.8x, >= 85 % of ideal; every row: pruned not slower than the original (speedup >= 1.0).
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from make_fullsize import ensure_models  # noqa: E402

from onnxprune.pipeline import PruneOptions, prune_file  # noqa: E402
from onnxprune.prune.structured import cpu_block  # noqa: E402

FULLSIZE = ("resnet18", "mobilenetv2")
TARGET_MODELS = {"resnet18", "mobilenetv2"}


def make_session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def make_feeds(sess: ort.InferenceSession, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[i.name] = np.zeros(shape, dtype=np.int64)
    return feeds


def interleaved_latency(orig: str, pruned: str, threads: int, pairs: int, warmup: int,
                        min_sample_s: float, feeds: dict | None = None) -> tuple[float, float, int, float]:
    """Median seconds per inference of (orig, pruned), timed A/B interleaved; the inner repeat count; and the
    median over pairs of (orig / pruned), the speedup (robust to load changing during the run). ``feeds``: the
    inputs of both (default: random ones, dynamic dims 1)."""
    sa, sb = make_session(orig, threads), make_session(pruned, threads)
    fa, fb = (make_feeds(sa), make_feeds(sb)) if feeds is None else (feeds, feeds)
    for _ in range(warmup):
        sa.run(None, fa)
        sb.run(None, fb)
    # inner repeats so that one sample of the original lasts at least min_sample_s (tiny zoo models)
    t = time.perf_counter()
    sa.run(None, fa)
    one = time.perf_counter() - t
    reps = max(1, int(min_sample_s / max(one, 1e-7)))

    def sample(s, f) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            s.run(None, f)
        return (time.perf_counter() - t0) / reps

    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(sample(sa, fa))
            tb.append(sample(sb, fb))
        else:
            tb.append(sample(sb, fb))
            ta.append(sample(sa, fa))
    del sa, sb
    pair_ratio = statistics.median(a / b for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), reps, pair_ratio


def bench_one(name: str, path: Path, ratio: float, round_to: int | None, tmp: Path, args) -> dict:
    row = {"model": name, "ratio": ratio, "round_to": "default" if round_to is None else str(round_to)}
    out = tmp / f"{name}_{ratio}_{row['round_to']}.onnx"
    try:
        t = time.perf_counter()
        rep = prune_file(path, out, PruneOptions(channels=ratio, round_to=round_to))
        row["prune_s"] = time.perf_counter() - t
        row["round_used"] = rep.round_to
        row["macs_kept"] = rep.after.macs / rep.before.macs if rep.before.macs else float("nan")
        row["params_kept"] = rep.after.params / rep.before.params
        row["groups"] = f"{sum(g.after < g.before for g in rep.groups)}/{len(rep.groups)}"
    except Exception as exc:  # report, keep benchmarking the rest
        row["error"] = f"prune failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    try:
        a, b, reps, ratio_med = interleaved_latency(str(path), str(out), args.threads, args.pairs, args.warmup,
                                                    args.min_sample_ms / 1000)
        row.update(orig_ms=a * 1e3, pruned_ms=b * 1e3, reps=reps, speedup=ratio_med, ratio_of_medians=a / b)
        row["ideal_pct"] = 100 * row["speedup"] * row["macs_kept"]
    except Exception as exc:
        row["error"] = f"latency failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        out.unlink(missing_ok=True)
        Path(str(out) + ".data").unlink(missing_ok=True)
    return row


def pf(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def render(rows: list[dict]) -> str:
    head = ("| model | ratio | round-to | groups pruned | MACs kept | params kept | orig ms (med) | pruned ms (med) "
            "| speedup | ratio of medians | % of ideal | not slower | MACs<=0.52 | speedup>=1.8 | >=85% ideal |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rt = r["round_to"] if r["round_to"] != "default" else f"default ({r.get('round_used', '?')})"
        if "error" in r and "macs_kept" not in r:
            lines.append(f"| {r['model']} | {r['ratio']} | {rt} | {r['error']} |" + " |" * 12)
            continue
        cells = [r["model"], f"{r['ratio']}", rt, r["groups"], f"{r['macs_kept']:.3f}", f"{r['params_kept']:.3f}"]
        if "speedup" in r:
            cells += [f"{r['orig_ms']:.3f}", f"{r['pruned_ms']:.3f}", f"{r['speedup']:.2f}x",
                      f"{r['ratio_of_medians']:.2f}x", f"{r['ideal_pct']:.0f}%", pf(r["speedup"] >= 1.0) if r["ratio"] >= 0.1 else "-"]
        else:
            cells += [r.get("error", "?"), "", "", "", "", ""]
        if r["model"] in TARGET_MODELS and r["ratio"] == 0.3 and r["round_to"] == "default" and "speedup" in r:
            cells += [pf(r["macs_kept"] <= 0.52), pf(r["speedup"] >= 1.8), pf(r["ideal_pct"] >= 85)]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--models", nargs="*", default=list(FULLSIZE), help="full-size models (make_fullsize names)")
    ap.add_argument("--zoo-glob", default=str(ROOT / "models" / "*_bn.onnx"), help="committed zoo models")
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--compare-round-to", type=int, nargs="*", default=[1, 8],
                    help="extra round_to values for the full-size models at --compare-ratio")
    ap.add_argument("--compare-ratio", type=float, default=0.3)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-sample-ms", type=float, default=5.0,
                    help="inner repeats so that one timing sample lasts at least this long (tiny models)")
    ap.add_argument("--fullsize-dir", default=os.path.join(tempfile.gettempdir(), "onnxprune_fullsize"))
    ap.add_argument("--quick", action="store_true", help="ratio 0.3 only, 10 pairs, --round-to 1 comparison only")
    args = ap.parse_args(argv)
    if args.quick:
        args.ratios, args.pairs, args.compare_round_to = [0.3], 10, [1]

    print(f"onnxruntime {ort.__version__}, cpu_block()={cpu_block()}, threads={args.threads}, "
          f"pairs={args.pairs}, cpus={os.cpu_count()}", file=sys.stderr)
    models = [(n, p) for n, p in ensure_models(args.fullsize_dir, args.models).items()]
    if not args.no_zoo:
        models += [(Path(p).stem, Path(p)) for p in sorted(glob.glob(args.zoo_glob))]

    rows = []
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_channels_") as td:
        tmp = Path(td)
        for name, path in models:
            variants = [(r, None) for r in args.ratios]
            if name in args.models:
                variants += [(args.compare_ratio, rt) for rt in args.compare_round_to]
            for ratio, rt in variants:
                row = bench_one(name, path, ratio, rt, tmp, args)
                rows.append(row)
                msg = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                print(f"[{time.perf_counter() - t_all:6.1f}s] {msg}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(f"onnxruntime {ort.__version__}, round_to default = cpu_block() = {cpu_block()}, threads={args.threads}, "
          f"pairs={args.pairs}, cpus={os.cpu_count()}, load average at start {load0[0]:.2f} / end {load1[0]:.2f}"
          + ("  (WARNING: other load on the machine; absolute ms are noisy, ratios less so)"
             if max(load0[0], load1[0]) > 1.5 else "") + "\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
