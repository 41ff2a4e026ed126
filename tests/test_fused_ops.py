"""Fused transformer ops (onnxruntime's contrib ops and ai.onnx Attention): heads and FFN neurons are removed through
them exactly, the hidden axis of their normalisations freezes with a reason.

Every graph is built here with onnx.helper and run in onnxruntime CPU; every removal is proved by the oracle (the
original graph with the removed units masked to zero, prune/verify.py). The end-to-end test writes a BERT-style
graph the way the TorchScript exporter does and fuses it with onnxruntime's transformer optimizer.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from oracle import assert_matches, run
from rules_support import groups_of

from onnxprune.channels import Dim
from onnxprune.graph.index import GraphIndex, attr
from onnxprune.graph.io import from_proto
from onnxprune.graph.stats import model_stats
from onnxprune.prune.structured import ChannelPlan, apply_plan
from onnxprune.prune.verify import masked_model

MS = "com.microsoft"
B, S, HIDDEN = 2, 5, 8
needs_opset_23 = pytest.mark.skipif(onnx.defs.onnx_opset_version() < 23, reason="ai.onnx Attention needs onnx >= 1.18")


class Graph:
    """A small graph under construction: random float weights, named nodes, float input ``x`` [B, S, HIDDEN]."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [h.make_tensor_value_info("x", T.FLOAT, [B, S, HIDDEN])]

    def weight(self, name: str, *shape: int, scale: float = 0.5) -> str:
        self.inits.append(nh.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, name: str, value, dtype=np.int64) -> str:
        self.inits.append(nh.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> str:
        self.nodes.append(h.make_node(op, inputs, outputs, name=outputs[0] + "_node", domain=domain, **attrs))
        return outputs[0]

    def matmul(self, x: str, name: str, k: int, n: int) -> str:
        return self.node("MatMul", [x, self.weight(name + "_w", k, n)], [name])

    def int_input(self, name: str, shape: list) -> str:
        self.inputs.append(h.make_tensor_value_info(name, T.INT32, shape))
        return name

    def model(self, out: str, opset: int = 17, rank: int = 3) -> onnx.ModelProto:
        dims = [f"out_{i}" for i in range(rank)]  # symbolic: onnx cannot infer through contrib ops
        graph = h.make_graph(self.nodes, "fused", self.inputs, [h.make_tensor_value_info(out, T.FLOAT, dims)],
                             self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), h.make_opsetid(MS, 1)])
        model.ir_version = 10
        return model


