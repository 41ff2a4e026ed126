#!/usr/bin/env python
"""Generate the committed ONNX test-model zoo in ``models/``.

Usage (from the repository root)::

    python tools/make_zoo.py                 # export every PyTorch model, then check + write MANIFEST/README
    python tools/make_zoo.py --check-only    # re-check the files already in models/ and rewrite MANIFEST/README

The Keras/tf2onnx model (``models/keras_cnn.onnx``) is produced by
``tools/make_tf_zoo.py`` in a separate virtualenv (see that file).  Full
regeneration::

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install -r tools/requirements-tf.txt
    /tmp/tfvenv/bin/python tools/make_tf_zoo.py
    python tools/make_zoo.py

Requirements (main environment): torch (CPU), onnx, onnxruntime, numpy and,
for the ``dynamo=True`` export, onnxscript.

What is produced (all tiny, random but seeded weights, not trained):

* ``<name>_bn.onnx``     legacy TorchScript exporter, opset 13, BatchNormalization kept
                          (``training=TrainingMode.PRESERVE`` on an eval() model, constant folding on)
* ``<name>_folded.onnx`` legacy exporter, opset 13, ``TrainingMode.EVAL`` (BN folded into Conv)
* ``transformer.onnx``   legacy exporter, opset 17 (for the LayerNormalization op), no BN
* ``resnet_dynamo.onnx`` + ``resnet_dynamo.onnx.data``: ``dynamo=True`` exporter, opset 18, external data
* ``resnet_constants.onnx``: resnet_bn with every initializer turned into a ``Constant`` node

Every BatchNorm layer gets random (non-identity) running_mean/var/weight/bias
before export.  Every file is checked with ``onnx.checker.check_model(full_check=True)``
and run in onnxruntime (CPU) on a random input, with batch sizes 1 and 2.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import random
import sys
import warnings

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SEED = 0
LEGACY_OPSET = 13
TRANSFORMER_OPSET = 17  # LayerNormalization is an ONNX op only from opset 17
DYNAMO_OPSET = 18


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def conv_bn(cin, cout, k=3, s=1, groups=1, act="relu"):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif act == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    elif act == "hswish":
        layers.append(nn.Hardswish())
    elif act == "silu":
        layers.append(nn.SiLU())
    elif act is None:
        pass
    else:
        raise ValueError(act)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class ResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act="relu6"))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
            conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act="relu6"),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),
            conv_bn(32, 64, 1, act="relu6"),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class VGG(nn.Module):
    CFG = [16, 16, "M", 32, 32, "M", 64, "M"]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(conv_bn(c, v))
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DenseLayer(nn.Module):
    """conv-BN-ReLU ordering (post-activation) so that every BN follows a Conv."""

    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, 2 * growth, 1), conv_bn(2 * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes=10, growth=8):
        super().__init__()
        c = 16
        layers = [conv_bn(3, c)]
        for block in range(2):
            for _ in range(3):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block == 0:  # transition: 1x1 conv (compression) + AvgPool
                layers += [conv_bn(c, c // 2, 1), nn.AvgPool2d(2, 2)]
                c //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    def __init__(self, out_ch=2):
        super().__init__()
        self.enc1 = DoubleConv(3, 8)
        self.enc2 = DoubleConv(8, 16)
        self.bottleneck = DoubleConv(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec2 = DoubleConv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, 2)
        self.dec1 = DoubleConv(16, 8)
        self.head = nn.Conv2d(8, out_ch, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class SqueezeExcite(nn.Module):
    def __init__(self, c, reduction=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // reduction, 1)
        self.fc2 = nn.Conv2d(c // reduction, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class MBV3Block(nn.Module):
    def __init__(self, cin, hidden, cout, k, se, act, stride):
        super().__init__()
        layers = []
        if hidden != cin:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act="hswish"),
            MBV3Block(16, 16, 16, 3, True, "relu", 1),
            MBV3Block(16, 48, 24, 3, False, "relu", 2),
            MBV3Block(24, 72, 24, 3, True, "hswish", 1),
            MBV3Block(24, 96, 32, 5, True, "hswish", 2),
            conv_bn(32, 96, 1, act="hswish"),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class ResNeXtBottleneck(nn.Module):
    def __init__(self, cin, width, cout, stride, groups=4):
        super().__init__()
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x):
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + sc)


class ResNeXt(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layers = nn.Sequential(
            ResNeXtBottleneck(16, 16, 32, 1),
            ResNeXtBottleneck(32, 16, 32, 1),
            ResNeXtBottleneck(32, 32, 64, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class ConvFlatten(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8), nn.MaxPool2d(2),  # 16x16
            conv_bn(8, 16), nn.MaxPool2d(2),  # 8x8
            conv_bn(16, 16, 3, 2),  # 16 x 4 x 4
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.flatten(self.features(x)))))


class CSPBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = conv_bn(c, c, 1, act="silu")
        self.cv2 = conv_bn(c, c, 3, act="silu")

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class CSPBlock(nn.Module):
    """conv -> split channels in two halves -> one half through bottlenecks -> concat -> conv."""

    def __init__(self, c, n=1):
        super().__init__()
        self.cv_in = conv_bn(c, c, 1, act="silu")
        self.m = nn.Sequential(*[CSPBottleneck(c // 2) for _ in range(n)])
        self.cv_out = conv_bn(c, c, 1, act="silu")
        self.half = c // 2

    def forward(self, x):
        # explicit sizes -> a single ONNX Split (torch.chunk exports as Shape/Gather/Slice)
        a, b = torch.split(self.cv_in(x), [self.half, self.half], dim=1)
        return self.cv_out(torch.cat([a, self.m(b)], 1))


class CSPNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, act="silu"),
            conv_bn(16, 32, 3, 2, act="silu"),
            CSPBlock(32, 1),
            conv_bn(32, 64, 3, 2, act="silu"),
            CSPBlock(64, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        out = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, tokens=16, dim=32, heads=4, layers=2, mlp=64, num_classes=10):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.layers(self.embed(x) + self.pos)
        return self.head(self.ln(x).mean(dim=1))


# name -> (constructor, input shape without batch, features, description)
TORCH_MODELS = {
    "resnet": (ResNet, (3, 32, 32), ["residual_add", "global_pool", "linear_head"],
               "ResNet-style: BasicBlocks with residual Add, stride-2 block with 1x1 conv shortcut, GAP, Linear"),
    "mobilenetv2": (MobileNetV2, (3, 32, 32), ["residual_add", "depthwise", "clip_relu6", "global_pool", "linear_head"],
                    "MobileNetV2: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project), ReLU6 (Clip)"),
    "vgg": (VGG, (3, 32, 32), ["maxpool", "flatten_linear"],
            "VGG-style conv-BN-ReLU stack with MaxPool, Flatten(64x4x4) -> Linear classifier"),
    "densenet": (DenseNet, (3, 32, 32), ["concat", "avgpool", "global_pool", "linear_head"],
                 "DenseNet-style: dense blocks (channel Concat, growth 8), transition 1x1 conv + AvgPool"),
    "unet": (UNet, (3, 32, 32), ["concat", "conv_transpose", "maxpool", "per_pixel_output"],
             "U-Net: 2-level encoder/decoder, ConvTranspose upsampling, Concat skips, 1x1 conv head"),
    "mobilenetv3": (MobileNetV3, (3, 32, 32),
                    ["residual_add", "depthwise", "se_gate", "hardswish", "global_pool", "linear_head"],
                    "MobileNetV3-style: Hardswish, SE (GAP->1x1->ReLU->1x1->HardSigmoid->Mul), depthwise 3x3/5x5"),
    "resnext": (ResNeXt, (3, 32, 32), ["residual_add", "grouped", "global_pool", "linear_head"],
                "ResNeXt-style bottlenecks with grouped 3x3 conv (groups=4) and residual Add"),
    "convflatten": (ConvFlatten, (3, 32, 32), ["flatten_linear", "maxpool"],
                    "conv stack then Flatten of a 16x4x4 map into Linear layers (no global pooling)"),
    "csp": (CSPNet, (3, 32, 32), ["split", "concat", "residual_add", "silu", "global_pool", "linear_head"],
            "CSP-style: 1x1 conv, channel Split in two halves, one half through bottlenecks, Concat, 1x1 conv; SiLU"),
}
TRANSFORMER = ("transformer", Transformer, (16, 32), ["matmul", "layernorm", "attention", "gelu", "residual_add"],
               "Transformer encoder: 2 layers, 4 heads, dim 32, hand-written attention (MatMul/Reshape/Transpose/Softmax), "
               "LayerNormalization, GELU (Erf)")

# Files produced by other scripts (checked and listed here if present).
EXTERNAL_MODELS = {
    "keras_cnn.onnx": {
        "source": "Keras 3.15.1 / tensorflow-cpu 2.21.0 -> tf2onnx 1.17.0 (tools/make_tf_zoo.py)",
        "features": ["nhwc_transpose", "residual_add", "depthwise", "global_pool", "linear_head", "bn_as_mul_add"],
        "description": "Keras CNN (Conv2D+BN+ReLU, residual Add, DepthwiseConv2D, GAP, Dense), NHWC input "
                       "Transposed to NCHW; tf2onnx folds BN into Conv except after the depthwise conv, where BN "
                       "remains as a per-channel Mul + Add; Dense is MatMul + Add",
    },
    "nhwc_cnn.onnx": {
        "source": "onnx.helper, unoptimised-TF-exporter style (tools/make_nhwc.py)",
        "features": ["nhwc_transpose", "residual_add", "depthwise", "bn_as_mul_add", "matmul"],
        "description": "NHWC CNN: Transposes around every Conv, residual Add and per-channel Mul/Add in NHWC, "
                       "depthwise Conv, ReduceMean over H,W, MatMul head",
    },
}


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def randomize_bn(model, gen, input_shape):
    """Give every BN (and LayerNorm) layer non-trivial parameters so that BN is not an identity.

    BN running statistics are first calibrated on seeded random inputs (so activations keep a useful
    scale through the depth of the network and the output depends clearly on the input), then perturbed;
    gamma/beta are random.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(16, *input_shape, generator=gen))
        for m in bns:
            m.momentum = 0.1
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) * 1.4 + 0.1)  # gamma in [0.1, 1.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                std = m.running_var.sqrt()
                m.running_mean.add_(torch.randn(c, generator=gen) * 0.1 * std)
                m.running_var.mul_(torch.rand(c, generator=gen) * 0.5 + 0.75)  # x [0.75, 1.25)
        elif isinstance(m, nn.LayerNorm):
            # default ones/zeros would be de-duplicated by the exporter into Identity nodes
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def build(name, ctor, input_shape):
    seed = SEED + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
    seed_everything(seed)
    model = ctor()
    for m in model.modules():  # He init keeps activations from shrinking with depth
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen, input_shape)
    return model.eval()


