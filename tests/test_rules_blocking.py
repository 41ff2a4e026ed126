"""What stops a group, and patterns seen in exported models (Constant-node weights, attention, NHWC, folding)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import Dim
from oracle import first_output
from rules_support import (OPSET13, assert_blocked, assert_prunable, group_of,
                           groups_of, groups_touching, init, input_value, make, oracle)


# -- what stops a group -----------------------------------------------------------------------------------------------

def test_op_without_rule_blocks_with_its_name():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1) => (float[N,6,4,2] y, int64[N,6,4,2] i) <int64[1] k = {2}> {
        c = Conv(x, w1)
        r = Relu(c)
        y, i = TopK(r, k)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "op TopK has no channel rule")


def test_custom_domain_op_blocks_with_its_name():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13, "com.example" : 1]>
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        r = com.example.Swizzle(c)
        y = Conv(r, w2)
    }""")
    weights = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input[1:]}
    del proto.graph.input[1:]
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in weights.items())
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "op Swizzle(com.example) has no channel rule")


def test_graph_output_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,6,4,4] r, float[N,4,4,4] y) {
        c = Conv(x, w1)
        r = Relu(c)
        y = Conv(r, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "reaches graph output 'r'")


def test_graph_input_blocks():
    proto = make(OPSET13 + """
    g (float[N,6,4,4] x, float[N,3,6,6] x2, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x2, w1)
        s = Add(c, x)
        y = Conv(s, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "reaches graph input 'x'")


def test_tensor_used_inside_if_subgraph_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, bool xcond, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        r = Relu(c)
        z = If(xcond) <
            then_branch = then_g () => (float[N,6,4,4] t) { t = Relu(r) },
            else_branch = else_g () => (float[N,6,4,4] e) { e = Sigmoid(r) }
        >
        y = Conv(z, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "subgraph")


def test_weights_as_constant_nodes():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] b1, float[6] scale, float[6] bias, float[6] mean,
       float[6] var, float[5,24] wf) => (float[N,5] y) <int64[2] shape = {-1, 24}> {
        c = Conv(x, w1, b1)
        n = BatchNormalization(c, scale, bias, mean, var)
        p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (n)
        [rs] f = Reshape(p, shape)
        y = Gemm <transB=1> (f, wf)
    }""", constants=True)
    assert not proto.graph.initializer
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 6)
    assert {Dim("w1", 0), Dim("var", 0), Dim("wf", 1)} <= set(group.dims)
    _, pruned, _ = oracle(proto, {"c": [0, 2, 3]})
    assert init(pruned, "w1").shape == (3, 3, 3, 3) and init(pruned, "wf").shape == (5, 12)
    assert init(pruned, "var").shape == (3,)
    assert all(n.op_type != "Constant" or n.output[0] != "shape" or init(pruned, "shape").tolist() == [-1, 12]
               for n in pruned.graph.node)


def test_weights_as_constant_nodes_value_floats():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[4,3,3,3] w1, float[4,4,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1)
        k = Constant <value_floats=[1.0, 2.0, 3.0, 4.0]> ()
        shp = Constant <value_ints=[4, 1, 1]> ()
        kr = Reshape(k, shp)
        m = Mul(c, kr)
        y = Conv(m, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 4)
    assert {Dim("k", 0), Dim("kr", 0), Dim("m", 1), Dim("w2", 1)} <= set(group.dims)
    _, pruned, _ = oracle(proto, {"c": [1, 2]})
    assert init(pruned, "k").tolist() == [1.0, 4.0]
    assert init(pruned, "shp").tolist() == [2, 1, 1]


# -- more patterns seen in exported models ----------------------------------------------------------------------------

def test_matmul_between_activations_couples_query_and_key():
    proto = make(OPSET13 + """
    g (float[N,5,8] x, float[8,6] wq, float[8,6] wk, float[8,7] wv, float[7,4] wo) => (float[N,5,4] y) {
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        kt = Transpose <perm=[0,2,1]> (k)
        s = MatMul(q, kt)
        a = Softmax <axis=-1> (s)
        v = MatMul(x, wv)
        o = MatMul(a, v)
        y = MatMul(o, wo)
    }""")
    _, gs = groups_of(proto)
    qk = assert_prunable(gs, "q", 6, axis=2)
    assert {Dim("k", 2), Dim("kt", 1), Dim("wq", 1), Dim("wk", 1)} <= set(qk.dims)
    assert {Dim("o", 2), Dim("wo", 0)} <= set(assert_prunable(gs, "v", 7, axis=2).dims)
    oracle(proto, {"q:2": [0, 5], "v:2": [1, 2, 3]})


