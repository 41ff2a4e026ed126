"""Channel rules of weighted layers, normalisations and elementwise ops: groups, reasons, oracle."""

from __future__ import annotations

import onnx
import pytest

from onnxprune.channels import Dim
from rules_support import (OPSET13, OPSET17, OPSET21, assert_blocked, assert_prunable, group_of,
                           groups_of, init, make, node_attr, oracle)


# -- Conv and ConvTranspose -------------------------------------------------------------------------------------------

def test_conv_with_bias():
    proto = make(OPSET13 + """
    g (float[N,3,8,8] x, float[6,3,3,3] w1, float[6] b1, float[4,6,1,1] w2, float[4] b2) => (float[N,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r = Relu(c)
        y = Conv(r, w2, b2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 6)
    assert {Dim("w1", 0), Dim("b1", 0), Dim("r", 1), Dim("w2", 1)} <= set(group.dims)
    assert_blocked(gs, "y", "graph output 'y'")
    _, pruned, _ = oracle(proto, {"c": [1, 4]})
    assert init(pruned, "w1").shape == (4, 3, 3, 3) and init(pruned, "b1").shape == (4,)
    assert init(pruned, "w2").shape == (4, 4, 1, 1)


def test_conv_1d_and_3d():
    proto = make(OPSET13 + """
    g (float[N,3,10] x, float[6,3,3] w1, float[6] b1, float[4,6,1] w2) => (float[N,4,8] y) {
        c = Conv(x, w1, b1)
        r = Relu(c)
        y = Conv(r, w2)
    }""")
    oracle(proto, {"c": [0, 5]})
    proto = make(OPSET13 + """
    g (float[N,2,4,4,4] x, float[5,2,3,3,3] w1, float[5] b1, float[3,5,1,1,1] w2) => (float[N,3,2,2,2] y) {
        c = Conv(x, w1, b1)
        r = Relu(c)
        y = Conv(r, w2)
    }""")
    oracle(proto, {"c": [2]})


def test_conv_transpose():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6,5,2,2] wt, float[5] bt, float[4,5,1,1] w3)
      => (float[N,4,12,12] y) {
        c = Conv <pads=[1,1,1,1]> (x, w1)
        t = ConvTranspose <strides=[2,2]> (c, wt, bt)
        r = Relu(t)
        y = Conv(r, w3)
    }""")
    _, gs = groups_of(proto)
    assert Dim("wt", 0) in assert_prunable(gs, "c", 6).dims
    assert {Dim("wt", 1), Dim("bt", 0), Dim("w3", 1)} <= set(assert_prunable(gs, "t", 5).dims)
    _, pruned, _ = oracle(proto, {"c": [0, 3], "t": [1, 2, 4]})
    assert init(pruned, "wt").shape == (4, 2, 2, 2)


def test_grouped_conv_removes_channel_j_of_every_group():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[8,3,1,1] w1, float[8,4,3,3] wg, float[8] bg, float[4,8,1,1] w3)
      => (float[N,4,6,6] y) {
        a = Conv(x, w1)
        gc = Conv <group=2, pads=[1,1,1,1]> (a, wg, bg)
        r = Relu(gc)
        [last] y = Conv(r, w3)
    }""")
    _, gs = groups_of(proto)
    ga = assert_prunable(gs, "a", 4)
    assert [sorted(ch[Dim("a", 1)].tolist()) for ch in ga.channels] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    gg = assert_prunable(gs, "gc", 4)
    assert [sorted(ch[Dim("gc", 1)].tolist()) for ch in gg.channels] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    _, pruned, _ = oracle(proto, {"a": [1], "gc": [0, 3]})
    conv = next(n for n in pruned.graph.node if n.input[1] == "wg")
    assert onnx.helper.get_attribute_value(conv.attribute[0] if conv.attribute[0].name == "group"
                                           else next(a for a in conv.attribute if a.name == "group")) == 2
    assert init(pruned, "wg").shape == (4, 3, 3, 3)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_updates_group(multiplier):
    m = multiplier
    proto = make(OPSET13 + f"""
    g (float[N,3,6,6] x, float[6,3,1,1] w1, float[6] b1, float[{6 * m},1,3,3] wd, float[{6 * m}] bd,
       float[4,{6 * m},1,1] w3) => (float[N,4,6,6] y) {{
        a = Conv(x, w1, b1)
        [dw] d = Conv <group=6, pads=[1,1,1,1]> (a, wd, bd)
        r = Clip(d)
        y = Conv(r, w3)
    }}""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "a", 6)
    assert Dim("d", 1) in group.dims and Dim("w3", 1) in group.dims
    assert sorted(group.channels[2][Dim("d", 1)].tolist()) == list(range(2 * m, 3 * m))
    _, pruned, _ = oracle(proto, {"a": [0, 2, 5]})
    assert node_attr(pruned, "dw", "group") == 3
    assert init(pruned, "wd").shape == (3 * m, 1, 3, 3)
    assert init(pruned, "w3").shape == (4, 3 * m, 1, 1)


