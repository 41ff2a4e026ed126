"""Hidden-width benchmark (``--hidden``): MACs and parameters kept, and how close the outputs stay, with and without
lsq recovery.

Models: models/transformer.onnx (pre-LN, 2 layers, width 32, random weights) and the encoders of
tests/hidden_support.py (2 layers, width 32, 4 heads, FFN 64, random weights whose embedding favours a few stream
directions), pre-LN and post-LN (BERT-style: a norm after the embedding and after every residual Add). None has a
task, so the table compares the pruned model's 10 outputs with the original's on held-out random inputs (512
samples; calibration: 128 other random samples): mean cosine similarity and top-1 agreement.

    python tools/bench_hidden.py [--fractions 0.1,0.25,0.4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the encoder builders the tests use

from hidden_support import calibration, cosine, encoder  # noqa: E402

from onnxprune.graph.io import from_proto  # noqa: E402
from onnxprune.pipeline import PruneOptions, prune_model  # noqa: E402


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def models() -> list[tuple[str, onnx.ModelProto, dict, dict]]:
    transformer = onnx.load(str(ROOT / "models" / "transformer.onnx"))
    draw = lambda n, seed: {"input": np.random.default_rng(seed).standard_normal((n, 16, 32)).astype(np.float32)}
    pre, post = encoder(False, "layer"), encoder(True, "layer")
    return [("transformer.onnx", transformer, draw(128, 1), draw(512, 2)),
            ("encoder pre-LN", pre, calibration(pre, 128, 1), calibration(pre, 512, 2)),
            ("encoder post-LN", post, calibration(post, 128, 1), calibration(post, 512, 2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.1,0.25,0.4")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    print("| model | layout | --hidden | width | recover | MACs kept | params kept | cosine | top-1 agree | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, proto, calib, test in models():
        expected = run(proto, test)
        for fraction in fractions:
            for method in ("none", "lsq"):
                copy = onnx.ModelProto()
                copy.CopyFrom(proto)
                model = from_proto(copy)
                start = time.perf_counter()
                report = prune_model(model, PruneOptions(hidden=fraction, recover=method), batches=[calib])
                seconds = time.perf_counter() - start
                got = run(model.proto, test)
                h, b, a = report.hidden, report.before, report.after
                agree = 100 * float(np.mean(got.argmax(1) == expected.argmax(1)))
                print(f"| {name} | {h.layout} | {fraction} | {h.before} -> {h.after} | {method} | "
                      f"{a.macs / b.macs:.3f} | {a.params / b.params:.3f} | {cosine(expected, got):.4f} | "
                      f"{agree:.1f}% | {seconds:.1f} |")


if __name__ == "__main__":
    main()
