#!/usr/bin/env python
"""Speed of the tool itself for structured pruning (issue 3, item 6): time and peak memory of
``prune_file(model, out, PruneOptions(channels=0.3))`` on full-size ResNet-18, ResNet-50 (~100 MB; target < 3 s,
peak memory < 2x the model size) and a 2x-wider ResNet-50 (~275 MB), to say how time grows with model size.

Usage (from the repository root)::

    python tools/bench_tool_speed.py                          # 3 repeats per model + cProfile of ResNet-50
    python tools/bench_tool_speed.py --quick                  # 1 repeat, ResNet-50 only, still profiles
    python tools/bench_tool_speed.py --profile-out /tmp/prof.txt --profile-top 15

Every prune runs in a fresh subprocess (``python tools/bench_tool_speed.py --child ...``) that first imports
onnxprune, then times ``prune_file`` alone and reports its own peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's peak over exec).  A baseline subprocess
that only does the imports gives the RSS subtracted from every peak: ``peak - baseline`` is the memory the prune
itself needed.  ``process s`` is the whole subprocess wall time (interpreter start, imports, prune), close to what
the ``onnxprune`` command costs.  Models come from ``tools/make_fullsize.py`` (built if missing, never committed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


def _maxrss_bytes() -> int:
    """Peak RSS of this process: VmHWM (per address space). Not ru_maxrss: Linux carries it over execve, so a child
    would report its parent's peak if that was higher."""
    peak = _status_kb("VmHWM")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass


def _stages(model_path: str, out: str, ratio: float) -> list:
    """prune_file's steps one by one (same calls as onnxprune.pipeline), with time and peak RSS of each step."""
    from onnxprune.graph.io import load_model, save_model
    from onnxprune.pipeline import PruneOptions, find_groups
    from onnxprune.prune.structured import apply_plan, cpu_block, plan_channels
    from onnxprune.graph.stats import model_stats

    o = PruneOptions(channels=ratio)
    state: dict = {}
    steps = [
        ("load_model", lambda: state.update(m=load_model(model_path))),
        ("open_output", lambda: state["m"].open_output(Path(out))),
        ("model_stats (before)", lambda: model_stats(state["m"], o.input_shapes)),
        ("find_groups", lambda: state.update(g=find_groups(state["m"], o.input_shapes))),
        ("plan_channels", lambda: state.update(p=plan_channels(
            state["g"], o.channels, o.scope, o.criterion, o.reduction, cpu_block(), o.exclude, o.layer_channels,
            o.max_group_ratio))),
        ("apply_plan", lambda: apply_plan(state["g"], state["p"])),
        ("model_stats (after)", lambda: model_stats(state["m"], o.input_shapes)),
        ("save_model", lambda: save_model(state["m"], out)),
    ]
    rows = []
    for name, fn in steps:
        _reset_peak()
        rss0 = _status_kb("VmRSS")
        t = time.perf_counter()
        fn()
        rows.append([name, time.perf_counter() - t, rss0, _status_kb("VmHWM"), _status_kb("VmRSS")])
    return rows


def child(argv: list[str]) -> None:
    """Runs in the fresh subprocess: ``baseline`` | ``prune MODEL OUT RATIO`` | ``profile MODEL OUT RATIO TXT TOP``."""
    import onnxprune.pipeline as pipeline  # noqa: F401  (the import is part of the baseline)
    from onnxprune.pipeline import PruneOptions, prune_file

    mode = argv[0]
    result = {"mode": mode}
    if mode == "baseline":
        pass
    elif mode == "prune":
        model, out, ratio = argv[1], argv[2], float(argv[3])
        t = time.perf_counter()
        rep = prune_file(model, out, PruneOptions(channels=ratio))
        result["seconds"] = time.perf_counter() - t
        result["macs_kept"] = rep.after.macs / rep.before.macs
        result["params_kept"] = rep.after.params / rep.before.params
        result["in_size"] = rep.before.file_size
        result["out_size"] = rep.output_size
    elif mode == "stages":
        model, out, ratio = argv[1], argv[2], float(argv[3])
        result["stages"] = _stages(model, out, ratio)
    elif mode == "profile":
        import cProfile
        import io
        import pstats

        model, out, ratio, txt, top = argv[1], argv[2], float(argv[3]), argv[4], int(argv[5])
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        prune_file(model, out, PruneOptions(channels=ratio))
        prof.disable()
        result["seconds"] = time.perf_counter() - t
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(top)
        buf.write("\n--- by own (tottime) ---\n")
        stats.sort_stats("tottime").print_stats(top)
        Path(txt).write_text(buf.getvalue())
    result["maxrss"] = _maxrss_bytes()
    print("RESULT " + json.dumps(result))