def legacy_export(model, x, path, opset, training):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path, dynamo=False, opset_version=opset, training=training,
            do_constant_folding=True, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def export_torch_models():
    os.makedirs(MODELS, exist_ok=True)
    for name, (ctor, shape, _, _) in TORCH_MODELS.items():
        model = build(name, ctor, shape)
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
        legacy_export(model, x, os.path.join(MODELS, f"{name}_bn.onnx"), LEGACY_OPSET, torch.onnx.TrainingMode.PRESERVE)
        legacy_export(model, x, os.path.join(MODELS, f"{name}_folded.onnx"), LEGACY_OPSET, torch.onnx.TrainingMode.EVAL)
        print(f"exported {name}_bn.onnx / {name}_folded.onnx")

    tname, tctor, tshape, _, _ = TRANSFORMER
    model = build(tname, tctor, tshape)
    x = torch.randn(1, *tshape, generator=torch.Generator().manual_seed(1))
    legacy_export(model, x, os.path.join(MODELS, "transformer.onnx"), TRANSFORMER_OPSET, torch.onnx.TrainingMode.EVAL)
    print("exported transformer.onnx")

    export_dynamo_resnet()
    make_constants_model()


def export_dynamo_resnet():
    path = os.path.join(MODELS, "resnet_dynamo.onnx")
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
    try:
        model = build("resnet", ResNet, TORCH_MODELS["resnet"][1])
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=DYNAMO_OPSET, input_names=["input"], output_names=["output"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=True, verbose=False,
            )
            prog.save(path, external_data=True)
        # make the data file name relative + deterministic (onnx uses the location field)
        print("exported resnet_dynamo.onnx (+ .onnx.data)")
    except Exception as e:  # pragma: no cover - reported, not fatal
        print(f"WARNING: dynamo export failed: {type(e).__name__}: {e}", file=sys.stderr)