def test_matmul_with_constant_on_the_left():
    proto = make(OPSET13 + """
    g (float[N,3,9] x, float[6,3,3] w1, float[4,6] wl) => (float[N,4,7] y) {
        c = Conv(x, w1)
        r = Relu(c)
        y = MatMul(wl, r)
    }""")
    _, gs = groups_of(proto)
    assert Dim("wl", 1) in assert_prunable(gs, "c", 6).dims
    oracle(proto, {"c": [2, 3]})


def test_grouped_conv_transpose_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[4,3,1,1] w1, float[4,3,2,2] wt) => (float[N,6,7,7] y) {
        c = Conv(x, w1)
        y = ConvTranspose <group=2> (c, wt)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "grouped ConvTranspose is not supported")


def test_dynamic_spatial_dims():
    proto = make(OPSET13 + """
    g (float[N,3,H,W] x, float[6,3,3,3] w1, float[6] scale, float[6] bias, float[6] mean, float[6] var,
       float[4,6,3,3] w2, float[5,4] wl) => (float[N,5] y) {
        c = Conv <pads=[1,1,1,1]> (x, w1)
        n = BatchNormalization(c, scale, bias, mean, var)
        r = Relu(n)
        d = Conv <pads=[1,1,1,1]> (r, w2)
        p = GlobalAveragePool(d)
        f = Flatten(p)
        y = Gemm <transB=1> (f, wl)
    }""")
    _, gs = groups_of(proto)
    assert_prunable(gs, "c", 6)
    assert_prunable(gs, "d", 4)
    oracle(proto, expect_groups=2)


