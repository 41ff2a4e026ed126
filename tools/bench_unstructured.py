#!/usr/bin/env python
"""Speed and memory of unstructured pruning (issue 2, item 9) against two floors measured in the same run.

For each model: time and peak RSS of

* ``copy``        read + write the model's bytes (model file and its external data files, 64 MB chunks): the
                  physical floor (no fsync, like ``cp``);
* ``copy+fsync``  the same, fsync'ing each output file (onnxprune fsyncs what it writes, so this is its fair floor);
* ``onnx load+save``  ``onnx.load`` (external data pulled in) then ``onnx.save`` (external data again if the input had
                  it): what a naive tool costs;
* ``prune layer`` / ``prune global``  ``onnxprune.pipeline.prune_file(..., PruneOptions(sparsity=0.5, scope=...))``.

Every measurement runs in a fresh subprocess (``--child``) that first imports onnx, numpy and onnxprune and then
reports the seconds of the measured work only and its own peak RSS (``VmHWM``; ``ru_maxrss`` would inherit the
parent's peak across exec); a baseline subprocess that only
does the imports gives the RSS subtracted from every peak.  Methods are interleaved across repeats; the model is read
once beforehand so every method sees a warm page cache.  Target (issue 2): pruning within 2x the raw copy time with
peak RSS (minus baseline) under half the model size.

The synthetic big model (``--big-gb``, default 1.5; 0 skips it) is a chain of 4096x4096 float32 MatMul and Gemm
weights (Relu between) in one external ``.data`` file, written with numpy in 16 MB chunks; it lives in a temporary
folder (``--tmp-dir``) that is deleted afterwards.

Usage (from the repository root)::

    python tools/bench_unstructured.py                         # committed zoo (models/*.onnx) + 1.5 GB model
    python tools/bench_unstructured.py --quick                 # zoo *_bn only, 1 repeat, 0.3 GB big model
    python tools/bench_unstructured.py --big-gb 0 --zoo-glob 'models/resnet*.onnx' --repeats 3
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
CHUNK = 64 * 1024 * 1024  # page-cache warm-up reads
COPY_CHUNK = 4 * 1024 * 1024  # copy floor buffer (small, so the floor's RSS stays near the baseline)
MIN_TARGET_BYTES = 10_000_000  # targets are only judged on models at least this big (tiny ones: fixed costs)
HIDDEN = 4096
METHODS = ("copy", "copy+fsync", "onnx load+save", "prune layer", "prune global")


# ----------------------------------------------------------------------------------------------------- child side
def _copy(files: list[str], out_dir: str, fsync: bool) -> None:
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as src, open(os.path.join(out_dir, os.path.basename(f)), "wb",
                                                    buffering=0) as dst:
            while True:
                n = src.readinto(buf)
                if not n:
                    break
                dst.write(view[:n])
            if fsync:
                os.fsync(dst.fileno())


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (per address space, so it starts afresh at exec).

    Not ``ru_maxrss``: Linux carries the max RSS over execve, so a child would inherit its parent's peak.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _stages(model_path: str, out: str, sparsity: float) -> list:
    """prune_file's steps for ``--sparsity`` one by one, with the seconds and peak RSS of each (VmHWM reset between
    steps); saving is split into writing (``save_model(check=False)``) and the output check it normally runs."""
    from onnxprune.graph.index import GraphIndex
    from onnxprune.graph.io import _check_saved, load_model, save_model
    from onnxprune.prune.unstructured import prune_unstructured
    from onnxprune.graph.stats import model_stats, static_input_shapes

    st: dict = {}
    steps = [
        ("load_model", lambda: st.update(m=load_model(model_path))),
        ("open_output", lambda: st["m"].open_output(Path(out))),
        ("model_stats (before)", lambda: model_stats(st["m"], {})),
        ("GraphIndex", lambda: st.update(i=GraphIndex(st["m"], static_input_shapes(st["m"], {})))),
        ("prune_unstructured (layer)", lambda: prune_unstructured(st["i"], sparsity, "layer")),
        ("model_stats (after)", lambda: model_stats(st["m"], {})),
        ("save_model(check=False)", lambda: save_model(st["m"], out, check=False)),
        # prune_file runs this check only when the graph's structure changed (not for values-only unstructured runs)
        ("output check if run (checker + onnxruntime session)", lambda: _check_saved(st["m"], Path(out))),
    ]
    rows = []
    for name, fn in steps:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        r0 = _status_bytes("VmRSS")
        t = time.perf_counter()
        fn()
        rows.append([name, time.perf_counter() - t, r0, _status_bytes("VmHWM"), _status_bytes("VmRSS")])
    return rows


def child(argv: list[str]) -> None:
    import numpy  # noqa: F401
    import onnx
    import onnxruntime  # noqa: F401  (onnxprune checks every output in onnxruntime; its import is a fixed cost)

    from onnxprune.pipeline import PruneOptions, prune_file

    mode, payload = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    t = time.perf_counter()
    if mode == "baseline":
        pass
    elif mode in ("copy", "copy+fsync"):
        _copy(payload["files"], payload["out_dir"], mode == "copy+fsync")
    elif mode == "onnx load+save":
        m = onnx.load(payload["model"])
        out = payload["out"]
        if payload["external"]:
            onnx.save(m, out, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=os.path.basename(out) + ".data", size_threshold=1024)
        else:
            onnx.save(m, out)
    elif mode == "stages":
        print("STAGES " + json.dumps(_stages(payload["model"], payload["out"], payload["sparsity"])))
    elif mode == "profile":
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        prune_file(payload["model"], payload["out"], PruneOptions(sparsity=payload["sparsity"], scope="layer"))
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(payload["top"])
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(payload["top"])
        Path(payload["txt"]).write_text(buf.getvalue())
    elif mode.startswith("prune "):
        prune_file(payload["model"], payload["out"], PruneOptions(sparsity=payload["sparsity"],
                                                                  scope=mode.split()[1]))
    else:
        raise SystemExit(f"unknown child mode {mode}")
    seconds = time.perf_counter() - t
    rss = peak_rss()
    print("RESULT " + json.dumps({"seconds": seconds, "maxrss": rss}))


def run_child(mode: str, payload: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", mode, json.dumps(payload)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {"error": (err[-1] if err else f"exit {proc.returncode}")[:200]}
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    stages = [ln for ln in proc.stdout.splitlines() if ln.startswith("STAGES ")]
    if stages:
        res["stages"] = json.loads(stages[-1][7:])
    return res


# ---------------------------------------------------------------------------------------------------- parent side
def make_big_model(folder: Path, gb: float, seed: int = 0) -> Path:
    """A MatMul/Gemm chain whose weights (HIDDEN x HIDDEN float32 each) fill ~gb GB of one external data file."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    per = HIDDEN * HIDDEN * 4
    layers = max(1, round(gb * 1e9 / per))
    path = folder / "big.onnx"
    data_name = "big.onnx.data"
    rng = np.random.default_rng(seed)
    rows = max(1, (16 * 1024 * 1024) // (HIDDEN * 4))
    nodes, inits = [], []
    offset = 0
    prev = "x"
    with open(folder / data_name, "wb") as fh:
        for i in range(layers):
            for start in range(0, HIDDEN, rows):
                n = min(rows, HIDDEN - start)
                chunk = rng.standard_normal((n, HIDDEN), dtype=np.float32)
                chunk *= (2.0 / HIDDEN) ** 0.5
                fh.write(chunk.tobytes())
            w = TensorProto()
            w.name, w.data_type = f"w{i}", TensorProto.FLOAT
            w.dims.extend([HIDDEN, HIDDEN])
            w.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(per))):
                e = w.external_data.add()
                e.key, e.value = k, v
            offset += per
            inits.append(w)
            out = f"h{i}" if i == layers - 1 else f"a{i}"
            if i % 2 == 0:
                nodes.append(helper.make_node("MatMul", [prev, w.name], [out], name=f"matmul{i}"))
            else:
                b = helper.make_tensor(f"b{i}", TensorProto.FLOAT, [HIDDEN],
                                       (rng.standard_normal(HIDDEN) * 0.01).astype(np.float32).tolist())
                inits.append(b)
                nodes.append(helper.make_node("Gemm", [prev, w.name, b.name], [out], name=f"gemm{i}", transB=1))
            if i != layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
                prev = f"r{i}"
    graph = helper.make_graph(nodes, "big_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, ["batch", HIDDEN])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="bench_unstructured")
    model.ir_version = 8
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def model_files(path: Path) -> tuple[list[str], bool]:
    import onnx

    from onnxprune.graph.io import iter_tensors, uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    locs = []
    for t in iter_tensors(m):
        if uses_external_data(t):
            loc = {e.key: e.value for e in t.external_data}["location"]
            if loc not in locs:
                locs.append(loc)
    return [str(path)] + [str(path.parent / loc) for loc in locs], bool(locs)


def bench_model(name: str, path: Path, repeats: int, args, work: Path) -> dict:
    files, external = model_files(path)
    size = sum(os.path.getsize(f) for f in files)
    for f in files:  # warm the page cache so every method starts equal
        with open(f, "rb", buffering=0) as fh:
            while fh.read(CHUNK):
                pass
    res: dict[str, list[dict]] = {m: [] for m in METHODS}
    for rep in range(repeats):
        for method in METHODS:
            out_dir = work / "out"
            out_dir.mkdir(exist_ok=True)
            payload = {"files": files, "out_dir": str(out_dir), "model": str(path), "external": external,
                       "out": str(out_dir / "out.onnx"), "sparsity": args.sparsity}
            t = time.perf_counter()
            r = run_child(method, payload, args.timeout)
            shutil.rmtree(out_dir)
            res[method].append(r)
            info = r.get("error") or f"{r['seconds']:.3f} s, peak {r['maxrss'] / 1e6:.0f} MB"
            print(f"  {name} #{rep} {method}: {info} (wall {time.perf_counter() - t:.1f} s)", file=sys.stderr,
                  flush=True)
    return {"name": name, "size": size, "external": external, "res": res}


def summarize(rows: list[dict], baseline: int) -> str:
    def med(rs, key):
        ok = [r[key] for r in rs if "error" not in r]
        return statistics.median(ok) if ok else None

    lines = ["| model | size MB | method | s (median) | x copy time | peak RSS - baseline MB | peak / size "
             "| <= 2x copy | peak < 0.5x size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = row["size"]
        copy_t = med(row["res"]["copy"], "seconds")
        for method in METHODS:
            rs = row["res"][method]
            errs = [r["error"] for r in rs if "error" in r]
            t = med(rs, "seconds")
            if t is None:
                lines.append(f"| {row['name']} | {size / 1e6:.1f} | {method} | ERROR: {errs[0]} | | | | | |")
                continue
            peak = max(r["maxrss"] for r in rs if "error" not in r) - baseline
            xc = t / copy_t if copy_t else float("nan")
            target = method.startswith("prune")
            big = size >= MIN_TARGET_BYTES
            c1 = (("PASS" if xc <= 2 else "**FAIL**") if big else "n/a (tiny)") if target else "-"
            c2 = (("PASS" if peak < 0.5 * size else "**FAIL**") if big else "n/a (tiny)") if target else "-"
            lines.append(f"| {row['name']} | {size / 1e6:.1f} | {method} | {t:.3f} | {xc:.1f}x | {peak / 1e6:.1f} "
                         f"| {peak / size:.2f}x | {c1} | {c2} |" + (f" errors: {len(errs)}" if errs else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-glob", default=str(ROOT / "models" / "*.onnx"))
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--big-gb", type=float, default=1.5, help="size of the synthetic external-data model; 0 skips")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2, help="repeats per zoo model")
    ap.add_argument("--big-repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    ap.add_argument("--tmp-dir", default=None, help="where the big model and outputs go (default: system temp)")
    ap.add_argument("--profile-out", default=os.path.join(tempfile.gettempdir(), "bench_unstructured_profile.txt"),
                    help="cProfile (top --profile-top) of 'prune layer' on the big model goes here")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--no-stages", dest="stages", action="store_false",
                    help="skip the step-by-step time/RSS run on the big model")
    ap.add_argument("--quick", action="store_true", help="zoo *_bn only, 1 repeat, big model 0.3 GB")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
        if args.zoo_glob == ap.get_default("zoo_glob"):
            args.zoo_glob = str(ROOT / "models" / "*_bn.onnx")
        if args.big_gb == 1.5:
            args.big_gb = 0.3

    base = [run_child("baseline", {}, args.timeout) for _ in range(2)]
    baseline = min(b["maxrss"] for b in base)
    print(f"baseline (import onnx, numpy, onnxruntime, onnxprune) peak RSS {baseline / 1e6:.1f} MB", file=sys.stderr)
    rows = []
    stage_rows = None
    with tempfile.TemporaryDirectory(prefix="bench_unstructured_", dir=args.tmp_dir) as td:
        work = Path(td)
        if not args.no_zoo:
            for p in sorted(glob.glob(args.zoo_glob)):
                rows.append(bench_model(Path(p).stem, Path(p), args.repeats, args, work))
        if args.big_gb > 0:
            big_dir = work / "big"
            big_dir.mkdir()
            t = time.perf_counter()
            big = make_big_model(big_dir, args.big_gb)
            gen_s = time.perf_counter() - t
            print(f"generated {big} ({sum(f.stat().st_size for f in big_dir.iterdir()) / 1e9:.2f} GB) "
                  f"in {gen_s:.1f} s", file=sys.stderr, flush=True)
            rows.append(bench_model(f"synthetic {args.big_gb:g} GB (external data)", big, args.big_repeats,
                                    args, work))
            if args.stages:
                (work / "out").mkdir(exist_ok=True)
                r = run_child("stages", {"model": str(big), "out": str(work / "out" / "out.onnx"),
                                         "sparsity": args.sparsity}, args.timeout)
                shutil.rmtree(work / "out")
                stage_rows = r.get("stages") or r.get("error")
            if args.profile_out:
                (work / "out").mkdir(exist_ok=True)
                r = run_child("profile", {"model": str(big), "out": str(work / "out" / "out.onnx"),
                                          "sparsity": args.sparsity, "txt": args.profile_out,
                                          "top": args.profile_top}, args.timeout)
                shutil.rmtree(work / "out")
                note = r.get("error") or "%.2f s under the profiler" % r["seconds"]
                print(f"profile of 'prune layer' on the big model: {args.profile_out} ({note})", file=sys.stderr)
            shutil.rmtree(big_dir)
    print(f"sparsity {args.sparsity}, repeats {args.repeats} (big: {args.big_repeats}), cpus {os.cpu_count()}, "
          f"baseline RSS {baseline / 1e6:.1f} MB\n")
    print(summarize(rows, baseline))
    if isinstance(stage_rows, str):
        print(f"\nstep-by-step run failed: {stage_rows}")
    elif stage_rows:
        print(f"\nStep by step, 'prune layer' on the synthetic {args.big_gb:g} GB model (one subprocess; MB; 'peak' = "
              "highest RSS during the step, file-backed pages of memory-mapped weights included):\n")
        print("| step | s | RSS before | peak during | RSS after | peak - baseline |")
        print("|---|---|---|---|---|---|")
        for name, sec, r0, peak, r1 in stage_rows:
            print(f"| {name} | {sec:.2f} | {r0 / 1e6:.0f} | {peak / 1e6:.0f} | {r1 / 1e6:.0f} "
                  f"| {(peak - baseline) / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
