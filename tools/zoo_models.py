"""The PyTorch architectures of the test-model zoo (small widths, seeded) and where their files go."""

from __future__ import annotations

import math
import os

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
