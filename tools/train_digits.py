#!/usr/bin/env python
"""Train two small CNNs on scikit-learn's bundled digits set and export them for validation tests and docs.

Why: accuracy numbers are only meaningful on a *trained* model; the zoo in ``models/`` is random. The digits set
ships inside scikit-learn (1,797 8x8 grey images, 10 classes), so nothing is downloaded and training takes seconds.

Usage (from the repository root; needs torch (CPU) and scikit-learn, both tools-only dependencies)::

    pip install scikit-learn
    python tools/train_digits.py            # writes the files below

Writes:

* ``models/digits_resnet.onnx``: stem conv + two residual blocks (BatchNormalization kept, residual ``Add``),
  global average pool, linear head;
* ``models/digits_plain.onnx``: plain conv/BN/ReLU stack with a Flatten + Linear head (no residual);
* ``models/digits_mobile.onnx``: MobileNetV2-style inverted residuals (depthwise convs, linear residual Add), a 1x1
  head conv, global average pool, linear head;
* ``models/digits_calib.npz``: 256 unlabelled *training* samples (``input``), calibration data for ``--calib``;
* ``models/digits_val.npz``: the held-out samples, ``input`` float32 ``[N, 1, 8, 8]`` (pixel / 16) and ``labels``
  int64 ``[N]``. The training split never sees them.

Both models: input ``input`` ``[batch, 1, 8, 8]``, output ``logits`` ``[batch, 10]``, legacy exporter, opset 13,
``training=TrainingMode.PRESERVE`` on an eval() model (BN stays a node, as in ``tools/make_zoo.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SEED = 0
HOLDOUT = 0.2
CALIB_SAMPLES = 256


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsPlain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class DigitsMobile(nn.Module):
    """Inverted residuals as in MobileNetV2 (1x1 expand, depthwise 3x3, 1x1 project, linear residual), a 1x1 head
    conv before global pooling; ReLU, not ReLU6."""

    def __init__(self, width: int = 16, expand: int = 4) -> None:
        super().__init__()
        hidden = width * expand

        def block() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1, self.block2 = block(), block()
        self.head = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block1(x)
        x = x + self.block2(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(x), 1), 1))


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    n_val = int(round(len(y) * HOLDOUT))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: str) -> None:
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=13,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=MODELS, help="output folder (default: models/)")
    parser.add_argument("--calib-only", action="store_true", help="only (re)write digits_calib.npz")
    parser.add_argument("--half-width", action="store_true",
                        help="write nothing: train the residual CNN at half width (what --channels 0.5 leaves) from "
                             "scratch and print its held-out accuracy, the ceiling for recovery without training")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_val, y_val = split()
    if args.half_width:
        torch.manual_seed(SEED)
        model = train(DigitsResNet(8), x_train, y_train, args.epochs)
        print(f"digits_resnet at half width, trained from scratch: held-out acc {accuracy(model, x_val, y_val):.4f}")
        return
    os.makedirs(args.out, exist_ok=True)
    calib = os.path.join(args.out, "digits_calib.npz")
    np.savez_compressed(calib, input=x_train[:CALIB_SAMPLES])  # unlabelled training samples for --calib
    print(f"calibration samples: {CALIB_SAMPLES} training images -> {calib}")
    if args.calib_only:
        return
    for name, ctor in (("digits_resnet", DigitsResNet), ("digits_plain", DigitsPlain), ("digits_mobile", DigitsMobile)):
        torch.manual_seed(SEED)
        model = train(ctor(), x_train, y_train, args.epochs)
        path = os.path.join(args.out, f"{name}.onnx")
        export(model, path)
        print(f"{name}: train acc {accuracy(model, x_train, y_train):.4f}, held-out acc "
              f"{accuracy(model, x_val, y_val):.4f} -> {path} ({os.path.getsize(path)} bytes)")
    npz = os.path.join(args.out, "digits_val.npz")
    np.savez_compressed(npz, input=x_val, labels=y_val)
    print(f"held-out samples: {len(y_val)} -> {npz} ({os.path.getsize(npz)} bytes)", file=sys.stdout)


if __name__ == "__main__":
    main()