def make_constants_model():
    """resnet_bn.onnx with every initializer replaced by a Constant node (Paddle/Caffe2 style)."""
    m = onnx.load(os.path.join(MODELS, "resnet_bn.onnx"))
    g = m.graph
    const_nodes = [
        onnx.helper.make_node("Constant", [], [init.name], name=f"Constant_{i}", value=init)
        for i, init in enumerate(g.initializer)
    ]
    del g.initializer[:]
    nodes = const_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, os.path.join(MODELS, "resnet_constants.onnx"))
    print("wrote resnet_constants.onnx")


# --------------------------------------------------------------------------------------
# check + manifest
# --------------------------------------------------------------------------------------
def dims(vi):
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def count_params(m):
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    n += int(np.prod(a.t.dims))
    return n


def detected_features(m):
    """Structural features found in the graph (used to cross-check the declared ones)."""
    g = m.graph
    const_names = {t.name for t in g.initializer}
    const_names |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    ops = collections.Counter(n.op_type for n in g.node)
    feats = set()
    for n in g.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if group > 1:
                # depthwise if group == in channels == out channels/multiplier; weight shape [O, I/g, kh, kw]
                w = next((t for t in g.initializer if t.name == n.input[1]), None)
                if w is None:
                    w = next((a.t for c in g.node if c.op_type == "Constant" and c.output[0] == n.input[1]
                              for a in c.attribute if a.name == "value"), None)
                if w is not None and w.dims[1] == 1:
                    feats.add("depthwise")
                else:
                    feats.add("grouped")
        if n.op_type == "Add" and len(n.input) == 2 and not any(i in const_names for i in n.input):
            feats.add("residual_add")
    # channel Concat of float feature maps (not the int64 shape Concats of Reshape targets)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    if any(n.op_type == "Concat" and types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in g.node):
        feats.add("concat")
    if ops["Split"]:
        feats.add("split")
    if ops["ConvTranspose"]:
        feats.add("conv_transpose")
    if ops["Transpose"] and ops["Conv"]:
        feats.add("nhwc_transpose")
    if ops["Constant"] and not g.initializer:
        feats.add("constant_nodes")
    return feats


