"""The table of weighted-layer kinds (graph/layers.py): weight slots, axes, groups and MACs of each kind, checked
against shapes and counts worked out by hand (no onnxruntime), and the lsq matrix view built on it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rules_support import OPSET13, make

from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto
from onnxprune.graph.layers import (LSQ_OPS, NOT_FITTED, WEIGHTED_OPS, find_weights, is_weighted, kind_of,
                                    layer_of, node_macs)


def _index(text: str, shapes: dict[str, list[int]] | None = None) -> GraphIndex:
    return GraphIndex(from_proto(make(OPSET13 + text)), shapes)


def _node(index: GraphIndex, output: str) -> onnx.NodeProto:
    return index.producer[output].node


def _geometry(index: GraphIndex, output: str, weight: str) -> dict:
    """Everything the table says about the layer producing ``output`` and its weight ``weight``."""
    node = _node(index, output)
    kind = kind_of(node)
    found = {w.name: w for w in find_weights(index)}[weight]
    rank = len(found.shape)
    return {"slot": found.slot, "reduction": found.reduction_axis,
            "weight_out": kind.weight_output_axis(node, found.slot, rank),
            "feature": kind.feature_axis(node, index.rank(node.input[0])),
            "output": kind.output_axis(node, index.rank(node.output[0])),
            "groups": kind.groups(node), "macs": node_macs(index, node)}


def test_the_table_lists_the_four_weighted_ops_in_the_onnx_domain_only():
    assert set(WEIGHTED_OPS) == {"Conv", "ConvTranspose", "Gemm", "MatMul"} and LSQ_OPS == {"Conv", "Gemm", "MatMul"}
    for op in WEIGHTED_OPS:
        assert is_weighted(onnx.helper.make_node(op, ["x", "w"], ["y"]))
        assert is_weighted(onnx.helper.make_node(op, ["x", "w"], ["y"], domain="ai.onnx"))
        assert not is_weighted(onnx.helper.make_node(op, ["x", "w"], ["y"], domain="com.example"))
    assert not is_weighted(onnx.helper.make_node("Relu", ["x"], ["y"]))
    from onnxprune.graph import index as index_module  # the old home keeps working
    assert index_module.is_weighted is is_weighted and index_module.WEIGHTED_OPS == WEIGHTED_OPS


def test_grouped_strided_conv():
    index = _index("""
    g (float[1,4,8,8] x, float[6,2,3,3] w, float[6] b) => (float[1,6,4,4] y) {
        y = Conv <group=2, strides=[2,2], pads=[1,1,1,1]> (x, w, b)
    }""")
    # 6 outputs x 4 x 4 positions, each summing its group's 2 input channels x 3 x 3 taps
    assert _geometry(index, "y", "w") == {"slot": 1, "reduction": 1, "weight_out": 0, "feature": 1, "output": 1,
                                          "groups": 2, "macs": 6 * 4 * 4 * 2 * 3 * 3}
    # outputs 0..2 read input channels 0..1, outputs 3..5 read 2..3
    mapping = kind_of(_node(index, "y")).feature_index(_node(index, "y"), (6, 2, 3, 3))
    assert mapping.shape == (6, 2, 1, 1)
    assert mapping[:, :, 0, 0].tolist() == [[0, 1]] * 3 + [[2, 3]] * 3
    assert "b" not in {w.name for w in find_weights(index)}


def test_ungrouped_conv_reads_features_by_reduction_index():
    index = _index("""
    g (float[1,3,5,5] x, float[4,3,3,3] w) => (float[1,4,3,3] y) { y = Conv(x, w) }""")
    assert kind_of(_node(index, "y")).feature_index(_node(index, "y"), (4, 3, 3, 3)) is None
    assert node_macs(index, _node(index, "y")) == 4 * 3 * 3 * 3 * 3 * 3


def test_grouped_strided_conv_transpose():
    index = _index("""
    g (float[1,4,5,5] x, float[4,3,3,3] w) => (float[1,6,11,11] y) {
        y = ConvTranspose <group=2, strides=[2,2]> (x, w)
    }""")
    # every input value (4 x 5 x 5) meets its group's 3 output channels x 3 x 3 taps
    assert _geometry(index, "y", "w") == {"slot": 1, "reduction": 0, "weight_out": 1, "feature": 1, "output": 1,
                                          "groups": 2, "macs": 4 * 5 * 5 * 3 * 3 * 3}
    assert kind_of(_node(index, "y")).feature_index(_node(index, "y"), (4, 3, 3, 3)) is None


@pytest.mark.parametrize("attrs, a_shape, b_shape, reduction, weight_out, feature", [
    ("transB=1", "3,5", "4,5", 1, 0, 1),
    ("transB=0", "3,5", "5,4", 0, 1, 1),
    ("transA=1, transB=1", "5,3", "4,5", 1, 0, 0),
])
def test_gemm(attrs, a_shape, b_shape, reduction, weight_out, feature):
    index = _index(f"""
    g (float[{a_shape}] x, float[{b_shape}] w, float[4] c) => (float[3,4] y) {{
        y = Gemm <{attrs}> (x, w, c)
    }}""")
    # 3 x 4 outputs, each a sum of K = 5 products, whichever way A and B are stored
    assert _geometry(index, "y", "w") == {"slot": 1, "reduction": reduction, "weight_out": weight_out,
                                          "feature": feature, "output": 1, "groups": 1, "macs": 3 * 4 * 5}


def test_batched_matmul_with_the_weight_on_either_side():
    index = _index("""
    g (float[2,3,5,6] x, float[6,7] w, float[4,6] v, float[2,6,3] x2) => (float[2,3,5,7] y, float[2,4,3] z) {
        y = MatMul(x, w)
        z = MatMul(v, x2)
    }""")
    assert _geometry(index, "y", "w") == {"slot": 1, "reduction": 0, "weight_out": 1, "feature": 3, "output": 3,
                                          "groups": 1, "macs": 2 * 3 * 5 * 7 * 6}
    z = _geometry(index, "z", "v")  # the constant is A [M, K]: K is its last axis, M indexes outputs
    assert (z["slot"], z["reduction"], z["weight_out"], z["macs"]) == (0, 1, 0, 2 * 4 * 3 * 6)


def test_matmul_with_batched_and_vector_weights():
    index = _index("""
    g (float[2,5,6] x, float[2,6,7] w, float[3,6] x2, float[6] v) => (float[2,5,7] y, float[3] z) {
        y = MatMul(x, w)
        z = MatMul(x2, v)
    }""")
    y = _geometry(index, "y", "w")
    assert (y["reduction"], y["weight_out"], y["macs"]) == (1, 2, 2 * 5 * 7 * 6)
    node = _node(index, "z")
    v = {w.name: w for w in find_weights(index)}["v"]
    assert v.reduction_axis == 0 and kind_of(node).weight_output_axis(node, 1, 1) is None
    assert node_macs(index, node) == 3 * 6


def test_macs_are_unknown_without_static_shapes_until_given():
    text = """
    g (float[N,3,5,5] x, float[4,3,3,3] w) => (float[N,4,3,3] y) { y = Conv(x, w) }"""
    assert node_macs(_index(text), _node(_index(text), "y")) is None
    index = _index(text, {"x": [2, 3, 5, 5]})
    assert node_macs(index, _node(index, "y")) == 2 * 4 * 3 * 3 * 3 * 3 * 3


def test_layer_views_see_each_weight_as_k_by_o():
    index = _index("""
    g (float[1,4,6,6] x, float[6,2,3,3] wc, float[1,24] xg, float[5,24] wg, float[1,5] xm, float[5,3] wm)
        => (float[1,6,4,4] c, float[1,5] gy, float[1,3] m) {
        c = Conv <group=2> (x, wc)
        gy = Gemm <transB=1> (xg, wg)
        m = MatMul(xm, wm)
    }""")
    conv, gemm, matmul = (layer_of(index, _node(index, name)) for name in ("c", "gy", "m"))
    wc, wg, wm = (index.const_value(n) for n in ("wc", "wg", "wm"))
    assert (conv.out_axis, conv.kernel, conv.groups, conv.can_add_bias) == (1, (3, 3), 2, True)
    dense = conv.to_matrix(wc)  # [C x 3 x 3, O], block diagonal: outputs 0..2 read channels 0..1
    assert dense.shape == (36, 6) and not dense[18:, :3].any() and not dense[:18, 3:].any()
    assert np.array_equal(dense[:18, :3], wc[:3].reshape(3, -1).T)
    assert np.array_equal(gemm.to_matrix(wg), wg.T) and np.array_equal(matmul.to_matrix(wm), wm)
    for layer, w in ((conv, wc), (gemm, wg), (matmul, wm)):
        assert np.array_equal(layer.from_matrix(layer.to_matrix(w), w.shape), w)
    assert conv.pattern_order(wc.shape, (2, 4)).tolist()[:4] == [0, 9, 1, 10]  # channel-major: (c0, t0), (c1, t0)
    assert gemm.pattern_order(wg.shape, (2, 4)) is None and matmul.kernel is None


def test_layer_of_says_why_there_is_no_view():
    index = _index("""
    g (float[1,4,5,5] x, float[4,3,3,3] wt, float[2,6] xa, float[6,6] w, float[6,6] x2) => (float[1,3,7,7] t,
        float[2,6] y, float[2,6] z, float[2,6] q) {
        t = ConvTranspose(x, wt)
        y = MatMul(xa, w)
        z = MatMul(y, w)
        q = MatMul(xa, x2)
    }""")
    assert layer_of(index, _node(index, "t")) == NOT_FITTED
    assert layer_of(index, _node(index, "y")) == "weight shared with other nodes"
    assert layer_of(index, _node(index, "q")) == NOT_FITTED
    assert layer_of(index, onnx.helper.make_node("Relu", ["x"], ["r"])) == NOT_FITTED