def feeds_for(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Valid inputs: x ~ N(0, 1); masks keep the first tokens of each row (never a fully masked row); lengths."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        if inp.name == "x":
            feeds["x"] = rng.standard_normal([B, S, HIDDEN]).astype(np.float32)
        elif inp.name == "mask_index":
            feeds[inp.name] = np.array([S, 3], np.int32)
        elif inp.name in ("mask", "key_padding_mask"):
            feeds[inp.name] = (np.arange(S)[None, :] < np.array([[S], [3]])).astype(np.int32)
        elif inp.name == "seqlens_k":
            feeds[inp.name] = np.full([B], S - 1, np.int32)
        elif inp.name == "total_sequence_length":
            feeds[inp.name] = np.array(S, np.int32)
        elif inp.name in ("input_ids", "segment_ids"):
            feeds[inp.name] = rng.integers(0, 2, [B, S]).astype(np.int32)
    return feeds


def prune_checked(proto: onnx.ModelProto, remove: dict[str, list[int]], feeds: dict[str, np.ndarray] | None = None,
                  seed: int = 0):
    """Remove the given units (``{"tensor:axis": unit ids}``; every other prunable group loses a random proper
    subset) and compare with the masked original on ``feeds`` (default: :func:`feeds_for`). Returns (groups,
    pruned model)."""
    model, gs = groups_of(proto)
    rng = np.random.default_rng(seed)
    plan = {g.id: np.sort(rng.choice(g.size, size=int(rng.integers(1, g.size)), replace=False))
            for g in gs.prunable()}
    for key, ids in remove.items():
        tensor, _, axis = key.partition(":")
        group = next(g for g in gs.groups if Dim(tensor, int(axis)) in g.dims)
        assert group.prunable, group.blocked
        plan[group.id] = np.asarray(ids)
    masked = masked_model(proto, gs, plan)
    apply_plan(gs, ChannelPlan(plan))
    onnx.checker.check_model(model.proto, full_check=True)
    assert_matches(masked, model.proto, feeds if feeds is not None else feeds_for(proto))
    return gs, model.proto


def group_at(gs, tensor: str, axis: int):
    return next(g for g in gs.groups if Dim(tensor, axis) in g.dims)


def node_named(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def init_shape(model: onnx.ModelProto, name: str) -> list[int]:
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)


# -- com.microsoft Attention ----------------------------------------------------------------------------------------

def ms_attention(bias: bool, mask: str | None, sizes: tuple[int, int, int] | None, attention_bias: bool):
    g = Graph()
    q, k, v = sizes or (12, 12, 12)
    x = g.matmul("x", "pre", HIDDEN, HIDDEN)  # a prunable input: its channels are the packed weight's rows
    inputs = [x, g.weight("qkv_w", HIDDEN, q + k + v), g.weight("qkv_b", q + k + v) if bias else ""]
    inputs.append(g.int_input("mask_index", [B]) if mask == "1d" else
                  g.int_input("mask", [B, S]) if mask == "2d" else "")
    if attention_bias:
        inputs += ["", g.weight("attn_bias", 1, 4, S, S)]
    extra = {"qkv_hidden_sizes": list(sizes)} if sizes else {}
    ctx = g.node("Attention", inputs, ["ctx"], domain=MS, num_heads=4, **extra)
    return g.model(g.matmul(ctx, "out", v, 6))


@pytest.mark.parametrize("bias, mask, sizes, attention_bias", [
    (True, None, None, False), (False, "1d", None, False), (True, "2d", (12, 12, 8), False),
    (True, None, (8, 8, 12), True)])
def test_ms_attention_removes_whole_heads(bias, mask, sizes, attention_bias):
    proto = ms_attention(bias, mask, sizes, attention_bias)
    q, _, v = sizes or (12, 12, 12)
    model, gs = groups_of(proto)
    heads = group_at(gs, "ctx", 2)
    assert heads.prunable and heads.size == 4  # one unit per head, not one per channel
    assert heads.producers == ["ctx_node"]
    gs, pruned = prune_checked(proto, {"ctx:2": [1, 3]})
    node = node_named(pruned, "Attention")
    assert attr(node, "num_heads") == 2
    assert init_shape(pruned, "qkv_w")[1] == (2 * q + v) // 2
    assert init_shape(pruned, "qkv_w")[0] == init_shape(pruned, "pre_w")[1] < HIDDEN  # rows went with "pre"
    if sizes:
        assert list(attr(node, "qkv_hidden_sizes")) == [q // 2, q // 2, v // 2]
    if attention_bias:
        assert init_shape(pruned, "attn_bias") == [1, 2, S, S]


def test_ms_attention_with_cache_freezes_with_reason():
    g = Graph()
    g.inputs.append(h.make_tensor_value_info("past", T.FLOAT, [2, B, 4, 0, 3]))
    ctx = g.node("Attention", ["x", g.weight("qkv_w", HIDDEN, 36), g.weight("qkv_b", 36), "", "past"],
                 ["ctx", "present"], domain=MS, num_heads=4)
    _, gs = groups_of(g.model(g.matmul(ctx, "out", 12, 6)))
    assert not group_at(gs, "ctx", 2).prunable
    assert any("past/present cache" in r for r in group_at(gs, "ctx", 2).blocked)


# -- com.microsoft MultiHeadAttention -------------------------------------------------------------------------------

@pytest.mark.parametrize("bias, padding, attention_bias", [(False, False, False), (True, True, False),
                                                          (True, False, True)])
def test_multi_head_attention_removes_whole_heads(bias, padding, attention_bias):
    g = Graph()
    inputs = [g.matmul("x", "q", HIDDEN, 12), g.matmul("x", "k", HIDDEN, 12), g.matmul("x", "v", HIDDEN, 8)]
    inputs.append(g.weight("qkv_b", 32) if bias else "")
    inputs.append(g.int_input("key_padding_mask", [B, S]) if padding else "")
    if attention_bias:
        inputs.append(g.weight("attn_bias", 1, 4, S, S))
    ctx = g.node("MultiHeadAttention", inputs, ["ctx"], domain=MS, num_heads=4)
    proto = g.model(g.matmul(ctx, "out", 8, 6))
    _, gs = groups_of(proto)
    heads = group_at(gs, "q", 2)
    assert heads.prunable and heads.size == 4 and Dim("ctx", 2) in heads.dims and Dim("v", 2) in heads.dims
    _, pruned = prune_checked(proto, {"q:2": [0]})
    assert attr(node_named(pruned, "MultiHeadAttention"), "num_heads") == 3
    assert init_shape(pruned, "q_w") == [HIDDEN, 9] and init_shape(pruned, "v_w") == [HIDDEN, 6]
    if bias:
        assert init_shape(pruned, "qkv_b") == [24]


# -- grouped-query attention ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_group_query_attention_unit_is_a_kv_head_with_its_query_heads(packed):
    g = Graph()
    if packed:
        qkv = [g.matmul("x", "qkv", HIDDEN, 64), "", ""]  # 4 query heads + 2 + 2 kv heads of 8 (CPU needs 8k)
    else:
        qkv = [g.matmul("x", "q", HIDDEN, 32), g.matmul("x", "k", HIDDEN, 16), g.matmul("x", "v", HIDDEN, 16)]
    inputs = qkv + ["", "", g.int_input("seqlens_k", [B]), g.int_input("total_sequence_length", [])]
    ctx = g.node("GroupQueryAttention", inputs, ["ctx", "present_k", "present_v"], domain=MS, num_heads=4,
                 kv_num_heads=2)
    proto = g.model(g.matmul(ctx, "out", 32, 6))
    _, gs = groups_of(proto)
    units = group_at(gs, "ctx", 2)
    assert units.prunable and units.size == 2  # two kv heads, each with its two query heads
    assert all(len(units.channels[u][Dim("ctx", 2)]) == 16 for u in range(2))
    _, pruned = prune_checked(proto, {"ctx:2": [1]})
    node = node_named(pruned, "GroupQueryAttention")
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 1)
    assert init_shape(pruned, "qkv_w" if packed else "q_w") == [HIDDEN, 32 if packed else 16]


def test_group_query_attention_uneven_heads_freeze_with_reason():
    g = Graph()
    qkv = [g.matmul("x", "q", HIDDEN, 12), g.matmul("x", "k", HIDDEN, 8), g.matmul("x", "v", HIDDEN, 8)]
    inputs = qkv + ["", "", g.int_input("seqlens_k", [B]), g.int_input("total_sequence_length", [])]
    ctx = g.node("GroupQueryAttention", inputs, ["ctx", "pk", "pv"], domain=MS, num_heads=3, kv_num_heads=2)
    _, gs = groups_of(g.model(g.matmul(ctx, "out", 12, 6)))
    assert any("do not share 2 kv heads evenly" in r for r in group_at(gs, "q", 2).blocked)


@needs_opset_23
@pytest.mark.parametrize("kv_heads, mask", [(4, False), (2, True)])
def test_onnx_attention_3d(kv_heads, mask):
    g = Graph()
    inputs = [g.matmul("x", "q", HIDDEN, 16), g.matmul("x", "k", HIDDEN, 4 * kv_heads),
              g.matmul("x", "v", HIDDEN, 4 * kv_heads)]
    if mask:
        inputs.append(g.weight("attn_mask", S, S))
    ctx = g.node("Attention", inputs, ["ctx"], q_num_heads=4, kv_num_heads=kv_heads)
    proto = g.model(g.matmul(ctx, "out", 16, 6), opset=23)
    _, gs = groups_of(proto)
    assert group_at(gs, "ctx", 2).size == kv_heads
    _, pruned = prune_checked(proto, {"ctx:2": [0]})
    node = node_named(pruned, "Attention")
    assert (attr(node, "q_num_heads"), attr(node, "kv_num_heads")) == (4 - 4 // kv_heads, kv_heads - 1)


@needs_opset_23
def test_onnx_attention_4d_heads_axis():
    """4-D [B, H, S, D] inputs (here from 1x1 convs, whose channels are heads): the heads axis is the unit axis."""
    g = Graph()
    g.inputs = [h.make_tensor_value_info("x", T.FLOAT, [B, 3, S, 4])]
    q, k, v = (g.node("Conv", ["x", g.weight(n + "_w", c, 3, 1, 1)], [n]) for n, c in (("q", 4), ("k", 2), ("v", 2)))
    ctx = g.node("Attention", [q, k, v], ["ctx"])
    proto = g.model(g.node("Conv", [ctx, g.weight("out_w", 5, 4, 1, 1)], ["out"]), opset=23, rank=4)
    _, gs = groups_of(proto)
    units = group_at(gs, "q", 1)
    assert units.prunable and units.size == 2 and Dim("k", 1) in units.dims and Dim("ctx", 1) in units.dims
    x = np.random.default_rng(0).standard_normal([B, 3, S, 4]).astype(np.float32)
    _, pruned = prune_checked(proto, {"q:1": [0]}, {"x": x})
    assert init_shape(pruned, "q_w")[0] == 2 and init_shape(pruned, "k_w")[0] == 1


# -- FFN activations ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, bias, attrs", [("BiasGelu", True, {}), ("FastGelu", True, {}), ("FastGelu", False, {}),
                                             ("Gelu", False, {}), ("QuickGelu", False, {"alpha": 1.702})])
