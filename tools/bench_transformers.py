#!/usr/bin/env python
"""What structured pruning does to the committed transformers (issue 14, item 8): MACs, speed and quality.

Per model (the digits ViT and the BERT encoder as written by the TorchScript exporter, the dynamo exporter and
onnxruntime's fusions; tools/make_transformers.py) and per run of the tool (``--channels R`` without and with
``--calib``), one row with:

* ``pruned``: the channel groups the tool shrank, by what they are (``ffn``: reaches a GELU; ``heads``: reaches the
  reshape into heads or a fused attention op; ``hidden``: reaches a LayerNormalization) with before -> after
  counts. The bench prunes whatever the tool can prune; it does not choose.
* ``MACs kept``: counted here from the shapes onnxruntime computes at batch 1, sequence 32 (the ViT: one image),
  every MatMul included (also activation x activation: attention scores and context) and fused Attention ops
  (projection + scores + context). Counted independently of the tool's own report.
* ``speedup``: onnxruntime CPU latency, original vs pruned, interleaved in one process at batch 1 (``--batch``),
  sequence 32 (tools/bench_channels.py's timing: median over pairs of the ratio of adjacent samples). The original's
  row times the model against a copy of itself: how far from 1.00x noise alone moves the ratio.
* quality on held-out data: top-1 on ``digits_val.npz`` (ViT); the mean cosine similarity of the output token
  vectors at real (non-padding) positions against the original model on ``bert_val.npz`` (BERT).

Usage (from the repository root)::

    nice python tools/bench_transformers.py                  # ratio 0.3, 20 pairs
    nice python tools/bench_transformers.py --ratio 0.5 --pairs 40 --models bert_tiny
    nice python tools/bench_transformers.py --recovery 0.3 0.5      # held-out cosine per recovery choice (BERT)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # this checkout's onnxprune, and the other tools

from bench_channels import interleaved_latency  # noqa: E402

from onnxprune.pipeline import PruneOptions, prune_file  # noqa: E402

MODELS = ROOT / "models"
SEQ = 32


@dataclass(frozen=True)
class Bench:
    """One model with its calibration and held-out data; ``labels``: top-1 is the metric, else output cosine."""

    name: str
    calib: str
    val: str
    labels: bool


BENCHES = [Bench("digits_vit", "digits_calib.npz", "digits_val.npz", True),
           Bench("bert_tiny", "bert_calib.npz", "bert_val.npz", False),
           Bench("bert_tiny_dynamo", "bert_calib.npz", "bert_val.npz", False),
           Bench("bert_tiny_fused", "bert_calib.npz", "bert_val.npz", False)]


def masked_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean cosine similarity of the token vectors at non-padding positions."""
    keep = mask.reshape(-1) != 0
    a, b = a.reshape(-1, a.shape[-1])[keep].astype(np.float64), b.reshape(-1, b.shape[-1])[keep].astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def _session(source: str | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def macs(path: Path, feeds: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates of one run on ``feeds``, from the shapes onnxruntime computes for every tensor."""
    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for n in model.graph.node for o in n.output
                              if o and o not in known)
    session = _session(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, session.run(names, feeds))}
    shapes.update({k: v.shape for k, v in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "MatMul":
            total += int(np.prod(out)) * shapes[node.input[0]][-1]
        elif node.op_type == "Gemm":
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            total += int(np.prod(out)) * shapes[node.input[0]][0 if transposed else 1]
        elif node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(shapes[node.input[1]][1:]))
        elif node.op_type == "Attention":  # com.microsoft: packed q/k/v projection, then scores and context
            batch, seq, hidden = shapes[node.input[0]]
            projected = shapes[node.input[1]][1]  # q + k + v widths (equal without qkv_hidden_sizes)
            total += batch * seq * hidden * projected + 2 * batch * seq * seq * (projected // 3)
    return total


def evaluate(path: Path, bench: Bench, reference: np.ndarray | None) -> float:
    """Held-out top-1 (labels) or the masked output cosine against ``reference``."""
    with np.load(MODELS / bench.val) as data:
        arrays = {k: data[k] for k in data.files}
    session = _session(str(path))
    feeds = {i.name: arrays[i.name] for i in session.get_inputs()}
    out = session.run(None, feeds)[0]
    if bench.labels:
        return float(np.mean(out.argmax(1) == arrays["labels"]))
    return masked_cosine(reference, out, arrays["attention_mask"])


def timing_feeds(bench: Bench, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` held-out images, or sequences (padded to SEQ as stored)."""
    with np.load(MODELS / bench.val) as data:
        return {k: data[k][:batch] for k in data.files if k != "labels"}


def kind(model: onnx.ModelProto, members: list[str]) -> str:
    """ffn / heads / hidden / other: what the tensors of a channel group reach."""
    tensors = {m.rsplit("[", 1)[0] for m in members}
    ops = {n.op_type for n in model.graph.node if tensors & set(n.input)}
    if ops & {"Erf", "Gelu", "BiasGelu", "FastGelu"}:
        return "ffn"
    if ops & {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}:
        return "hidden"
    if ops & {"Reshape", "Attention", "MultiHeadAttention", "GroupQueryAttention"}:
        return "heads"
    return "other"


def run(bench: Bench, ratio: float, calibrated: bool, tmp: Path, args) -> dict:
    path = MODELS / f"{bench.name}.onnx"
    out = tmp / f"{bench.name}_{calibrated}.onnx"
    options = PruneOptions(channels=ratio, calib=str(MODELS / bench.calib) if calibrated else None)
    start = time.perf_counter()
    report = prune_file(path, out, options)
    seconds = time.perf_counter() - start
    original = onnx.load(str(path))
    shrunk = [g for g in report.groups if g.after < g.before]
    pruned = ", ".join(f"{kind(original, g.members)} {g.before}->{g.after}" for g in shrunk) or "nothing"
    feeds = timing_feeds(bench, args.batch)
    reference = None if bench.labels else _run_val(path, bench)
    _, _, _, speedup = interleaved_latency(str(path), str(out), args.threads, args.pairs, args.warmup,
                                           args.min_sample_ms / 1000, feeds)
    return {"model": bench.name, "run": f"--channels {ratio}" + (" --calib" if calibrated else ""),
            "pruned": pruned, "params": report.after.params / report.before.params,
            "macs": macs(out, timing_feeds(bench, 1)) / macs(path, timing_feeds(bench, 1)), "speedup": speedup,
            "quality": evaluate(out, bench, reference), "seconds": seconds}


def _run_val(path: Path, bench: Bench) -> np.ndarray:
    with np.load(MODELS / bench.val) as data:
        feeds = {k: data[k] for k in data.files if k != "labels"}
    return _session(str(path)).run(None, feeds)[0]


def layer_norm_moments(original: onnx.ModelProto, pruned: onnx.ModelProto, calib: dict[str, np.ndarray]) -> None:
    """``--recover bn``'s LayerNorm step applied here to any pruned model (e.g. after lsq, which the tool does not
    combine with it): each LayerNormalization in turn gets the original's per-channel output mean and spread at
    real tokens of ``calib``, through its scale and bias."""
    keep = calib["attention_mask"].reshape(-1) != 0
    inits = {t.name: t for t in pruned.graph.initializer}
    for node in (n for n in pruned.graph.node if n.op_type == "LayerNormalization"):
        o, p = (_outputs(m, calib, [node.output[0]])[0] for m in (original, pruned))
        o, p = (v.reshape(-1, v.shape[-1])[keep].astype(np.float64) for v in (o, p))
        ratio = o.std(0) / np.maximum(p.std(0), 1e-8)
        shift = o.mean(0) - ratio * p.mean(0)
        scale, bias = (onnx.numpy_helper.to_array(inits[n]) for n in node.input[1:3])
        inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array((ratio * scale).astype(np.float32), node.input[1]))
        inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array((ratio * bias + shift).astype(np.float32),
                                                                   node.input[2]))


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    return _session(copy.SerializeToString()).run(names, feeds)