def test_conv_weight_computed_at_run_time_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,1,1] w1, float[4,6,1,1] w2) => (float[N,4,6,6] y) {
        c = Conv(x, w1)
        w = Relu(w2)
        y = Conv(c, w)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "Conv weight is computed at run time")


# -- Gemm and MatMul --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_shape", ["[16]", "[1,16]", "[1]"])
def test_gemm_transb_and_bias_broadcast(bias_shape):
    proto = make(OPSET13 + f"""
    g (float[N,8] x, float[16,8] w1, float{bias_shape} b1, float[16,4] w2, float[4] b2) => (float[N,4] y) {{
        h = Gemm <transB=1, alpha=0.5, beta=2.0> (x, w1, b1)
        r = Relu(h)
        y = Gemm(r, w2, b2)
    }}""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "h", 16)
    assert {Dim("w1", 0), Dim("w2", 0)} <= set(group.dims)
    assert (Dim("b1", len(eval(bias_shape)) - 1) in group.dims) == (bias_shape != "[1]")
    _, pruned, _ = oracle(proto, {"h": [0, 3, 7, 15]})
    assert init(pruned, "w1").shape == (12, 8) and init(pruned, "w2").shape == (12, 4)


def test_gemm_transa():
    proto = make(OPSET13 + """
    g (float[1,8] x, float[8,16] w1, float[16,4] w2) => (float[1,4] y) {
        h = Gemm(x, w1)
        t = Transpose(h)
        y = Gemm <transA=1> (t, w2)
    }""")
    _, gs = groups_of(proto)
    assert Dim("t", 0) in assert_prunable(gs, "h", 16).dims
    oracle(proto, {"h": [1, 2, 3]})


def test_matmul_constant_weight_rank3():
    proto = make(OPSET13 + """
    g (float[N,5,8] x, float[8,16] w1, float[16] b1, float[16,4] w2) => (float[N,5,4] y) {
        h = MatMul(x, w1)
        hb = Add(h, b1)
        r = Relu(hb)
        y = MatMul(r, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "h", 16, axis=2)
    assert {Dim("w1", 1), Dim("b1", 0), Dim("w2", 0)} <= set(group.dims)
    _, pruned, _ = oracle(proto, {"h:2": [0, 9]})
    assert init(pruned, "w1").shape == (8, 14) and init(pruned, "b1").shape == (14,)


# -- normalisations ---------------------------------------------------------------------------------------------------

def test_batch_normalization():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] scale, float[6] bias, float[6] mean, float[6] var,
       float[4,6,1,1] w2) => (float[N,4,6,6] y) {
        c = Conv <pads=[1,1,1,1]> (x, w1)
        n = BatchNormalization <epsilon=0.01> (c, scale, bias, mean, var)
        r = Relu(n)
        y = Conv(r, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 6)
    assert {Dim(p, 0) for p in ("scale", "bias", "mean", "var")} <= set(group.dims)
    _, pruned, _ = oracle(proto, {"c": [2, 3]})
    assert all(init(pruned, p).shape == (4,) for p in ("scale", "bias", "mean", "var"))


def test_instance_normalization():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] s, float[6] b, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        n = InstanceNormalization(c, s, b)
        y = Conv(n, w2)
    }""")
    _, gs = groups_of(proto)
    assert {Dim("s", 0), Dim("b", 0)} <= set(assert_prunable(gs, "c", 6).dims)
    oracle(proto, {"c": [0, 1, 5]})


def test_layer_normalization_over_channel_axis_blocks():
    proto = make(OPSET17 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6,4,4] s, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        n = LayerNormalization <axis=1> (c, s)
        y = Conv(n, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "LayerNormalization normalises over the channel axis")


def test_layer_normalization_over_another_axis():
    proto = make(OPSET17 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4] s, float[4] b, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        n = LayerNormalization <axis=-1> (c, s, b)
        y = Conv(n, w2)
    }""")
    _, gs = groups_of(proto)
    assert_prunable(gs, "c", 6)
    _, pruned, _ = oracle(proto, {"c": [4]})
    assert init(pruned, "s").shape == (4,)