def test_fused_activations_pass_neurons_and_slice_their_bias(op, bias, attrs):
    g = Graph()
    inputs = [g.matmul("x", "f1", HIDDEN, 12)] + ([g.weight("f1_b", 12)] if bias else [])
    act = g.node(op, inputs, ["act"], domain=MS, **attrs)
    proto = g.model(g.matmul(act, "f2", 12, HIDDEN))
    _, gs = groups_of(proto)
    neurons = group_at(gs, "f1", 2)
    assert neurons.prunable and neurons.size == 12 and Dim("act", 2) in neurons.dims
    _, pruned = prune_checked(proto, {"f1:2": [0, 5, 6, 11]})
    assert init_shape(pruned, "f2_w") == [8, HIDDEN]
    if bias:
        assert init_shape(pruned, "f1_b") == [8]


# -- the residual stream: hidden axes block, other axes pass --------------------------------------------------------

@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_skip_layer_norm_blocks_the_hidden_axis(op):
    g = Graph()
    params = [g.weight("gamma", HIDDEN)] + ([g.weight("beta", HIDDEN)] if op == "SkipLayerNormalization" else [])
    y = g.node(op, [g.matmul("x", "mm", HIDDEN, HIDDEN), "x", *params, g.weight("bias", HIDDEN)], ["y"], domain=MS)
    _, gs = groups_of(g.model(g.matmul(y, "out", HIDDEN, 6)))
    reasons = group_at(gs, "mm", 2).blocked
    assert any(f"{op} normalises over the hidden axis" in r for r in reasons), reasons


