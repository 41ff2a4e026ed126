"""Hidden-width benchmark (``--hidden``): MACs and parameters kept, and how close the outputs stay, with and without
lsq recovery.

Models: models/transformer.onnx (pre-LN, 2 layers, width 32, random weights) and the encoders of
tests/hidden_support.py (2 layers, width 32, 4 heads, FFN 64, random weights whose embedding favours a few stream
directions), pre-LN and post-LN (BERT-style: a norm after the embedding and after every residual Add). With
``--torch``, also a 2-layer encoder written with torch's nn.MultiheadAttention and nn.LayerNorm (width 32, 4 heads,
FFN 64, GELU, random weights, LayerNorm scale ~ N(1, 0.3) and shift ~ N(0, 0.2)), pre- and post-LN, exported by
torch.onnx.export(dynamo=False) at opset 14 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div) and 17, and the
opset-17 export after onnxruntime's transformer optimizer (model_type bert, opt_level 0: BiasGelu, FusedMatMul). None has a task, so the table compares the pruned model's 10 outputs with the original's on
held-out random inputs (512 samples; calibration: 128 other random samples): mean cosine similarity and top-1
agreement.

    python tools/bench_hidden.py [--fractions 0.1,0.25,0.4] [--channels 0.3] [--torch]
    python tools/bench_hidden.py --per-position    # variance kept: one shared Q against one Q per position
    python tools/bench_hidden.py --digits          # the trained digits ViT: held-out top-1 against the labels

``--digits`` has a task: models/digits_vit.onnx (pre-LN, 2 blocks, width 48, 4 heads, a Conv patch embedding and a
class token), pruned as ``python -m onnxprune models/digits_vit.onnx --hidden F [--channels 0.3] [--recover none]
--calib models/digits_calib.npz`` would (the same options and calibration loader, CLI defaults otherwise), scored by
top-1 on the 359 labelled held-out samples of models/digits_val.npz; ``--channels 0.3`` alone is the reference row.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's onnxprune, and the encoder builders the tests use

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


def torch_models() -> list[tuple[str, onnx.ModelProto, dict, dict]]:
    import io

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, pre: bool) -> None:
            super().__init__()
            self.pre, self.ln1, self.ln2 = pre, nn.LayerNorm(32), nn.LayerNorm(32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

        def forward(self, x):
            if self.pre:
                y = self.ln1(x)
                x = x + self.attn(y, y, y, need_weights=False)[0]
                return x + self.ff(self.ln2(x))
            x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
            return self.ln2(x + self.ff(x))

    class Net(nn.Module):
        def __init__(self, pre: bool) -> None:
            super().__init__()
            self.pre, self.embed = pre, nn.Linear(16, 32)
            self.pos = nn.Parameter(torch.randn(1, 8, 32) * 0.3)
            self.blocks, self.ln, self.head = nn.Sequential(Block(pre), Block(pre)), nn.LayerNorm(32), nn.Linear(32, 10)

        def forward(self, x):
            x = self.embed(x) + self.pos
            x = self.blocks(x if self.pre else self.ln(x))
            return self.head((self.ln(x) if self.pre else x).mean(1))

    draw = lambda n, seed: {"input": np.random.default_rng(seed).standard_normal((n, 8, 16)).astype(np.float32)}
    found = []
    for pre in (True, False):
        torch.manual_seed(0)
        net = Net(pre).eval()
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, 0.3)
                nn.init.normal_(m.bias, 0.0, 0.2)
        for opset in (14, 17):
            buffer = io.BytesIO()
            torch.onnx.export(net, torch.randn(2, 8, 16), buffer, opset_version=opset, dynamo=False,
                              input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
            exported = onnx.load_from_string(buffer.getvalue())
            found.append((f"torch MHA {'pre' if pre else 'post'}-LN, opset {opset}", exported, draw(128, 1),
                          draw(512, 2)))
        found.append((f"torch MHA {'pre' if pre else 'post'}-LN, opset 17, ORT-fused", fused(exported), draw(128, 1),
                      draw(512, 2)))
    return found


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's transformer optimizer (model_type bert, opt_level 0), as issue 14 asks the tool to handle."""
    import tempfile

    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, path)
        optimized = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=32, opt_level=0)
        optimized.save_model_to_file(str(path))  # adds the com.microsoft opset import its contrib ops need
        return onnx.load(path)