def test_flatten_with_unknown_spatial_size_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,H,W] x, float[6,3,3,3] w1, float[5,54] wl) => (float[N,5] y) {
        c = Conv(x, w1)
        f = Flatten(c)
        y = Gemm <transB=1> (f, wl)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c")


def test_gather_on_channel_axis_blocks():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,1,1] w1, float[4,3,1,1] w2) => (float[N,4,6,6] y)
      <int64[3] idx = {2, 1, 0}> {
        c = Conv(x, w1)
        s = Gather <axis=1> (c, idx)
        y = Conv(s, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "Gather selects along the channel axis")


def test_nhwc_flatten_into_matmul():
    """tf2onnx/Keras: the feature map is transposed to NHWC before flattening, so channel c owns every C-th feature."""
    proto = make(OPSET13 + """
    g (float[N,3,5,5] x, float[4,3,3,3] w1, float[36,5] wf) => (float[N,5] y) <int64[2] shape = {-1, 36}> {
        c = Conv(x, w1)
        t = Transpose <perm=[0,2,3,1]> (c)
        f = Reshape(t, shape)
        y = MatMul(f, wf)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "c", 4)
    assert group.channels[1][Dim("wf", 0)].tolist() == list(range(1, 36, 4))
    _, pruned, _ = oracle(proto, {"c": [1]})
    assert init(pruned, "wf").shape == (27, 5)


def test_reshape_merging_spatial_axes_keeps_channels_in_place():
    proto = make(OPSET13 + """
    g (float[N,3,5,5] x, float[4,3,3,3] w1, float[5,4] wl) => (float[N,5] y) <int64[3] shape = {0, 0, -1}> {
        c = Conv(x, w1)
        [rs] f = Reshape(c, shape)
        m = ReduceMean <axes=[2], keepdims=0> (f)
        y = Gemm <transB=1> (m, wl)
    }""")
    _, gs = groups_of(proto)
    assert {Dim("f", 1), Dim("wl", 1)} <= set(assert_prunable(gs, "c", 4).dims)
    _, pruned, _ = oracle(proto, {"c": [0, 3]})
    assert input_value(pruned, "rs", 1).tolist() == [0, 0, -1]


def test_weight_shared_by_two_convs_couples_their_outputs():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[N,3,6,6] x2, float[6,3,1,1] w, float[4,6,1,1] w2) => (float[N,4,6,6] y) {
        a = Conv(x, w)
        b = Conv(x2, w)
        s = Sub(a, b)
        y = Conv(s, w2)
    }""")
    _, gs = groups_of(proto)
    assert Dim("b", 1) in assert_prunable(gs, "a", 6).dims
    oracle(proto, {"a": [4]})


def test_negative_axes_concat_split_slice():
    """Concat of a tensor with itself, a split not aligned with the concat, an Add coupling two producers' channels
    and a Slice, all with negative axes."""
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[4,3,1,1] wa, float[3,3,1,1] wb, float[5,4,1,1] w2) => (float[N,5,6,6] y)
      <int64[2] sizes = {3, 8}, int64[1] st = {-11}, int64[1] en = {4}, int64[1] ax = {-3}> {
        a = Conv(x, wa)
        b = Conv(x, wb)
        c = Concat <axis=-3> (a, b, a)
        s1, s2 = Split <axis=-3> (c, sizes)
        t = Add(s1, b)
        u = Concat <axis=1> (t, s2)
        v = Slice(u, st, en, ax)
        y = Conv(v, w2)
    }""")
    _, gs = groups_of(proto)
    # channel k < 3 of a is added to channel k of b; a's channel 3 stays alone
    merged = group_of(gs, "b")
    assert merged.prunable and Dim("a", 1) in merged.dims and merged.size == 3
    assert [ch[Dim("u", 1)].tolist() for ch in merged.channels] == [[0, 4, 7], [1, 5, 8], [2, 6, 9]]
    alone = next(g for g in groups_touching(gs, "v") if g is not merged)  # a's channel 3, one channel
    assert alone.size == 1 and alone.channels[0][Dim("a", 1)].tolist() == [3]
    oracle(proto, expect_groups=1)


def test_batch_norm_on_linear_features_and_concat_of_a_tensor_with_itself():
    proto = make(OPSET13 + """
    g (float[N,8] x, float[6,8] w1, float[6] scale, float[6] bias, float[6] mean, float[6] var, float[4,12] w2)
      => (float[N,4] y) {
        h = Gemm <transB=1> (x, w1)
        n = BatchNormalization(h, scale, bias, mean, var)
        c = Concat <axis=1> (n, n)
        y = Gemm <transB=1> (c, w2)
    }""")
    _, gs = groups_of(proto)
    group = assert_prunable(gs, "h", 6)
    assert sorted(group.channels[2][Dim("w2", 1)].tolist()) == [2, 8]
    _, pruned, _ = oracle(proto, {"h": [2, 5]})
    assert init(pruned, "w2").shape == (4, 8)


def test_where_sum_mean_cast_dropout_identity():
    text = OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,1,1] w1, float[6,3,1,1] w2, float[6,1,1] k, float[4,6,1,1] w3)
      => (float[N,4,6,6] y) <float zero = {0.0}> {
        a = Conv(x, w1)
        b = Conv(x, w2)
        %s
        s = Sum(w, b, k)
        m = Mean(s, a)
        c = Cast <to=1> (m)
        d = Dropout(c)
        i = Identity(d)
        y = Conv(i, w3)
    }"""
    _, gs = groups_of(make(text % "pos = Greater(a, zero)\n        w = Where(pos, a, b)"))
    group = assert_prunable(gs, "a", 6)
    assert {Dim("b", 1), Dim("pos", 1), Dim("w", 1), Dim("k", 0), Dim("i", 1)} <= set(group.dims)
    # the mask oracle multiplies every member by a float mask, so it cannot run the bool tensor of Where: check the
    # same ops without it
    proto = make(text % "w = Max(a, b)")
    group = assert_prunable(groups_of(proto)[1], "a", 6)
    assert {Dim("b", 1), Dim("k", 0), Dim("i", 1)} <= set(group.dims)
    oracle(proto, {"a": [0, 1, 2]})


def test_older_opsets_upsample_resize_sizes_reducesum_axes_input():
    proto = make('<ir_version: 4, opset_import: ["" : 9]>' + """
    g (float[1,3,4,4] x, float[6,3,1,1] w1, float[6] s, float[6] b, float[6] m, float[6] var, float[4,6,1,1] w2)
      => (float[1,4,8,8] y) <float[4] sc = {1.0, 1.0, 2.0, 2.0}> {
        c = Conv(x, w1)
        n = BatchNormalization(c, s, b, m, var)
        u = Upsample(n, sc)
        y = Conv(u, w2)
    }""")
    oracle(proto, {"c": [1, 2]})
    proto = make('<ir_version: 6, opset_import: ["" : 11]>' + """
    g (float[1,3,4,4] x, float[6,3,1,1] w1, float[4,6,1,1] w2) => (float[1,4,8,8] y)
      <float[0] roi = {}, float[0] sc = {}, int64[4] sz = {1, 6, 8, 8}> {
        c = Conv(x, w1)
        [rz] u = Resize(c, roi, sc, sz)
        y = Conv(u, w2)
    }""")
    _, pruned, _ = oracle(proto, {"c": [0, 5]})
    assert input_value(pruned, "rz", 3).tolist() == [1, 4, 8, 8]
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[5,6] wl) => (float[N,5] y) <int64[2] axes = {-1, -2}> {
        c = Conv(x, w1)
        r = ReduceSum <keepdims=0> (c, axes)
        y = Gemm <transB=1> (r, wl)
    }""")
    oracle(proto, {"c": [1, 2]})


def test_auto_pad_and_rank4_matmul():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,3,3] w2, float[4,5] wm) => (float[N,3,3,5] y) {
        c = Conv <auto_pad="SAME_UPPER", strides=[2,2]> (x, w1)
        d = Conv <auto_pad="SAME_LOWER"> (c, w2)
        t = Transpose <perm=[0,2,3,1]> (d)
        y = MatMul(t, wm)
    }""")
    _, gs = groups_of(proto)
    assert Dim("wm", 0) in assert_prunable(gs, "d", 4).dims
    oracle(proto, {"c": [1], "d": [0, 3]})