@pytest.mark.parametrize("with_sum", [False, True])
def test_skip_layer_norm_passes_its_other_axes(with_sum):
    """Channels on axis 1 of [B, C, L] tensors (1-D convs) pass through a normalisation over L, to the normalised
    output and to the input + skip sum (output 3, which ViT-style graphs read)."""
    g = Graph()
    g.inputs = [h.make_tensor_value_info("x", T.FLOAT, [B, 4, S])]
    a = g.node("Conv", ["x", g.weight("a_w", 6, 4, 1)], ["a"])
    b = g.node("Conv", ["x", g.weight("b_w", 6, 4, 1)], ["b"])
    outputs = ["y", "", "", "sum"] if with_sum else ["y"]
    y = g.node("SkipLayerNormalization", [a, b, g.weight("gamma", S), g.weight("beta", S)], outputs, domain=MS)
    if with_sum:
        y = g.node("Add", [y, "sum"], ["y_and_sum"])
    proto = g.model(g.node("Conv", [y, g.weight("c_w", 3, 6, 1)], ["out"]))
    _, gs = groups_of(proto)
    shared = group_at(gs, "a", 1)
    assert shared.prunable and Dim("b", 1) in shared.dims and Dim("y", 1) in shared.dims
    x = np.random.default_rng(0).standard_normal([B, 4, S]).astype(np.float32)
    _, pruned = prune_checked(proto, {"a:1": [1, 4]}, {"x": x})
    assert init_shape(pruned, "c_w") == [3, 4, 1]


