#!/usr/bin/env python
"""Prune, quantize, deploy (issue 15, item 7): what each step buys on onnxruntime's CPU provider and on the OpenVINO
plugin EP, measured side by side in one process.

For every model, four files:

* ``fp32``: the original.
* ``int8 hand``: onnxruntime.quantization by hand, as a user would without this tool: ``quant_pre_process``, then
  ``quantize_static`` (QDQ, ``per_channel=True``, int8 weights, uint8 activations, MinMax) on the calibration data;
  the reference pipeline of issue 15.
* ``pruned``: ``onnxprune prune --channels 0.3 --calib D`` (default criterion and recovery).
* ``pruned+int8``: ``onnxprune prune --channels 0.3 --calib D --quantize int8`` (one run, same calibration data).
* ``pruned+int8, no bias corr.``: the ``pruned`` file through ``quantize_model(..., recover="none")``: what the
  bias correction after quantization changes.

``--recovery-table`` measures no speed: it quantizes the ``pruned`` file once per ``--quant-recover`` choice (none,
bias, gptq, gptq+bias) and prints top-1, the MSE vs the fp32 pruned model on the held-out inputs, the zeros kept and
the seconds ``quantize_model`` took (``--sparsity S`` prunes weights instead of channels, so there are zeros to keep).

Columns: ``size`` = file bytes / fp32's; ``top-1`` on ``models/digits_val.npz`` (digits models only: the full-size
models have random weights); ``agree`` = top-1 agreement with fp32 on the evaluation inputs; ``MSE vs pruned`` = mean
squared difference of the outputs from the fp32 pruned model's (the quantization error, held out); ``cpu`` / ``openvino``
= speedup over fp32, the median over rounds of (fp32 time / this file's time) where every round times all four
files once in a rotated order (interleaved, so drift hits all of them alike); ``ms`` = this file's median.

Data: digits models calibrate on ``models/digits_calib.npz`` (256 images) and are scored on ``digits_val.npz`` (359
held-out images). The full-size models (random weights, ``tools/make_fullsize.py``) calibrate on ``--calib-images``
generated images (seeded: smooth random colour fields plus pixel noise, ImageNet mean/std normalisation, so the
activations have image-like statistics) and are compared on 32 other generated images.

Usage (from the repository root)::

    python tools/bench_deploy.py                                  # all models, CPU and OpenVINO
    python tools/bench_deploy.py --models resnet18 --rounds 20
    python tools/bench_deploy.py --models digits_resnet --no-openvino
    python tools/bench_deploy.py --recovery-table --models digits_resnet digits_plain digits_mobile

Targets (issue 15): full-size ResNet-18 pruned+int8 >= 3.5x faster than fp32 on CPU, file <= 0.13x; the digits
residual CNN (digits_resnet) pruned+int8 within one point of fp32's top-1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_fullsize import ensure_models  # noqa: E402

from onnxprune.data.probe import to_batches  # noqa: E402
from onnxprune.graph.io import load_model  # noqa: E402
from onnxprune.pipeline import PruneOptions, prune_file  # noqa: E402
from onnxprune.quantize import quantize_model  # noqa: E402
from onnxprune.quantize.run import QUANT_RECOVERY  # noqa: E402
from onnxprune.validate import providers as prov  # noqa: E402

FULLSIZE = ("resnet18", "mobilenetv2")
DIGITS = ("digits_resnet", "digits_plain", "digits_mobile")
VARIANTS = ("fp32", "int8 hand", "pruned", "pruned+int8", "pruned+int8, no bias corr.")
QUANTIZE_SECONDS: dict[str, list[float]] = {}  # model -> seconds of quantize_model without, with bias correction
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def generated_images(count: int, seed: int, size: int = 224) -> np.ndarray:
    """Image-like inputs without a data set: 7x7 random colour fields upsampled (large smooth regions, as photos
    have), pixel noise, values in [0, 1], then ImageNet normalisation."""
    rng = np.random.default_rng(seed)
    cells = size // 32
    fields = rng.uniform(0, 1, (count, 3, cells, cells)).astype(np.float32)
    images = np.repeat(np.repeat(fields, size // cells, axis=2), size // cells, axis=3)
    images = np.clip(images + rng.normal(0, 0.08, images.shape), 0, 1)
    return ((images - MEAN) / STD).astype(np.float32)


class _Reader:
    """onnxruntime's CalibrationDataReader over one array, in batches."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 8) -> None:
        self._feeds = iter([{name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_by_hand(source: Path, target: Path, name: str, calib: np.ndarray) -> None:
    """The reference pipeline: onnxruntime's preprocessing and static QDQ quantization with its defaults except
    per-channel weights and uint8 activations (issue 15's hand numbers)."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, q.CalibrationDataReader):
        pass

    pre = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    q.quantize_static(str(pre), str(target), Reader(name, calib), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    pre.unlink()


def build_files(name: str, source: Path, calib_path: Path, calib: np.ndarray, folder: Path, ratio: float,
                log) -> dict[str, Path]:
    """The four files of one model (reused when present in ``folder``: ``--work-dir`` keeps them between runs)."""
    files = {"fp32": source, "int8 hand": folder / f"{name}.int8hand.onnx", "pruned": folder / f"{name}.pruned.onnx",
             "pruned+int8": folder / f"{name}.pruned_int8.onnx"}
    if not files["int8 hand"].is_file():
        t = time.perf_counter()
        quantize_by_hand(source, files["int8 hand"], "input", calib)
        log(f"{name}: int8 by hand {time.perf_counter() - t:.1f}s")
    for key, quantize in (("pruned", None), ("pruned+int8", "int8")):
        if not files[key].is_file():
            t = time.perf_counter()
            report = prune_file(source, files[key], PruneOptions(channels=ratio, calib=str(calib_path),
                                                                 quantize=quantize))
            log(f"{name}: {key} {time.perf_counter() - t:.1f}s; " + "; ".join(report.notes))
            if report.quantization is not None:
                qz = report.quantization
                log(f"{name}: quantization float nodes {qz.float_nodes}, zeros {qz.zeros_before} -> {qz.zeros_after}")
    nobc = folder / f"{name}.pruned_int8_nobc.onnx"
    batches = to_batches({"input": np.load(calib_path)["input"][:256]}, 32)
    for correct in (False, True):  # what the bias correction costs: quantize_model alone, without and with it
        model = load_model(files["pruned"])
        t = time.perf_counter()
        quantize_model(model, "int8", "minmax", batches, recover="bias" if correct else "none")
        QUANTIZE_SECONDS.setdefault(name, []).append(time.perf_counter() - t)
        if not correct and not nobc.is_file():
            onnx.save(model.proto, str(nobc))
    files["pruned+int8, no bias corr."] = nobc
    return files


def logits(session: ort.InferenceSession, data: np.ndarray, batch: int = 32) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def timed_rounds(sessions: dict[str, ort.InferenceSession], feed: np.ndarray, rounds: int, warmup: int,
                 min_sample_s: float) -> dict[str, tuple[float, float]]:
    """Every round times each session once (``reps`` runs per sample), in an order rotated round by round;
    returns name -> (median ms, median over rounds of fp32's sample / this sample)."""
    name = next(iter(sessions.values())).get_inputs()[0].name
    feeds = {name: feed}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    start = time.perf_counter()
    sessions["fp32"].run(None, feeds)
    reps = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    keys = list(sessions)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        if r % 2:
            order.reverse()
        for key in order:
            t = time.perf_counter()
            for _ in range(reps):
                sessions[key].run(None, feeds)
            samples[key].append((time.perf_counter() - t) / reps)
    return {k: (statistics.median(v) * 1e3, statistics.median(a / b for a, b in zip(samples["fp32"], v)))
            for k, v in samples.items()}


def measure(name: str, files: dict[str, Path], eval_x: np.ndarray, labels: np.ndarray | None, feed: np.ndarray,
            providers: list[str], args) -> list[dict]:
    rows = {k: {"model": name, "variant": k, "size": files[k].stat().st_size / files["fp32"].stat().st_size}
            for k in VARIANTS}
    for provider in providers:
        short = prov.short_name(provider)
        sessions = {k: prov.create_session(files[k], provider, args.threads)[0] for k in VARIANTS}
        outputs = {k: logits(s, eval_x).astype(np.float64) for k, s in sessions.items()}
        predictions = {k: v.argmax(axis=1) for k, v in outputs.items()}
        timing = timed_rounds(sessions, feed, args.rounds, args.warmup, args.min_sample_ms / 1000)
        for k in VARIANTS:
            rows[k][f"{short} ms"], rows[k][short] = timing[k]
            rows[k][f"{short} agree"] = float(np.mean(predictions[k] == predictions["fp32"]))
            rows[k][f"{short} vs pruned"] = float(np.mean((outputs[k] - outputs["pruned"]) ** 2))
            if labels is not None:
                rows[k][f"{short} top-1"] = float(np.mean(predictions[k] == labels))
            counts = prov.node_counts(sessions[k])
            if counts and provider != "CPUExecutionProvider":
                rows[k][f"{short} nodes"] = "/".join(f"{prov.short_name(p)} {n}" for p, n in counts.items())
        del sessions
    return list(rows.values())


def recovery_rows(name: str, source: Path, calib_path: Path, folder: Path, eval_x: np.ndarray,
                  labels: np.ndarray | None, args, log) -> list[dict]:
    """The pruned file quantized once per ``--quant-recover`` choice, each scored against the fp32 pruned model."""
    pruned = folder / f"{name}.pruned{'_s' if args.sparsity else ''}.onnx"
    if not pruned.is_file():
        options = PruneOptions(sparsity=args.sparsity, calib=str(calib_path)) if args.sparsity else \
            PruneOptions(channels=args.ratio, calib=str(calib_path))
        prune_file(source, pruned, options)
    batches = to_batches({"input": np.load(calib_path)["input"][:256]}, 32)
    reference = logits(ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"]), eval_x).astype(np.float64)
    rows = [{"model": name, "variant": "fp32 pruned", "mse": 0.0, "seconds": 0.0,
             "top-1": None if labels is None else float(np.mean(reference.argmax(1) == labels))}]
    for recover in QUANT_RECOVERY:
        model = load_model(pruned)
        t = time.perf_counter()
        result = quantize_model(model, "int8", "minmax", batches, recover=recover)
        seconds = time.perf_counter() - t
        log(f"{name} {recover}: {seconds:.1f}s; " + "; ".join(result.notes))
        out = logits(ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]),
                     eval_x).astype(np.float64)
        rows.append({"model": name, "variant": f"int8, {recover}", "mse": float(np.mean((out - reference) ** 2)),
                     "seconds": seconds, "zeros": f"{result.zeros_before} -> {result.zeros_after}",
                     "top-1": None if labels is None else float(np.mean(out.argmax(1) == labels))})
    return rows


def render_recovery(rows: list[dict]) -> str:
    lines = ["| model | --quant-recover | top-1 | MSE vs pruned | zeros | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "-" if r["top-1"] is None else f"{100 * r['top-1']:.2f}%"
        lines.append(f"| {r['model']} | {r['variant']} | {top1} | {r['mse']:.4g} | {r.get('zeros', '-')} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def render(rows: list[dict], providers: list[str]) -> str:
    shorts = [prov.short_name(p) for p in providers]
    head = ["model", "variant", "size", "top-1 (cpu)", "agree (cpu)", "MSE vs pruned (cpu)"]
    for s in shorts:
        head += [f"{s} speedup", f"{s} ms"]
    if "openvino" in shorts:
        head += ["top-1 (openvino)", "openvino nodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["variant"], f"{r['size']:.3f}x",
                 f"{100 * r['cpu top-1']:.2f}%" if "cpu top-1" in r else "-", f"{100 * r['cpu agree']:.1f}%",
                 f"{r['cpu vs pruned']:.3g}"]
        for s in shorts:
            cells += [f"{r[s]:.2f}x", f"{r[f'{s} ms']:.3f}"]
        if "openvino" in shorts:
            cells += [f"{100 * r['openvino top-1']:.2f}%" if "openvino top-1" in r else "-",
                      r.get("openvino nodes", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    by = {(r["model"], r["variant"]): r for r in rows}
    out = []
    r18 = by.get(("resnet18", "pruned+int8"))
    if r18:
        out.append(f"resnet18 pruned+int8 cpu speedup {r18['cpu']:.2f}x (target >= 3.5x): "
                   f"{'PASS' if r18['cpu'] >= 3.5 else 'FAIL'}; size {r18['size']:.3f}x (target <= 0.13x): "
                   f"{'PASS' if r18['size'] <= 0.13 else 'FAIL'}")
    dig, base = by.get(("digits_resnet", "pruned+int8")), by.get(("digits_resnet", "fp32"))
    if dig and base:
        drop = 100 * (base["cpu top-1"] - dig["cpu top-1"])
        out.append(f"digits_resnet pruned+int8 top-1 {100 * dig['cpu top-1']:.2f}% vs fp32 "
                   f"{100 * base['cpu top-1']:.2f}% (drop {drop:.2f} points, target <= 1): "
                   f"{'PASS' if drop <= 1 else 'FAIL'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[*FULLSIZE, *DIGITS])
    ap.add_argument("--ratio", type=float, default=0.3, help="--channels")
    ap.add_argument("--calib-images", type=int, default=32, help="generated calibration images (full-size models)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-sample-ms", type=float, default=5.0, help="inner repeats for tiny models")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--fullsize-dir", default=os.path.join(tempfile.gettempdir(), "onnxprune_fullsize"))
    ap.add_argument("--work-dir", help="keep the quantized/pruned files here and reuse them (default: a temp dir)")
    ap.add_argument("--recovery-table", action="store_true", help="compare the --quant-recover choices (no timing)")
    ap.add_argument("--sparsity", type=float, help="--recovery-table: prune weights (--sparsity) instead of channels")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    providers = prov.resolve("cpu" if args.no_openvino else "cpu,openvino")
    load0 = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        folder = Path(args.work_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        full = [m for m in args.models if m in FULLSIZE]
        sources = ensure_models(args.fullsize_dir, full) if full else {}
        for name in args.models:
            if name in FULLSIZE:
                calib = generated_images(args.calib_images, seed=1)
                calib_path = folder / "calib224.npz"
                np.savez(calib_path, input=calib)
                eval_x, labels, source = generated_images(32, seed=2), None, Path(sources[name])
                feed = eval_x[:1]
            else:
                calib_path = ROOT / "models" / "digits_calib.npz"
                calib = np.load(calib_path)["input"]
                val = np.load(ROOT / "models" / "digits_val.npz")
                eval_x, labels, source = val["input"], val["labels"], ROOT / "models" / f"{name}.onnx"
                feed = eval_x[:1]
            if args.recovery_table:
                rows += recovery_rows(name, source, calib_path, folder, eval_x, labels, args, log)
                continue
            files = build_files(name, source, calib_path, calib, folder, args.ratio, log)
            rows += measure(name, files, eval_x, labels, feed, providers, args)
            log(f"{name} measured")
    if args.recovery_table:
        print(f"onnxruntime {ort.__version__}, load average at start {load0:.2f} / end {os.getloadavg()[0]:.2f}\n")
        print(render_recovery(rows))
        return 0
    print(f"onnxruntime {ort.__version__}, threads={args.threads}, rounds={args.rounds}, batch 1, cpus={os.cpu_count()}, "
          f"load average at start {load0:.2f} / end {os.getloadavg()[0]:.2f}\n")
    print(render(rows, providers))
    print()
    print("\n".join(targets(rows)))
    print("\nquantize_model on the pruned file (s): " + "; ".join(
        f"{name} {off:.2f} without bias correction, {on:.2f} with" for name, (off, on) in QUANTIZE_SECONDS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