def run_child(args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = wall
    return res


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet50w2"])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fullsize-dir", default=os.path.join(tempfile.gettempdir(), "onnxprune_fullsize"))
    ap.add_argument("--profile-model", default="resnet50", help="model to profile with cProfile ('' to skip)")
    ap.add_argument("--profile-out", default=os.path.join(tempfile.gettempdir(), "bench_tool_speed_profile.txt"))
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    ap.add_argument("--quick", action="store_true", help="ResNet-50 only, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["resnet50"], 1

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fullsize import ensure_models

    paths = ensure_models(args.fullsize_dir, sorted(set(args.models) | ({args.profile_model} - {""})))
    base = [run_child(["baseline"], args.timeout) for _ in range(2)]
    baseline = min(b["maxrss"] for b in base)
    print(f"baseline (import onnxprune) peak RSS {mb(baseline)} MB, process {min(b['process_s'] for b in base):.2f} s",
          file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tool_speed_") as td:
        out = Path(td) / "pruned.onnx"
        runs: dict[str, list[dict]] = {m: [] for m in args.models}
        for rep in range(args.repeats):  # models interleaved across repeats
            for m in args.models:
                r = run_child(["prune", str(paths[m]), str(out), str(args.ratio)], args.timeout)
                runs[m].append(r)
                print(f"{m} #{rep}: {r['seconds']:.2f} s, peak {mb(r['maxrss'])} MB", file=sys.stderr, flush=True)
                out.unlink(missing_ok=True)
        for m in args.models:
            rs = runs[m]
            size = rs[0]["in_size"]
            t = statistics.median(r["seconds"] for r in rs)
            peak = max(r["maxrss"] for r in rs) - baseline
            rows.append({"model": m, "size": size, "t": t, "tmin": min(r["seconds"] for r in rs),
                         "proc": statistics.median(r["process_s"] for r in rs), "peak": peak,
                         "peak_x": peak / size, "s_per_100mb": t / (size / 1e8),
                         "macs_kept": rs[0]["macs_kept"], "out": rs[0]["out_size"]})
        stages = None
        if args.profile_model:
            stages = run_child(["stages", str(paths[args.profile_model]), str(out), str(args.ratio)], args.timeout)
            out.unlink(missing_ok=True)
        prof = None
        if args.profile_model:
            prof = run_child(["profile", str(paths[args.profile_model]), str(out), str(args.ratio),
                              args.profile_out, str(args.profile_top)], args.timeout)

    print(f"python {sys.version.split()[0]}, cpus={os.cpu_count()}, ratio={args.ratio}, repeats={args.repeats}, "
          f"baseline RSS (import onnxprune) {mb(baseline)} MB\n")
    print("| model | file MB | prune_file s (median) | min s | process s | s per 100 MB | peak RSS - baseline MB "
          "| peak / model size | MACs kept | out MB | < 3 s | peak < 2x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = r["model"] == "resnet50"
        print(f"| {r['model']} | {mb(r['size'])} | {r['t']:.2f} | {r['tmin']:.2f} | {r['proc']:.2f} "
              f"| {r['s_per_100mb']:.2f} | {mb(r['peak'])} | {r['peak_x']:.2f}x | {r['macs_kept']:.3f} "
              f"| {mb(r['out'])} | {('PASS' if r['t'] < 3 else '**FAIL**') if target else '-'} "
              f"| {('PASS' if r['peak_x'] < 2 else '**FAIL**') if target else '-'} |")
    if stages:
        print(f"\nStep by step on {args.profile_model} (same calls as prune_file, one subprocess; RSS in MB, "
              f"'peak' = highest RSS during the step):\n")
        print("| step | s | RSS before | peak during | RSS after | peak - baseline |")
        print("|---|---|---|---|---|---|")
        for name, sec, r0, peak, r1 in stages["stages"]:
            print(f"| {name} | {sec:.2f} | {mb(r0)} | {mb(peak)} | {mb(r1)} | {mb(peak - baseline)} |")
    if prof:
        print(f"\ncProfile of {args.profile_model} ({prof['seconds']:.2f} s under the profiler), "
              f"top {args.profile_top} by cumulative time: {args.profile_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