def test_embed_layer_norm_blocks_the_hidden_axis_and_ffn_still_prunes():
    g = Graph()
    g.inputs = []
    ids, seg = g.int_input("input_ids", [B, S]), g.int_input("segment_ids", [B, S])
    emb = g.node("EmbedLayerNormalization", [ids, seg, g.weight("word", 10, HIDDEN), g.weight("pos", 16, HIDDEN),
                                             g.weight("seg_emb", 2, HIDDEN), g.weight("gamma", HIDDEN),
                                             g.weight("beta", HIDDEN)], ["emb", "mask_index_out"], domain=MS)
    res = g.node("Add", [emb, g.matmul(emb, "mm", HIDDEN, HIDDEN)], ["res"])
    act = g.node("Gelu", [g.matmul(res, "f1", HIDDEN, 12)], ["act"], domain=MS)
    proto = g.model(g.matmul(act, "f2", 12, HIDDEN))
    _, gs = groups_of(proto)
    reasons = group_at(gs, "mm", 2).blocked
    assert any("EmbedLayerNormalization normalises over the hidden axis" in r for r in reasons), reasons
    prune_checked(proto, {"f1:2": [2, 3]})


# -- shapes and MACs through contrib ops ----------------------------------------------------------------------------

def test_shapes_are_known_after_contrib_ops():
    proto = ms_attention(True, None, (12, 12, 8), False)
    index = GraphIndex(from_proto(proto))
    assert index.shape("ctx") == [B, S, 8] and index.shape("out") == [B, S, 6]


# -- end to end: a BERT-style export fused by onnxruntime's transformer optimizer ----------------------------------

