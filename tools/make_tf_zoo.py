#!/usr/bin/env python
"""Generate ``models/keras_cnn.onnx``: a small Keras CNN converted with tf2onnx.

TensorFlow and tf2onnx pin protobuf/numpy/onnx versions that may clash with the
main environment, so run this script in its own virtualenv (never install
TensorFlow into the main environment)::

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install -r tools/requirements-tf.txt
    /tmp/tfvenv/bin/python tools/make_tf_zoo.py
    python tools/make_zoo.py --check-only     # (main env) check + refresh models/MANIFEST.json, README.md

Model: NHWC input ``input`` [batch, 32, 32, 3] ->
Conv2D(16, 3x3)+BN+ReLU -> Conv2D(16, 3x3)+BN -> residual Add -> ReLU ->
DepthwiseConv2D(3x3)+BN+ReLU -> Conv2D(32, 1x1)+BN+ReLU -> GlobalAveragePooling2D -> Dense(10).
tf2onnx (opset 13) inserts a Transpose from NHWC to NCHW in front of the convolutions and
folds the (inference-mode) BatchNormalization layers into the Conv weights, except the BN after the
depthwise conv, which stays as a per-channel Mul + Add after the depthwise Conv.
Weights and BN statistics are random but seeded (numpy RNG), so the file is reproducible.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
OPSET = 13
SEED = 0


def build_model():
    L = tf.keras.layers
    inp = tf.keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv2")(x)
    y = L.BatchNormalization(name="bn2")(y)
    x = L.Add(name="residual_add")([x, y])
    x = L.ReLU(name="relu2")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dwconv")(x)
    x = L.BatchNormalization(name="bn3")(x)
    x = L.ReLU(name="relu3")(x)
    x = L.Conv2D(32, 1, use_bias=False, name="pwconv")(x)
    x = L.BatchNormalization(name="bn4")(x)
    x = L.ReLU(name="relu4")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(10, name="logits")(x)
    return tf.keras.Model(inp, out, name="keras_cnn")


def randomize(model, rng):
    """Seeded He-normal kernels, random biases and non-trivial BN statistics."""
    for layer in model.layers:
        new = []
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            c = gamma.shape[0]
            new = [rng.uniform(0.1, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)]
        else:
            for w in layer.get_weights():
                if w.ndim >= 2:
                    fan_in = int(np.prod(w.shape[:-1])) if not isinstance(
                        layer, tf.keras.layers.DepthwiseConv2D) else int(np.prod(w.shape[:2]))
                    new.append(rng.normal(0, np.sqrt(2.0 / fan_in), w.shape))
                else:
                    new.append(rng.normal(0, 0.1, w.shape))
        if new:
            layer.set_weights([np.asarray(v, dtype=np.float32) for v in new])


def rename_batch_dim(model_proto: onnx.ModelProto, name: str = "batch") -> None:
    """tf2onnx names unknown dimensions 'unk__N'; call the batch dimension 'batch' like the torch models."""
    g = model_proto.graph
    old = {vi.type.tensor_type.shape.dim[0].dim_param for vi in list(g.input) + list(g.output)}
    old.discard("")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in old:
                d.dim_param = name


def canonicalize_names(model_proto: onnx.ModelProto) -> None:
    """tf2onnx numbers some generated tensors (e.g. 'const_fold_opt__48') non-deterministically from
    run to run; rename generated initializers by order of first use so the file is byte-reproducible."""
    g = model_proto.graph
    generated = {t.name for t in g.initializer if re.search(r"__\d+$", t.name)}
    mapping = {}
    for node in g.node:
        for i in node.input:
            if i in generated and i not in mapping:
                mapping[i] = re.sub(r"__\d+$", "", i) + "_" + str(len(mapping))
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in mapping:
                node.input[k] = mapping[i]


def main():
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = build_model()
    randomize(model, rng)
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
    model_proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    rename_batch_dim(model_proto)
    canonicalize_names(model_proto)
    model_proto.doc_string = (
        f"Keras {tf.keras.__version__} / TensorFlow {tf.__version__} -> tf2onnx {tf2onnx.__version__}; "
        "generated by tools/make_tf_zoo.py")
    onnx.checker.check_model(model_proto, full_check=True)

    # numerical check against Keras (onnxruntime is not needed in this venv: use onnx's reference runtime)
    from onnx.reference import ReferenceEvaluator

    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ref = model(x, training=False).numpy()
    got = ReferenceEvaluator(model_proto).run(None, {model_proto.graph.input[0].name: x})[0]
    err = float(np.max(np.abs(ref - got)))
    assert err < 1e-3, f"tf2onnx output differs from Keras: {err}"

    os.makedirs(MODELS, exist_ok=True)
    path = os.path.join(MODELS, "keras_cnn.onnx")
    onnx.save(model_proto, path)
    ops = sorted({n.op_type for n in model_proto.graph.node})
    print(f"wrote {path} ({os.path.getsize(path)} bytes), max |keras - onnx| = {err:.2e}")
    print("inputs:", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                      for i in model_proto.graph.input])
    print("outputs:", [o.name for o in model_proto.graph.output])
    print("ops:", [n.op_type for n in model_proto.graph.node], ops)


if __name__ == "__main__":
    main()
