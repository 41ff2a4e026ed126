#!/usr/bin/env python
"""Generate full-size (224x224) ONNX models for the benchmarks; outputs are never committed.

Usage (from the repository root)::

    python tools/make_fullsize.py --out /tmp/fullsize                       # resnet18, resnet50, mobilenetv2
    python tools/make_fullsize.py --out /tmp/fullsize --models resnet50w2   # ResNet-50 with 2x width bottlenecks

Models are written by hand in ``torch.nn`` with the standard torchvision layer shapes (torchvision does not work
in this environment), get random but seeded weights and non-trivial BatchNorm statistics, and are exported with
the legacy TorchScript exporter (``dynamo=False``, opset 13, ``TrainingMode.PRESERVE`` on an ``eval()`` model, so
BatchNormalization nodes are kept), input ``1x3x224x224`` with a dynamic batch dimension.

``resnet50w2`` is ResNet-50 with every bottleneck's inner width doubled (as torchvision's ``wide_resnet50_2``,
~69 M parameters, ~275 MB); it is used to say how the tool's time grows with model size.

Importable: ``ensure_models(out_dir, names)`` builds only what is missing and returns ``{name: path}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

MODEL_NAMES = ("resnet18", "resnet50", "mobilenetv2", "resnet50w2")
SEED = 0


def _build(name: str):
    import torch
    import torch.nn as nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
            super().__init__()
            width = int(planes * (base_width / 64.0))
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, block, layers, num_classes=1000, base_width=64):
            super().__init__()
            self.inplanes = 64
            self.base_width = base_width
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample, self.base_width)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    def conv_bn_relu6(inp, oup, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(inp, oup, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, expand_ratio):
            super().__init__()
            hidden = int(round(inp * expand_ratio))
            self.use_res_connect = stride == 1 and inp == oup
            layers = []
            if expand_ratio != 1:
                layers.append(conv_bn_relu6(inp, hidden, k=1))
            layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                        [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
            inp, last = 32, 1280
            feats = [conv_bn_relu6(3, inp, stride=2)]
            for t, c, n, s in settings:
                for i in range(n):
                    feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            feats.append(conv_bn_relu6(inp, last, k=1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(torch.flatten(x, 1))

    if name == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2])
    if name == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3])
    if name == "resnet50w2":
        return ResNet(Bottleneck, [3, 4, 6, 3], base_width=128)
    if name == "mobilenetv2":
        return MobileNetV2()
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def _init(model) -> None:
    """Seeded He-style init and non-trivial BatchNorm statistics (so BN is not an identity)."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def export(name: str, path: Path) -> Path:
    import torch

    torch.manual_seed(SEED)
    model = _build(name)
    _init(model)
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=13,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, path)
    return path


def ensure_models(out_dir: str | os.PathLike, names=("resnet18", "mobilenetv2"), force: bool = False) -> dict:
    """Build the named models into ``out_dir`` unless already there; returns ``{name: Path}``."""
    out = Path(out_dir)
    paths = {}
    for name in names:
        p = out / f"{name}_224.onnx"
        if force or not p.exists():
            t = time.perf_counter()
            export(name, p)
            print(f"[make_fullsize] {name}: {p} ({p.stat().st_size / 1e6:.1f} MB, "
                  f"{time.perf_counter() - t:.1f} s)", file=sys.stderr)
        paths[name] = p
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "onnxprune_fullsize"),
                    help="output folder (default: $TMPDIR/onnxprune_fullsize)")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenetv2"], choices=MODEL_NAMES)
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    ap.add_argument("--check", action="store_true", help="check each model with onnx.checker and onnxruntime")
    args = ap.parse_args(argv)
    paths = ensure_models(args.out, args.models, args.force)
    for name, p in paths.items():
        line = f"{name}: {p} {p.stat().st_size / 1e6:.1f} MB"
        if args.check:
            import numpy as np
            import onnx
            import onnxruntime as ort

            m = onnx.load(str(p))
            onnx.checker.check_model(m, full_check=True)
            nbn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            y = sess.run(None, {"input": np.random.rand(2, 3, 224, 224).astype(np.float32)})[0]
            line += f", {len(m.graph.node)} nodes, {nbn} BatchNormalization, output {list(y.shape)}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
