"""Write models/nhwc_cnn.onnx: an NHWC graph as unoptimised TF exporters emit it (Transposes around every Conv,
activations, residual Add, per-channel Mul/Add and the classifier in NHWC), built with onnx.helper.

    python tools/make_nhwc.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "models" / "nhwc_cnn.onnx"


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_nhwc(x: str, cin: int, cout: int, name: str, group: int = 1) -> str:
        w = const(f"{name}/kernel", rng.standard_normal((cout, cin // group, 3, 3)) * (2 / (9 * cin)) ** 0.5)
        b = const(f"{name}/bias", rng.standard_normal(cout) * 0.1)
        nodes.append(helper.make_node("Transpose", [x], [f"{name}/nchw"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Conv", [f"{name}/nchw", w, b], [f"{name}/conv"], pads=[1, 1, 1, 1],
                                      group=group))
        nodes.append(helper.make_node("Transpose", [f"{name}/conv"], [f"{name}/out"], perm=[0, 2, 3, 1]))
        return f"{name}/out"

    x = conv_nhwc("input", 3, 16, "conv1")
    nodes.append(helper.make_node("Relu", [x], ["relu1"]))
    y = conv_nhwc("relu1", 16, 16, "conv2")
    nodes.append(helper.make_node("Mul", [y, const("bn2/scale", rng.uniform(0.5, 1.5, 16))], ["bn2/mul"]))
    nodes.append(helper.make_node("Add", ["bn2/mul", const("bn2/shift", rng.standard_normal(16) * 0.1)],
                                  ["bn2/add"]))
    nodes.append(helper.make_node("Add", ["relu1", "bn2/add"], ["residual"]))
    nodes.append(helper.make_node("Relu", ["residual"], ["relu2"]))
    z = conv_nhwc("relu2", 16, 16, "dwconv", group=16)
    nodes.append(helper.make_node("Relu", [z], ["relu3"]))
    w = conv_nhwc("relu3", 16, 24, "conv3")
    nodes.append(helper.make_node("Relu", [w], ["relu4"]))
    nodes.append(helper.make_node("ReduceMean", ["relu4"], ["gap"], axes=[1, 2], keepdims=0))
    nodes.append(helper.make_node("MatMul", ["gap", const("dense/kernel", rng.standard_normal((24, 10)) * 0.2)],
                                  ["dense"]))
    nodes.append(helper.make_node("Add", ["dense", const("dense/bias", rng.standard_normal(10) * 0.1)], ["logits"]))
    graph = helper.make_graph(nodes, "nhwc_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32, 32, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxprune-tools",
                              ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    onnx.save(build(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); run `python tools/make_zoo.py --check-only` to list it")
