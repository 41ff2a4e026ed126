"""Recovery on every zoo model: held-out output error of the pruned model without and with recovery.

The zoo models have random weights and no task, so the measure is how far the pruned model's outputs are from the
original's on inputs that were *not* used for calibration: relative squared error sum((out - ref)^2) / sum(ref^2)
over all float outputs. Calibration and held-out inputs are random normal draws (different seeds); batch dims that
are dynamic get 1 sample per run.

    python tools/bench_zoo_recovery.py [--models resnet_bn vgg_bn] [--configs "--channels 0.3" "--sparsity 0.5"]
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.graph.io import load_model
from onnxprune.pipeline import PruneOptions, prune_model
from onnxprune.data.sources import generate, input_specs

MODELS = Path(__file__).resolve().parent.parent / "models"
SKIP = {"digits_resnet", "digits_plain", "digits_mobile"}  # trained: tools/bench_recovery.py measures accuracy on them
CONFIGS = ["--channels 0.3", "--channels 0.5", "--sparsity 0.5", "--pattern 2:4"]


def _options(config: str, calib: str, recover: str) -> PruneOptions:
    words = shlex.split(config)
    kwargs: dict = {"calib": calib, "recover": recover, "round_to": 1}
    for flag, value in zip(words[::2], words[1::2]):
        key = flag.lstrip("-").replace("-", "_")
        kwargs[key] = value if key in ("pattern", "criterion", "scope") else float(value)
    if kwargs.get("pattern"):
        n, m = kwargs["pattern"].split(":")
        kwargs["pattern"] = (int(n), int(m))
    if "steps" in kwargs:
        kwargs["steps"] = int(kwargs["steps"])
    return PruneOptions(**kwargs)


def _outputs(proto: onnx.ModelProto, base_dir: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    runs = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    return [np.concatenate(parts) for parts in zip(*runs)]


def _error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    pairs = [(r.astype(np.float64), o) for r, o in zip(ref, out) if r.dtype.kind == "f" and r.shape == o.shape]
    return sum(float(np.sum((r - o) ** 2)) for r, o in pairs) / max(sum(float(np.sum(r ** 2)) for r, _ in pairs),
                                                                   1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo model stems (default: all but the trained digits CNNs)")
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="pruning options, one string each")
    parser.add_argument("--calib", type=int, default=64, help="random calibration samples")
    parser.add_argument("--heldout", type=int, default=16, help="random held-out samples")
    args = parser.parse_args()
    paths = sorted(p for p in MODELS.glob("*.onnx") if p.stem not in SKIP)
    if args.models:
        paths = [p for p in paths if p.stem in args.models]
    print("| model | pruning | error, no recovery | error, lsq | lsq / none | seconds |")
    print("|---|---|---|---|---|---|")
    worse = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            proto = onnx.load(str(path), load_external_data=False)
            specs = input_specs(proto)
            specs = [type(s)(s.name, s.dtype, tuple(d if isinstance(d, int) else 1 for d in s.shape))
                     for s in specs]
            calib = Path(tmp) / f"{path.stem}_calib.npz"
            np.savez(calib, **generate(specs, 1, args.calib, seed=1).inputs)
            heldout = generate(specs, 1, args.heldout, seed=2).inputs
            ref = _outputs(proto, path.parent, heldout)
            for config in args.configs:
                errors, seconds = {}, 0.0
                for recover in ("none", "lsq"):
                    model = load_model(path)
                    start = time.perf_counter()
                    prune_model(model, _options(config, str(calib), recover))
                    seconds = time.perf_counter() - start
                    errors[recover] = _error(ref, _outputs(model.proto, path.parent, heldout))
                ratio = errors["lsq"] / errors["none"] if errors["none"] > 0 else float("nan")
                worse += ratio > 1.0
                print(f"| {path.stem} | {config} | {errors['none']:.4g} | {errors['lsq']:.4g} | {ratio:.3f} | "
                      f"{seconds:.2f} |", flush=True)
    print(f"\nlsq worse than no recovery on held-out inputs: {worse} row(s)")


if __name__ == "__main__":
    main()
