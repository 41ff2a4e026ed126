"""Recovery benchmark: accuracy and agreement of pruned models with no recovery, bn and lsq, and the time taken.

Trained digits CNNs (models/digits_*.onnx: residual, plain, inverted-residual) are evaluated on the held-out set
(models/digits_val.npz), calibrated on 256 training samples (models/digits_calib.npz). The random-weight transformer
(models/transformer.onnx) has no task: for it the table shows agreement with the original (top-1 of its 10 outputs
and relative error) on random inputs, calibrated on other random inputs.

    python tools/bench_recovery.py [--quick] [--subsets 5]
"""

from __future__ import annotations

import argparse
import itertools
import sys
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
            if method != "lsq" and "steps" in options or (method != "lsq" and "sparsity" in options
                                                                 and "criterion" not in options):
                continue  # rounds without re-fitting, and obs (chosen while re-fitting), need lsq
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
    parser.add_argument("--subsets", type=int, default=0, metavar="N",
                        help="also: the residual and inverted-residual CNNs with lsq on N random calibration "
                             "draws (needs scikit-learn)")
    args = parser.parse_args()
    methods = ["none", "bn", "lsq"]
    configs = [("--channels 0.3", {"channels": 0.3}),
               ("--channels 0.5 --criterion l1", {"channels": 0.5, "criterion": "l1"}),
               ("--channels 0.5 --criterion act", {"channels": 0.5, "criterion": "act"}),
               ("--channels 0.5 (auto: recon)", {"channels": 0.5}),
               ("--channels 0.5 --steps 2", {"channels": 0.5, "steps": 2}),
               ("--channels 0.5 --scope global", {"channels": 0.5, "scope": "global"}),
               ("--channels 0.5 --scope global --steps 4", {"channels": 0.5, "scope": "global", "steps": 4}),
               ("--sparsity 0.7 --criterion l1", {"sparsity": 0.7, "criterion": "l1"}),
               ("--sparsity 0.7 --criterion wanda", {"sparsity": 0.7, "criterion": "wanda"}),
               ("--sparsity 0.7 (auto: obs)", {"sparsity": 0.7}),
               ("--sparsity 0.8 (auto: obs)", {"sparsity": 0.8})]
    if args.quick:
        configs = [c for c in configs if c[0].startswith(("--channels 0.5 (auto", "--sparsity 0.7 (auto"))]
    val = np.load(MODELS / "digits_val.npz")
    header = ["| model | pruning | recovery | MACs kept | top-1 % | agreement % | rel. error | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("digits_resnet.onnx", "digits_plain.onnx", "digits_mobile.onnx"):
        rows += bench(name, {"input": val["input"]}, val["labels"], str(MODELS / "digits_calib.npz"), configs,
                      methods)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=rng.standard_normal((256, 16, 32)).astype(np.float32))
        test = {"input": rng.standard_normal((256, 16, 32)).astype(np.float32)}
        rows += bench("transformer.onnx", test, None, str(calib),
                      [c for c in configs if "act" not in c[0] and "steps" not in c[0]], methods)
    print("\n".join(header + rows))
    if args.subsets:
        print()
        print("\n".join(subsets(configs, args.subsets)))


def calib_draws(folder: Path, count: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """``count`` calibration files of 256 random training images (seeds 0..count-1) in ``folder``, and the held-out
    images and labels (scikit-learn's digits, split as tools/train_digits.py splits them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_digits import split

    x_train, _, x_val, y_val = split()
    files = []
    for seed in range(count):
        files.append(folder / f"calib_{seed}.npz")
        pick = np.random.default_rng(seed).choice(len(x_train), 256, replace=False)
        np.savez(files[-1], input=x_train[pick])
    return files, x_val, y_val


def subsets(configs: list, count: int) -> list[str]:
    """The residual and inverted-residual digits CNNs with lsq, calibrated on ``count`` different random draws of 256
    training images: how much the accuracy depends on which samples were given."""
    rows = [f"| model | pruning (lsq) | top-1 % per calibration draw (seeds 0-{count - 1}) | mean | min |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        files, x_val, y_val = calib_draws(Path(tmp), count)
        for name, (label, options) in itertools.product(("digits_resnet.onnx", "digits_mobile.onnx"), configs):
            accs = []
            for calib in files:
                model = from_proto(onnx.load(str(MODELS / name)))
                prune_model(model, PruneOptions(calib=str(calib), round_to=1, **options))
                accs.append(100 * float((run(model.proto, {"input": x_val}).argmax(1) == y_val).mean()))
            draws = " ".join(f"{a:.1f}" for a in accs)
            rows.append(f"| {name} | {label} | {draws} | {np.mean(accs):.2f} | {min(accs):.1f} |")
    return rows


if __name__ == "__main__":
    main()