def torchscript_bert(hidden: int = 16, heads: int = 4, ffn: int = 32, layers: int = 2, positions: int = 16,
                     seed: int = 0):
    """Post-LN BERT encoder layers over embeddings, written as the TorchScript exporter writes them."""
    g = Graph(seed)
    g.inputs = [h.make_tensor_value_info(n, T.INT64, ["batch", "seq"])
                for n in ("input_ids", "token_type_ids", "attention_mask")]
    d = hidden // heads
    word = g.node("Gather", [g.weight("word_emb", 30, hidden), "input_ids"], ["word"])
    seq = g.node("Gather", [g.node("Shape", ["input_ids"], ["ids_shape"]), g.const("one", 1)], ["seq_len"])
    end = g.node("Unsqueeze", [seq, g.const("ax0", [0])], ["seq_end"])  # the position_ids buffer, sliced
    position_ids = g.node("Slice", [g.const("pos_buffer", np.arange(positions)[None, :]), g.const("zero", [0]), end,
                                 g.const("pos_axis", [1]), g.const("step", [1])], ["pos_ids"])
    pos = g.node("Gather", [g.weight("pos_emb", positions, hidden), position_ids], ["pos"])
    seg = g.node("Gather", [g.weight("seg_emb", 2, hidden), "token_type_ids"], ["seg"])
    emb = g.node("Add", [g.node("Add", [word, seg], ["word_seg"]), pos], ["emb_sum"])
    x = g.node("LayerNormalization", [emb, g.weight("emb_g", hidden), g.weight("emb_b", hidden)], ["emb_out"],
               axis=-1, epsilon=1e-12)
    m = g.node("Unsqueeze", [g.node("Unsqueeze", ["attention_mask", g.const("ax1", [1])], ["m1"]),
                             g.const("ax2", [2])], ["m2"])
    m = g.node("Sub", [g.const("one_f", 1.0, np.float32), g.node("Cast", [m], ["mf"], to=T.FLOAT)], ["m_inv"])
    mask = g.node("Mul", [m, g.const("neg", -10000.0, np.float32)], ["mask_add"])

    def dims_of(t: str, p: str, tail: list[int]) -> str:
        """Concat(batch, seq, *tail) read from ``t`` by Shape/Gather/Unsqueeze, like torch's x.size(i)."""
        shape = g.node("Shape", [t], [p + "_shape"])
        parts = [g.node("Unsqueeze", [g.node("Gather", [shape, g.const(f"{p}_i{i}", i)], [f"{p}_g{i}"]),
                                      g.const(f"{p}_a{i}", [0])], [f"{p}_u{i}"]) for i in (0, 1)]
        return g.node("Concat", parts + [g.const(p + "_tail", tail)], [p + "_target"], axis=0)

    def linear(t: str, name: str, k: int, n: int) -> str:  # torch writes Add(bias, MatMul(x, W))
        return g.node("Add", [g.weight(name + "_b", n, scale=0.1), g.matmul(t, name, k, n)], [name + "_add"])

    for layer in range(layers):
        p = f"l{layer}_"
        heads_of = {}
        for tag, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            t = linear(x, p + tag, hidden, hidden)
            r = g.node("Reshape", [t, dims_of(t, p + tag, [heads, d])], [p + tag + "_4d"])
            heads_of[tag] = g.node("Transpose", [r], [p + tag + "_t"], perm=perm)
        scores = g.node("MatMul", [heads_of["q"], heads_of["k"]], [p + "scores"])
        scores = g.node("Div", [scores, g.const(p + "scale", np.sqrt(d), np.float32)], [p + "scaled"])
        probs = g.node("Softmax", [g.node("Add", [scores, mask], [p + "masked"])], [p + "probs"], axis=-1)
        ctx = g.node("Transpose", [g.node("MatMul", [probs, heads_of["v"]], [p + "ctx"])], [p + "ctx_t"],
                     perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, dims_of(ctx, p + "c", [hidden])], [p + "ctx_3d"])
        res = g.node("Add", [linear(ctx, p + "o", hidden, hidden), x], [p + "res1"])
        x1 = g.node("LayerNormalization", [res, g.weight(p + "ln1_g", hidden), g.weight(p + "ln1_b", hidden)],
                    [p + "ln1"], axis=-1, epsilon=1e-12)
        f = linear(x1, p + "f1", hidden, ffn)
        erf = g.node("Erf", [g.node("Div", [f, g.const(p + "sqrt2", 1.4142135381698608, np.float32)], [p + "gd"])],
                     [p + "ge"])
        gelu = g.node("Mul", [g.node("Mul", [f, g.node("Add", [erf, g.const(p + "g1", 1.0, np.float32)],
                                                       [p + "ga"])], [p + "gm"]),
                              g.const(p + "half", 0.5, np.float32)], [p + "gelu"])
        res = g.node("Add", [linear(gelu, p + "f2", ffn, hidden), x1], [p + "res2"])
        x = g.node("LayerNormalization", [res, g.weight(p + "ln2_g", hidden), g.weight(p + "ln2_b", hidden)],
                   [p + "ln2"], axis=-1, epsilon=1e-12)
    graph = h.make_graph(g.nodes, "bert", g.inputs, [h.make_tensor_value_info(x, T.FLOAT, ["batch", "seq", hidden])],
                         g.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def torchscript_fused(folder, opt_level: int = 0, option: str | None = None) -> onnx.ModelProto:
    """:func:`torchscript_bert` through onnxruntime's transformer optimizer (pure Python at opt_level 0; ``option``:
    a FusionOptions flag to turn on), saved by the optimizer (which adds the com.microsoft opset import) and
    loaded back."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    if option:
        setattr(options, option, True)
    source, fused = folder / "bert.onnx", folder / "bert_fused.onnx"
    onnx.save(torchscript_bert(), source)
    if opt_level:  # what optimize_model(opt_level=N) does first, without its `import torch` (torch is not a test dep)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session_options.optimized_model_filepath = str(folder / "bert_ort.onnx")
        ort.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["ConstantSharing", "MatMulScaleFusion", "MatMulAddFusion",
                                                  "MatmulTransposeFusion", "GemmActivationFusion",
                                                  "BiasSoftmaxFusion"])
        source = folder / "bert_ort.onnx"
    optimize_model(str(source), model_type="bert", opt_level=0,
                   optimization_options=options).save_model_to_file(str(fused))
    return onnx.load(fused)


def bert_feeds(model: onnx.ModelProto, seq: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    values = {"input_ids": rng.integers(0, 30, [B, seq]), "token_type_ids": rng.integers(0, 2, [B, seq]),
              "attention_mask": (np.arange(seq)[None, :] < np.array([[seq], [4]])).astype(np.int64)}
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return {name: values[name].astype(dtype) for name, dtype in types.items()}


@pytest.mark.parametrize("opt_level, option, attention, gelu", [
    (0, None, "Attention", "BiasGelu"), (2, None, "Attention", "BiasGelu"),
    (0, "use_multi_head_attention", "MultiHeadAttention", "BiasGelu"),
    (0, "enable_gelu_approximation", "Attention", "FastGelu")])
def test_bert_fused_by_onnxruntime_prunes_heads_and_ffn(tmp_path, opt_level, option, attention, gelu):
    fused = torchscript_fused(tmp_path, opt_level, option)
    ops = Counter(n.op_type for n in fused.graph.node if n.domain == MS)
    assert ops == {"EmbedLayerNormalization": 1, attention: 2, "SkipLayerNormalization": 4, gelu: 2}, ops

    model, gs = groups_of(fused)
    outputs = {n.output[0]: n.op_type for n in fused.graph.node}
    heads = [g for g in gs.groups if any(outputs.get(d.tensor) == attention for d in g.dims)]
    assert [(g.size, g.prunable) for g in heads] == [(4, True), (4, True)]
    ffn = [g for g in gs.groups if any(outputs.get(d.tensor) == gelu for d in g.dims)]
    assert [(g.size, g.prunable) for g in ffn] == [(32, True), (32, True)]
    for g in gs.groups:
        if g not in heads and g not in ffn:  # the residual stream: hidden axis, with its reason
            assert any("normalises over the hidden axis" in r for r in g.blocked), g.blocked

    plan = {heads[0].id: np.array([0, 2]), heads[1].id: np.array([3]), ffn[0].id: np.arange(0, 32, 2),
            ffn[1].id: np.arange(10)}
    masked = masked_model(fused, gs, plan)
    apply_plan(gs, ChannelPlan(plan))
    onnx.checker.check_model(model.proto, full_check=True)
    assert_matches(masked, model.proto, bert_feeds(fused))
    assert [attr(n, "num_heads") for n in model.proto.graph.node if n.op_type == attention] == [2, 3]


def test_fused_and_unfused_bert_count_the_same_macs(tmp_path):
    """The fused Attention's MACs (projections, scores, context) equal those of the MatMuls it replaced."""
    fused = torchscript_fused(tmp_path)
    shapes = {n: [B, 6] for n in ("input_ids", "token_type_ids", "attention_mask")}
    unfused_macs = model_stats(from_proto(torchscript_bert()), input_shapes=shapes).macs
    fused_macs = model_stats(from_proto(fused), input_shapes=shapes).macs
    assert unfused_macs is not None and fused_macs == unfused_macs


def test_round_to_counts_tensor_channels_so_heads_still_prune(tmp_path):
    """A head is D channels of every tensor it touches: --round-to 8 with D = 4 allows even head counts, where
    rounding the head count itself to 8 would keep all 4 heads."""
    from onnxprune.prune.structured import group_multiple, plan_channels

    _, gs = groups_of(torchscript_fused(tmp_path))
    plan = plan_channels(gs, 0.5, round_to=8)
    for group in gs.prunable():
        widths = {len(idx) for ch in group.channels for idx in ch.values()}
        kept = group.size - len(plan.remove.get(group.id, []))
        assert kept < group.size and all(kept * w % 8 == 0 for w in widths), (group.name, kept, widths)
    assert sorted(group_multiple(gs, g, 8) for g in gs.prunable()) == [2, 2, 8, 8]  # two head groups (D = 4), two FFN


def attention_block(op: str) -> onnx.ModelProto:
    """q/k/v projections (4 heads of 3 channels) and an output projection around ``op``: MultiHeadAttention,
    ai.onnx Attention, or "unfused" (the same attention written with Reshape, Transpose, MatMul and Softmax)."""
    g = Graph()
    q, k, v = (g.matmul("x", n, HIDDEN, 12) for n in "qkv")
    if op == "MultiHeadAttention":
        ctx = g.node(op, [q, k, v], ["ctx"], domain=MS, num_heads=4)
    elif op == "Attention":
        ctx = g.node(op, [q, k, v], ["ctx"], q_num_heads=4, kv_num_heads=4)
    else:
        heads = g.const("heads", [B, S, 4, 3])
        q, k, v = (g.node("Transpose", [g.node("Reshape", [t, heads], [t + "_4d"])], [t + "_t"],
                          perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]) for t in (q, k, v))
        scores = g.node("Mul", [g.node("MatMul", [q, k], ["scores"]), g.const("scale", 3 ** -0.5, np.float32)],
                        ["scaled"])
        ctx = g.node("MatMul", [g.node("Softmax", [scores], ["probs"], axis=-1), v], ["ctx_4d"])
        ctx = g.node("Reshape", [g.node("Transpose", [ctx], ["ctx_t"], perm=[0, 2, 1, 3]),
                                 g.const("flat", [B, S, 12])], ["ctx"])
    return g.model(g.matmul(ctx, "out", 12, 6), opset=23 if op == "Attention" else 17)