def variance_kept(proto: onnx.ModelProto, calib: dict, fraction: float) -> None:
    """Why one shared Q: at each stream position, the share of the normalised stream's variance the kept directions
    hold, with the shared basis and with that position's own principal basis (what one Q per block would keep)."""
    from onnxprune.data.probe import Probe
    from onnxprune.graph.index import GraphIndex
    from onnxprune.prune.hidden.basis import StreamCovariance, keep_count, principal_basis
    from onnxprune.prune.hidden.stream import find_stream

    stream = find_stream(GraphIndex(from_proto(proto)))
    grams = []
    for n in stream.norms:
        covariance = StreamCovariance(stream.width, not stream.rms, n.epsilon)
        for (values,) in Probe(proto, [n.x], [calib]).iterate([n.x]):
            covariance.add(values)
        grams.append(covariance.gram)
    keep = keep_count(stream.width, fraction)
    shared = principal_basis(sum(grams))[0][:, :keep]
    print(f"\nvariance kept at each norm's input, --hidden {fraction} ({stream.width} -> {keep}): shared Q / own Q")
    for n, gram in zip(stream.norms, grams):
        own = principal_basis(gram)[1]
        print(f"  {n.label}: {np.trace(shared.T @ gram @ shared) / np.trace(gram):.4f} / "
              f"{own[:keep].sum() / own.sum():.4f}")


def digits(fractions: list[float]) -> None:
    """The trained ViT: held-out top-1 and MACs kept, --hidden alone and with --channels 0.3, lsq or no recovery."""
    path = ROOT / "models" / "digits_vit.onnx"
    val = np.load(ROOT / "models" / "digits_val.npz")
    original = onnx.load(str(path))
    expected = run(original, {"input": val["input"]})
    top1 = lambda logits: 100 * float(np.mean(logits.argmax(1) == val["labels"]))
    print(f"digits_vit.onnx: held-out top-1 {top1(expected):.2f}% ({len(val['labels'])} samples)\n")
    print("| `--hidden` | `--channels` | recover | width | MACs kept | params kept | held-out top-1 | top-1 agree | "
          "logits cosine | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fraction in [0.0, *fractions]:
        for channels in ((0.3,) if not fraction else (None, 0.3)):
            for method in ("none", "lsq"):
                copy = onnx.ModelProto()
                copy.CopyFrom(original)
                model = from_proto(copy)
                start = time.perf_counter()
                options = PruneOptions(hidden=fraction or None, channels=channels, recover=method,
                                       calib=str(ROOT / "models" / "digits_calib.npz"))
                report = prune_model(model, options)
                seconds = time.perf_counter() - start
                h, b, a = report.hidden, report.before, report.after
                width = f"{h.before} -> {h.after}" if h else "48"
                got = run(model.proto, {"input": val["input"]})
                agree = 100 * float(np.mean(got.argmax(1) == expected.argmax(1)))
                print(f"| {fraction or '-'} | {channels or '-'} | {method} | {width} | {a.macs / b.macs:.3f} | "
                      f"{a.params / b.params:.3f} | {top1(got):.2f}% | {agree:.1f}% | {cosine(expected, got):.4f} | "
                      f"{seconds:.1f} |")
    print(f"\n(--round-to: {report.round_to}, the CPU's default)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.1,0.25,0.4")
    parser.add_argument("--channels", type=float, default=None,
                        help="also remove this fraction of the FFN channels (--channels, --round-to 1)")
    parser.add_argument("--torch", action="store_true", help="also torch exports (needs torch)")
    parser.add_argument("--per-position", action="store_true",
                        help="instead: variance kept per stream position, shared Q against one Q per position")
    parser.add_argument("--digits", action="store_true",
                        help="instead: the trained digits ViT, held-out top-1 (see the module docstring)")
    args = parser.parse_args()
    if args.digits:
        digits([float(f) for f in args.fractions.split(",")])
        return
    if args.per_position:
        for name, proto, calib, _ in models()[:2]:
            print(name, end="")
            variance_kept(proto, calib, 0.25)
        return
    fractions = [float(f) for f in args.fractions.split(",")]
    print("| model | layout | --hidden | width | recover | MACs kept | params kept | cosine | top-1 agree | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, proto, calib, test in models() + (torch_models() if args.torch else []):
        expected = run(proto, test)
        source = proto.graph.input[0].name
        for fraction in fractions:
            for method in ("none", "lsq"):
                copy = onnx.ModelProto()
                copy.CopyFrom(proto)
                model = from_proto(copy)
                start = time.perf_counter()
                options = PruneOptions(hidden=fraction, recover=method, channels=args.channels, round_to=1,
                                       input_shapes={source: [1, *calib[source].shape[1:]]})
                report = prune_model(model, options, batches=[calib])
                seconds = time.perf_counter() - start
                got = run(model.proto, test)
                h, b, a = report.hidden, report.before, report.after
                agree = 100 * float(np.mean(got.argmax(1) == expected.argmax(1)))
                macs = f"{a.macs / b.macs:.3f}" if a.macs and b.macs else "?"
                print(f"| {name} | {h.layout} | {fraction} | {h.before} -> {h.after} | {method} | {macs} | "
                      f"{a.params / b.params:.3f} | {cosine(expected, got):.4f} | {agree:.1f}% | {seconds:.1f} |")


if __name__ == "__main__":
    main()