def test_layer_normalization_of_linear_features_blocks():
    """Transformer style: LayerNormalization over the last axis, which is the MatMul's channel axis."""
    proto = make(OPSET17 + """
    g (float[N,5,8] x, float[8,16] w1, float[16] s, float[16,4] w2) => (float[N,5,4] y) {
        h = MatMul(x, w1)
        n = LayerNormalization <axis=-1> (h, s)
        y = MatMul(n, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "h", "LayerNormalization", axis=2)


def test_group_normalization_with_several_channels_per_group_blocks():
    proto = make(OPSET21 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] s, float[6] b, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        n = GroupNormalization <num_groups=3> (c, s, b)
        y = Conv(n, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "GroupNormalization normalises over several channels per group")


def test_group_normalization_one_channel_per_group():
    text = OPSET21 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] s, float[6] b, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        [gn] n = GroupNormalization <num_groups=6> (c, s, b)
        y = Conv(n, w2)
    }"""
    # onnx shape inference has no GroupNormalization shape function; the index completes it (shape-preserving op)
    _, gs = groups_of(make(text))
    assert {Dim("s", 0), Dim("b", 0)} <= set(assert_prunable(gs, "c", 6).dims)
    _, pruned, _ = oracle(make(text), {"c": [0, 5]})
    assert node_attr(pruned, "gn", "num_groups") == 4
    proto = make(text)
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, ["N", 6, 4, 4]))
    _, gs = groups_of(proto)
    assert {Dim("s", 0), Dim("b", 0)} <= set(assert_prunable(gs, "c", 6).dims)
    _, pruned, _ = oracle(proto, {"c": [1, 2]})
    assert node_attr(pruned, "gn", "num_groups") == 4


def test_prelu_slope():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6,1,1] slope, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        p = PRelu(c, slope)
        y = Conv(p, w2)
    }""")
    _, gs = groups_of(proto)
    assert Dim("slope", 0) in assert_prunable(gs, "c", 6).dims
    _, pruned, _ = oracle(proto, {"c": [0, 3]})
    assert init(pruned, "slope").shape == (4, 1, 1)


# -- elementwise ------------------------------------------------------------------------------------------------------

def test_add_mul_per_channel_and_scalar_constants():
    proto = make('<ir_version: 8, opset_import: ["" : 14]>' + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6,1,1] k, float[1,6,1,1] bias, float[1] s, float sc,
       float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        m = Mul(c, k)
        a = Add(bias, m)
        d = Div(a, s)
        e = Sub(d, sc)
        l = LeakyRelu <alpha=0.2> (e)
        h = HardSwish(l)
        y = Conv(h, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 6)
    assert {Dim("k", 0), Dim("bias", 1)} <= set(group.dims)
    assert not any(d.tensor in ("s", "sc") for d in group.dims)
    _, pruned, _ = oracle(proto, {"c": [1, 5]})
    assert init(pruned, "k").shape == (4, 1, 1) and init(pruned, "bias").shape == (1, 4, 1, 1)
    assert init(pruned, "s").shape == (1,)


def test_residual_add_couples_both_branches():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,1,1] w0, float[6,6,3,3] w1, float[6,6,3,3] w2, float[4,6,1,1] w3)
      => (float[N,4,6,6] y) {
        a = Conv(x, w0)
        r1 = Relu(a)
        b1 = Conv <pads=[1,1,1,1]> (r1, w1)
        r2 = Relu(b1)
        b2 = Conv <pads=[1,1,1,1]> (r2, w2)
        s = Add(b2, a)
        r3 = Relu(s)
        y = Conv(r3, w3)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "a", 6)
    assert {Dim("b2", 1), Dim("s", 1), Dim("w3", 1), Dim("w2", 0), Dim("w1", 1)} <= set(group.dims)
    assert group_of(gs, "b1") is not group
    oracle(proto, expect_groups=2)


def test_squeeze_excitation_gate():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[8,3,3,3] w1, float[2,8,1,1] wr, float[2] br, float[8,2,1,1] we, float[8] be,
       float[4,8,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        p = GlobalAveragePool(c)
        q = Conv(p, wr, br)
        qr = Relu(q)
        e = Conv(qr, we, be)
        s = Sigmoid(e)
        m = Mul(c, s)
        y = Conv(m, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 8)
    assert {Dim("e", 1), Dim("we", 0), Dim("be", 0), Dim("wr", 1), Dim("m", 1), Dim("w2", 1)} <= set(group.dims)
    assert_prunable(gs, "q", 2)
    oracle(proto, {"c": [0, 3, 6], "q": [1]})