def check_model(fname, rng):
    import onnxruntime as ort

    path = os.path.join(MODELS, fname)
    m = onnx.load(path)  # loads external data too
    onnx.checker.check_model(path, full_check=True)  # path form supports external data
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs_shapes = {}
    for batch in (1, 2):
        feeds = {}
        for i in sess.get_inputs():
            shp = [batch if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(shp).astype(np.float32)
        outs = sess.run(None, feeds)
        for o in outs:
            assert np.all(np.isfinite(o)), f"{fname}: non-finite output"
            assert o.shape[0] == batch, f"{fname}: batch dim not dynamic ({o.shape})"
        outs_shapes[batch] = [list(o.shape) for o in outs]
    return m, outs_shapes


def model_entry(fname, m, source, features, bn_kept, description):
    g = m.graph
    init_names = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    raw = onnx.load(os.path.join(MODELS, fname), load_external_data=False)
    ext = sorted({e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"})
    feats = set(features) | detected_features(m)
    if ext:
        feats.add("external_data")
    return {
        "file": fname,
        "source": source,
        "description": description,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset": opset,
        "ir_version": m.ir_version,
        "inputs": [{"name": i.name, "shape": dims(i)} for i in g.input if i.name not in init_names],
        "outputs": [{"name": o.name, "shape": dims(o)} for o in g.output],
        "bn_kept": bn_kept,
        "num_batchnorm": ops.get("BatchNormalization", 0),
        "features": sorted(feats),
        "op_types": dict(sorted(ops.items())),
        "num_nodes": len(g.node),
        "parameters": count_params(m),
        "external_data_files": ext,
        "file_size_bytes": os.path.getsize(os.path.join(MODELS, fname)),
        "external_data_size_bytes": sum(os.path.getsize(os.path.join(MODELS, e)) for e in ext),
    }


def check_and_describe():
    rng = np.random.default_rng(SEED)
    tv = torch.__version__
    entries = []

    def add(fname, source, features, bn_kept, description):
        if not os.path.exists(os.path.join(MODELS, fname)):
            print(f"MISSING {fname}", file=sys.stderr)
            return
        m, outs = check_model(fname, rng)
        e = model_entry(fname, m, source, features, bn_kept, description)
        missing = [f for f in features if f in _STRUCTURAL and f not in detected_features(m)]
        assert not missing, f"{fname}: declared features {missing} not found in graph"
        if bn_kept:
            assert e["num_batchnorm"] > 0, f"{fname}: expected BatchNormalization nodes"
        else:
            assert e["num_batchnorm"] == 0, f"{fname}: expected no BatchNormalization nodes"
        assert "Identity" not in e["op_types"], f"{fname}: unexpected Identity nodes"
        entries.append(e)
        print(f"OK {fname:28s} opset={e['opset']:2d} in={e['inputs'][0]['shape']} out(b=2)={outs[2]} "
              f"params={e['parameters']} size={e['file_size_bytes']}")
        print("    ops:", ", ".join(f"{k}x{v}" for k, v in e["op_types"].items()))

    for name, (_, _, feats, desc) in TORCH_MODELS.items():
        add(f"{name}_bn.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False, training=PRESERVE)", feats, True, desc)
        add(f"{name}_folded.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False, training=EVAL)", feats, False,
            desc + " (BN folded into Conv)")
    tname, _, _, tfeats, tdesc = TRANSFORMER
    add("transformer.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False)", tfeats, False, tdesc)
    try:
        import onnxscript

        osv = f", onnxscript {onnxscript.__version__}"
    except ImportError:
        osv = ", onnxscript"
    add("resnet_dynamo.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=True){osv}",
        TORCH_MODELS["resnet"][2] + ["external_data"], False,
        TORCH_MODELS["resnet"][3] + "; torch.export-based exporter (its default optimizer folds BN into Conv, "
        "GAP becomes ReduceMean, flatten becomes Reshape); weights in resnet_dynamo.onnx.data")
    add("resnet_constants.onnx", "resnet_bn.onnx post-processed with onnx.helper (tools/make_zoo.py)",
        TORCH_MODELS["resnet"][2] + ["constant_nodes"], True,
        "resnet_bn with every initializer converted into a Constant node (Paddle/Caffe2 style)")
    for fname, info in EXTERNAL_MODELS.items():
        if os.path.exists(os.path.join(MODELS, fname)):
            add(fname, info["source"], info["features"], False, info["description"])
    check_equivalence(rng)
    return entries


def check_equivalence(rng):
    """The _bn / _folded / dynamo / constants variants of a model must compute the same function."""
    import onnxruntime as ort

    pairs = [(f"{n}_bn.onnx", f"{n}_folded.onnx") for n in TORCH_MODELS]
    pairs += [("resnet_bn.onnx", "resnet_dynamo.onnx"), ("resnet_bn.onnx", "resnet_constants.onnx")]
    for a, b in pairs:
        pa, pb = os.path.join(MODELS, a), os.path.join(MODELS, b)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            continue
        sa = ort.InferenceSession(pa, providers=["CPUExecutionProvider"])
        sb = ort.InferenceSession(pb, providers=["CPUExecutionProvider"])
        i = sa.get_inputs()[0]
        x = rng.standard_normal([3] + list(i.shape[1:])).astype(np.float32)
        ya = sa.run(None, {i.name: x})[0]
        yb = sb.run(None, {sb.get_inputs()[0].name: x})[0]
        err = float(np.max(np.abs(ya - yb)))
        assert err < 1e-3 * max(1.0, float(np.max(np.abs(ya)))), f"{a} vs {b}: max abs diff {err}"
        print(f"equivalent: {a} == {b} (max abs diff {err:.2e})")


_STRUCTURAL = {"residual_add", "concat", "split", "depthwise", "grouped", "conv_transpose", "nhwc_transpose",
               "constant_nodes"}


def human(n):
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def write_manifest_and_readme(entries):
    manifest = {
        "generated_by": "tools/make_zoo.py (+ tools/make_tf_zoo.py for keras_cnn.onnx)",
        "note": "Random seeded weights, not trained. Dynamic dimensions are strings (e.g. \"batch\").",
        "models": {e["file"]: e for e in entries},
    }
    with open(os.path.join(MODELS, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")

    total = sum(e["file_size_bytes"] + e["external_data_size_bytes"] for e in entries)
    lines = [
        "# onnxprune test-model zoo",
        "",
        "Small, randomly initialised (seeded, **untrained**) models exported from different frameworks/exporters,",
        "used as fixtures for onnxprune's tests. Every file passes `onnx.checker.check_model(full_check=True)` and",
        "runs in onnxruntime (CPU) with batch 1 and 2. A machine-readable description of every file (input/output",
        "names and shapes with the dynamic dimension as the string `\"batch\"`, opset, whether BatchNormalization is",
        "kept, feature tags, op counts, parameter count) is in [`MANIFEST.json`](MANIFEST.json).",
        "",
        "Conventions:",
        "",
        "* `<name>_bn.onnx`: BatchNormalization nodes kept (legacy exporter, `training=TrainingMode.PRESERVE` on an",
        "  `eval()` model, constant folding on). BN layers have random non-identity running_mean/var/weight/bias.",
        "* `<name>_folded.onnx`: the same weights exported with `training=TrainingMode.EVAL`, so BN is folded into Conv.",
        "  The two variants compute the same function (up to float rounding).",
        "* `transformer.onnx` has no BN and is exported once, at opset 17 (the first opset with `LayerNormalization`).",
        "* `resnet_dynamo.onnx` is the resnet model exported by the torch.export-based exporter (`dynamo=True`, opset 18);",
        "  its weights are in the external data file `resnet_dynamo.onnx.data` (keep the two files together).",
        "* `resnet_constants.onnx` is `resnet_bn.onnx` with every initializer turned into a `Constant` node",
        "  (as Paddle/Caffe2 exporters do): the graph has no initializers.",
        "* `keras_cnn.onnx` comes from Keras via tf2onnx (opset 13): NHWC input `[batch, 32, 32, 3]` with a Transpose",
        "  to NCHW; tf2onnx folds BN into the Conv weights except after the depthwise conv, where BN stays as a",
        "  per-channel `Mul` + `Add`; Dense is `MatMul` + `Add`; output is named `logits`.",
        "* Export details worth knowing: at opset 13 `Hardswish` is exported as `HardSigmoid` + `Mul`, `SiLU` as",
        "  `Sigmoid` + `Mul`, and `ReLU6` as `Clip` whose min/max are `Constant` nodes; the transformer's reshapes take",
        "  the batch size from `Shape` -> `Gather` -> `Unsqueeze` -> `Concat`; `densenet` uses conv-BN-ReLU ordering",
        "  so every BN follows a Conv; the `csp` split uses `torch.split` with explicit sizes (one `Split` node).",
        "* Weights are random: He-normal convs, BN running stats calibrated on seeded random inputs then perturbed,",
        "  random gamma in [0.1, 1.5) and beta (so BN is never an identity), random LayerNorm affine parameters.",
        "* Input names are `input` (torch models); the batch dimension is the symbolic `batch`.",
        "",
        "Feature tags: " + ", ".join(f"`{t}`" for t in sorted({f for e in entries for f in e["features"]})) + ".",
        "",
        "| file | source (exporter + version) | opset | input shape | output shape | op types (count) | parameters | file size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        shp = "; ".join(f"`{i['name']}` [{', '.join(map(str, i['shape']))}]" for i in e["inputs"])
        oshp = "; ".join(f"[{', '.join(map(str, o['shape']))}]" for o in e["outputs"])
        ops = ", ".join(f"{k} {v}" for k, v in e["op_types"].items())
        size = human(e["file_size_bytes"])
        if e["external_data_size_bytes"]:
            size += f" + {human(e['external_data_size_bytes'])} (.data)"
        lines.append(f"| `{e['file']}` | {e['source']} | {e['opset']} | {shp} | {oshp} | {ops} | "
                     f"{e['parameters']:,} | {size} |")
    lines += [
        "",
        f"Total size: {human(total)}.",
        "",
        "## Features per model",
        "",
        "| file | BN kept (count) | features | description |",
        "| --- | --- | --- | --- |",
    ]
    for e in entries:
        lines.append(f"| `{e['file']}` | {'yes' if e['bn_kept'] else 'no'} ({e['num_batchnorm']}) | "
                     f"{', '.join(e['features'])} | {e['description']} |")
    lines += [
        "",
        "## Regenerating",
        "",
        "From the repository root (main environment: torch CPU, onnx, onnxruntime, numpy, onnxscript):",
        "",
        "```sh",
        "# 1. Keras model (separate virtualenv, never the main environment):",
        "python -m venv /tmp/tfvenv",
        "/tmp/tfvenv/bin/pip install -r tools/requirements-tf.txt",
        "/tmp/tfvenv/bin/python tools/make_tf_zoo.py",
        "# 2. PyTorch models + checks + MANIFEST.json + this README:",
        "python tools/make_zoo.py",
        "# only re-check existing files and rewrite MANIFEST.json / README.md:",
        "python tools/make_zoo.py --check-only",
        "```",
        "",
        "Seeds are fixed, so the weights are reproducible for a given torch version.",
        "",
    ]
    with open(os.path.join(MODELS, "README.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote MANIFEST.json and README.md ({len(entries)} models, total {human(total)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-only", action="store_true", help="do not export; check existing files and rewrite docs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.check_only:
        export_torch_models()
    entries = check_and_describe()
    write_manifest_and_readme(entries)


if __name__ == "__main__":
    main()