@needs_opset_23
@pytest.mark.parametrize("op", ["MultiHeadAttention", "Attention"])
def test_fused_attention_macs_and_outputs_equal_the_unfused_block(op):
    """The same weights give the same outputs (so the fused op is the block it claims to be) and the same MACs
    (scores and context counted like the unfused MatMuls)."""
    fused, unfused = attention_block(op), attention_block("unfused")
    assert_matches(unfused, fused, feeds_for(fused))
    assert model_stats(from_proto(fused)).macs == model_stats(from_proto(unfused)).macs is not None


@pytest.mark.parametrize("kind", ["int8-dynamic", "fp16"])
def test_fused_bert_prunes_and_quantizes_from_the_command_line(tmp_path, capsys, kind):
    """onnxruntime's quantizer cannot type the tensors after contrib ops; it is told they are float."""
    from cli_support import run_main

    source, out = tmp_path / "bert_fused.onnx", tmp_path / "out.onnx"
    onnx.save(torchscript_fused(tmp_path), source)
    shapes = [arg for n in ("input_ids", "token_type_ids", "attention_mask") for arg in ("--input-shape", f"{n}:2x6")]
    code, _, err = run_main([source, "-o", out, "--channels", "0.5", "--round-to", "1", "--quantize", kind, *shapes],
                            capsys)
    assert code == 0, err
    pruned, original = onnx.load(out), onnx.load(source)
    got, want = run(pruned, bert_feeds(pruned))[0], run(original, bert_feeds(original))[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "Cast") for n in pruned.graph.node)
