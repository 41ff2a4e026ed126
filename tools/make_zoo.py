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
import hashlib
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


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_manifest import check_and_describe, write_manifest_and_readme  # noqa: E402
from zoo_models import (DYNAMO_OPSET, LEGACY_OPSET, MODELS, SEED, TORCH_MODELS, TRANSFORMER,  # noqa: E402
                        TRANSFORMER_OPSET, ResNet)


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
