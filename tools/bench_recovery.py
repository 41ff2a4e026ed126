"""Recovery benchmark: accuracy and agreement of pruned models with no recovery, bn and lsq, and the time taken.

Trained digits CNNs (models/digits_*.onnx) are evaluated on the held-out set (models/digits_val.npz), calibrated on
256 training samples (models/digits_calib.npz). The random-weight transformer (models/transformer.onnx) has no
task: for it the table shows agreement with the original (top-1 of its 10 outputs and relative error) on random
inputs, calibrated on other random inputs.

    python tools/bench_recovery.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, prune_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def bench(name: str, feeds: dict, labels: np.ndarray | None, calib: str, configs: list, methods: list) -> list[str]:
    original = onnx.load(str(MODELS / name))
    ref = run(original, feeds)
    rows = []
    base = f"{100 * (ref.argmax(1) == labels).mean():.1f}" if labels is not None else "-"
    rows.append(f"| {name} | original | - | - | {base} | 100.0 | 0 | - |")
    for label, options in configs:
        for method in methods:
            model = from_proto(onnx.load(str(MODELS / name)))
            start = time.perf_counter()
            report = prune_model(model, PruneOptions(calib=calib, recover=method, round_to=1, **options))
            seconds = time.perf_counter() - start
            out = run(model.proto, feeds)
            acc = f"{100 * (out.argmax(1) == labels).mean():.1f}" if labels is not None else "-"
            agree = 100 * (out.argmax(1) == ref.argmax(1)).mean()
            err = float(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
            macs = f"{report.after.macs / report.before.macs:.2f}" if report.after.macs else "-"
            rows.append(f"| {name} | {label} | {method} | {macs} | {acc} | {agree:.1f} | {err:.3g} | {seconds:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    args = parser.parse_args()
    methods = ["none", "bn", "lsq"]
    configs = [("--channels 0.3", {"channels": 0.3}), ("--channels 0.5", {"channels": 0.5}),
               ("--channels 0.5 --criterion act", {"channels": 0.5, "criterion": "act"}),
               ("--channels 0.5 --scope global", {"channels": 0.5, "scope": "global"}),
               ("--channels 0.5 --criterion recon", {"channels": 0.5, "criterion": "recon"}),
               ("--channels 0.5 --criterion recon --scope global",
                {"channels": 0.5, "criterion": "recon", "scope": "global"}),
               ("--channels 0.5 --criterion recon --steps 2", {"channels": 0.5, "criterion": "recon", "steps": 2}),
               ("--sparsity 0.5", {"sparsity": 0.5}), ("--sparsity 0.7", {"sparsity": 0.7}),
               ("--sparsity 0.7 --criterion wanda", {"sparsity": 0.7, "criterion": "wanda"})]
    if args.quick:
        configs = [c for c in configs if c[0] in ("--channels 0.5", "--sparsity 0.7")]
    val = np.load(MODELS / "digits_val.npz")
    header = ["| model | pruning | recovery | MACs kept | top-1 % | agreement % | rel. error | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("digits_resnet.onnx", "digits_plain.onnx"):
        rows += bench(name, {"input": val["input"]}, val["labels"], str(MODELS / "digits_calib.npz"), configs,
                      methods)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=rng.standard_normal((256, 16, 32)).astype(np.float32))
        test = {"input": rng.standard_normal((256, 16, 32)).astype(np.float32)}
        rows += bench("transformer.onnx", test, None, str(calib),
                      [c for c in configs if "act" not in c[0] and "recon" not in c[0]][:3], methods)
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