def test_more_blocking_ops_name_the_reason():
    template = OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y{extra_out})
      <int64[1] one = {{1}}, int64[4] reps = {{1, 1, 1, 1}}> {{
        c = Conv(x, w1)
        {line}
        y = Conv(n, w2)
    }}"""
    cases = [
        ("n = LpNormalization <axis=1> (c)", "", "LpNormalization mixes values along the channel axis"),
        ("n = Tile(c, reps)", "", "op Tile has no channel rule"),
        ("n = Relu(c)\n        s = Shape(c)\n        z = Gather(s, one)", ", int64[1] z",
         "the channel count is read at run time (Shape)"),
        ("n, idx = MaxPool <kernel_shape=[1,1]> (c)", ", int64[N,6,4,4] idx",
         "MaxPool Indices output encodes channel positions"),
    ]
    for line, extra_out, reason in cases:
        _, gs = groups_of(make(template.format(line=line, extra_out=extra_out)))
        assert_blocked(gs, "c", reason)


def test_weight_behind_identity_blocks():
    """torch.onnx writes tied weights as Identity(initializer); such a weight is not a constant to the index, so the
    conv is left alone (never guessed at)."""
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        wi = Identity(w1)
        c = Conv(x, wi)
        y = Conv(c, w2)
    }""")
    _, gs = groups_of(proto)
    assert_blocked(gs, "c", "Conv weight is computed at run time")


def test_initializers_listed_as_graph_inputs():
    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[6] b1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        c = Conv(x, w1, b1)
        r = Relu(c)
        y = Conv(r, w2)
    }""")
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    _, gs = groups_of(proto)
    assert_prunable(gs, "c", 6)
    oracle(proto, {"c": [1]})


def test_weight_behind_identity_is_folded_then_pruned():
    """The prune pipeline folds constant subgraphs first, so the tied-weight conv above becomes prunable."""
    from onnxprune.graph.io import from_proto
    from onnxprune.pipeline import PruneOptions, prune_model

    proto = make(OPSET13 + """
    g (float[N,3,6,6] x, float[6,3,3,3] w1, float[4,6,1,1] w2) => (float[N,4,4,4] y) {
        wi = Identity(w1)
        c = Conv(x, wi)
        r = Relu(c)
        y = Conv(r, w2)
    }""")
    model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    report = prune_model(model, PruneOptions(channels=0.5, round_to=1))
    assert [g.after for g in report.groups if "c" in " ".join(g.members)] == [3]
    assert any("folded 1 node" in n for n in report.notes)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    first_output(model.proto, feeds)


def test_quantized_weights_are_not_folded_and_are_pruned_through():
    """A QDQ weight (int8 initializer -> DequantizeLinear -> Conv) stays quantised; its conv is pruned through the
    DequantizeLinear (channels/qdq.py): the int8 initializer loses the removed rows and stays int8."""
    from onnxprune.graph.io import from_proto
    from onnxprune.pipeline import PruneOptions, prune_model

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.integers(-100, 100, (6, 3, 3, 3)).astype(np.int8), "wq")
    scale = onnx.numpy_helper.from_array(np.array(0.01, np.float32), "s")
    zero = onnx.numpy_helper.from_array(np.array(0, np.int8), "z")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((4, 6, 1, 1)).astype(np.float32), "w2")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
         onnx.helper.make_node("Conv", ["x", "w"], ["c"]), onnx.helper.make_node("Relu", ["c"], ["r"]),
         onnx.helper.make_node("Conv", ["r", "w2"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])], [w, scale, zero, w2])
    model = from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8))
    report = prune_model(model, PruneOptions(channels=0.5, round_to=1))
    assert "DequantizeLinear" in [n.op_type for n in model.proto.graph.node]
    assert [(g.before, g.after) for g in report.groups if g.after < g.before] == [(6, 3)]
    weight = next(t for t in model.proto.graph.initializer if t.name == "wq")
    assert list(weight.dims) == [3, 3, 3, 3] and weight.data_type == onnx.TensorProto.INT8