def recovery_table(names: list[str], ratios: list[float], folder: Path) -> None:
    """Held-out masked cosine of the BERT models per recovery choice (no timing)."""
    runs = [("no --calib (l1, no recovery)", None, None), ("--recover none --calib", "none", True),
            ("--recover bn --calib", "bn", True), ("--calib (lsq)", "lsq", True),
            ("--calib (lsq), then LayerNorm moments (bench-side)", "lsq+ln", True)]
    print("| model | run | " + " | ".join(f"--channels {r}" for r in ratios) + " |")
    print("|---|---|" + "---|" * len(ratios))
    for name in names:
        bench = next(b for b in BENCHES if b.name == name)
        path = MODELS / f"{name}.onnx"
        reference = _run_val(path, bench)
        with np.load(MODELS / bench.calib) as data:
            calib = {k: data[k] for k in data.files}
        for label, method, calibrated in runs:
            cells = []
            for ratio in ratios:
                out = folder / f"{name}_recovery.onnx"
                prune_file(path, out, PruneOptions(channels=ratio, recover=(method or "none").split("+")[0],
                                                   calib=str(MODELS / bench.calib) if calibrated else None))
                if method == "lsq+ln":
                    model = onnx.load(str(out))
                    layer_norm_moments(onnx.load(str(path)), model, calib)
                    onnx.save(model, str(out))
                cells.append(f"{evaluate(out, bench, reference):.5f}")
            print(f"| {name} | {label} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--models", nargs="*", default=[b.name for b in BENCHES])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="samples per timed run (MACs are counted at batch 1)")
    parser.add_argument("--min-sample-ms", type=float, default=5.0)
    parser.add_argument("--recovery", nargs="*", type=float, metavar="RATIO",
                        help="instead: held-out cosine of the BERT models per recovery choice at these ratios")
    args = parser.parse_args(argv)
    if args.recovery is not None:
        with tempfile.TemporaryDirectory(prefix="bench_transformers_") as folder:
            recovery_table([m for m in args.models if m.startswith("bert") and "fused" not in m],
                           args.recovery or [0.3, 0.5], Path(folder))
        return 0
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_transformers_") as folder:
        for bench in (b for b in BENCHES if b.name in args.models):
            path = MODELS / f"{bench.name}.onnx"
            original = evaluate(path, bench, _run_val(path, bench))
            copy = Path(shutil.copy(path, Path(folder) / f"{bench.name}_copy.onnx"))
            _, _, _, noise = interleaved_latency(str(path), str(copy), args.threads, args.pairs, args.warmup,
                                                 args.min_sample_ms / 1000, timing_feeds(bench, args.batch))
            rows.append({"model": bench.name, "run": "original (speedup: against a copy of itself, the noise)",
                         "pruned": "-", "params": 1.0, "macs": 1.0, "speedup": noise, "quality": original,
                         "seconds": 0.0})
            for calibrated in (False, True):
                rows.append(run(bench, args.ratio, calibrated, Path(folder), args))
                print(f"{rows[-1]}", file=sys.stderr, flush=True)
    print(f"onnxruntime {ort.__version__}, batch {args.batch}, sequence {SEQ}, threads {args.threads}, {args.pairs} interleaved "
          f"pairs, load average {load:.2f} at start / {os.getloadavg()[0]:.2f} at end; quality: held-out top-1 (ViT) "
          "or masked output cosine to the original (BERT)\n")
    print("| model | run | pruned (groups: before -> after) | params kept | MACs kept | CPU speedup | quality | "
          "prune s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        quality = f"{100 * r['quality']:.2f}%" if r["model"] == "digits_vit" else f"{r['quality']:.4f}"
        print(f"| {r['model']} | {r['run']} | {r['pruned']} | {r['params']:.3f} | {r['macs']:.3f} | "
              f"{r['speedup']:.2f}x | {quality} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
