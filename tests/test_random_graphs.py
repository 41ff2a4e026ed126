"""Exactness of structured channel removal on randomly generated graphs (hypothesis).

Each example is a small but valid ONNX graph: a stem Conv, then a random stack of convs (plain, grouped, depthwise
with a channel multiplier), BatchNormalization, activations, residual adds, concats, split-conv-concat blocks,
per-channel scale and bias, pooling, and a head (Flatten/Reshape into a linear layer keeping the spatial extent,
global pooling into Gemm, an NHWC MatMul head, or a plain conv). Every prunable group loses a random proper subset of
its channels; the pruned model must pass the full checker, run in onnxruntime and match the original with those
channels masked to zero (the oracle in ``oracle.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from attention_graphs import Spec, build, specs  # noqa: E402
from graph_builder import GraphBuilder  # noqa: E402
from oracle import assert_matches, masked_model, random_feeds  # noqa: E402

from onnxprune.channels import Dim  # noqa: E402
from onnxprune.channels.groups import build_groups  # noqa: E402
from onnxprune.graph.index import GraphIndex  # noqa: E402
from onnxprune.graph.io import from_proto  # noqa: E402
from onnxprune.pipeline import find_groups  # noqa: E402
from onnxprune.prune.structured import ChannelPlan, apply_plan  # noqa: E402

MAX_C = 12
STATS = {"graphs": 0, "with_prunable": 0, "groups_pruned": 0}


# -- graph builder ----------------------------------------------------------------------------------------------------

@dataclass
class T:
    """A 4-D activation: name, channels, height, width."""

    name: str
    c: int
    h: int
    w: int


@dataclass
class Builder(GraphBuilder):
    opset: int = 13

    def weight(self, *shape: int, prefix: str = "w") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), prefix)

    # -- layers -------------------------------------------------------------------------------------------------------

    def conv(self, x: T, out: int, k: int = 1, pad: int = 0, group: int = 1, bias: bool = False) -> T:
        inputs = [x.name, self.weight(out, x.c // group, k, k)]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(out).astype(np.float32), "b"))
        (y,) = self.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, group=group)
        return T(y, out, x.h + 2 * pad - k + 1, x.w + 2 * pad - k + 1)

    def batch_norm(self, x: T) -> T:
        r = self.rng
        params = [r.uniform(0.5, 1.5, x.c), r.standard_normal(x.c) * 0.5, r.standard_normal(x.c) * 0.5,
                  r.uniform(0.5, 2.0, x.c)]
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        (y,) = self.node("BatchNormalization", [x.name] + names, epsilon=1e-3)
        return T(y, x.c, x.h, x.w)

    def activation(self, x: T, kind: str) -> T:
        if kind == "HardSwish" and self.opset < 14:
            kind = "HardSigmoid"
        if kind == "Clip":
            lo = self.const(np.array(-1.0, np.float32), "lo")
            hi = self.const(np.array(6.0, np.float32), "hi")
            (y,) = self.node("Clip", [x.name, lo, hi])
        elif kind == "LeakyRelu":
            (y,) = self.node("LeakyRelu", [x.name], alpha=0.1)
        else:
            (y,) = self.node(kind, [x.name])
        return T(y, x.c, x.h, x.w)

    def scale_bias(self, x: T, leading_one: bool) -> T:
        shape = [1, x.c, 1, 1] if leading_one else [x.c, 1, 1]
        k = self.const(self.rng.uniform(0.5, 2.0, shape).astype(np.float32), "k")
        b = self.const(self.rng.standard_normal(shape).astype(np.float32), "kb")
        (m,) = self.node("Mul", [x.name, k])
        (a,) = self.node("Add", [b, m])
        return T(a, x.c, x.h, x.w)

    def add(self, a: T, b: T) -> T:
        (y,) = self.node("Add", [a.name, b.name])
        return T(y, a.c, a.h, a.w)

    def concat(self, parts: list[T]) -> T:
        (y,) = self.node("Concat", [p.name for p in parts], axis=1)
        return T(y, sum(p.c for p in parts), parts[0].h, parts[0].w)

    def split(self, x: T, sizes: list[int]) -> list[T]:
        outs = self.node("Split", [x.name, self.const(np.array(sizes, np.int64), "split")], n_out=len(sizes), axis=1)
        return [T(o, s, x.h, x.w) for o, s in zip(outs, sizes)]

    def max_pool(self, x: T) -> T:
        (y,) = self.node("MaxPool", [x.name], kernel_shape=[2, 2], strides=[2, 2])
        return T(y, x.c, x.h // 2, x.w // 2)

    def avg_pool(self, x: T) -> T:
        (y,) = self.node("AveragePool", [x.name], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
        return T(y, x.c, x.h, x.w)

    def per_channel(self, shape: list[int], low: float = 0.5, high: float = 2.0, prefix: str = "k") -> str:
        return self.const(self.rng.uniform(low, high, shape).astype(np.float32), prefix)

    def global_pool(self, x: T) -> T:
        (y,) = self.node("GlobalAveragePool", [x.name])
        return T(y, x.c, 1, 1)


# -- strategy ---------------------------------------------------------------------------------------------------------

ACTIVATIONS = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "Tanh"]
BLOCKS = ["conv", "conv", "bn", "act", "residual", "concat", "split", "depthwise", "grouped", "scale_bias",
          "pool", "gap", "split_add", "concat_split", "se", "slice", "nhwc_roundtrip", "prelu", "instance_norm",
          "resize", "pad"]
HEADS = ["flatten_gemm", "gap_gemm", "conv", "reshape_matmul", "nhwc_matmul", "reduce_gemm"]


@dataclass
class Case:
    proto: onnx.ModelProto
    description: str
    extra_output: bool


@st.composite
def graphs(draw) -> Case:
    opset = draw(st.sampled_from([13, 13, 17, 18]))
    dynamic = draw(st.booleans())
    c0 = draw(st.integers(2, MAX_C))
    hw = draw(st.integers(4, 8))
    b = Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), opset=opset)
    chans = st.integers(2, MAX_C)
    steps = []

    def conv_bn_act(x: T, out: int, k: int, tag: str, same: bool = True) -> T:
        pad = k // 2 if same or k == 1 or x.h < 5 else draw(st.sampled_from([0, 1]))
        y = b.conv(x, out, k, pad=pad, bias=draw(st.booleans()))
        if draw(st.booleans()):
            y = b.batch_norm(y)
        if draw(st.booleans()):
            y = b.activation(y, draw(st.sampled_from(ACTIVATIONS)))
        steps.append(f"{tag}:{x.c}->{out}k{k}")
        return y

    x_in = T("x", c0, hw, hw)
    cur = conv_bn_act(x_in, draw(chans), draw(st.sampled_from([1, 3])), "stem", same=False)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(BLOCKS))
        if kind == "conv":
            cur = conv_bn_act(cur, draw(chans), draw(st.sampled_from([1, 3])), "conv", same=False)
        elif kind == "bn":
            cur = b.batch_norm(cur)
            steps.append("bn")
        elif kind == "act":
            act = draw(st.sampled_from(ACTIVATIONS))
            cur = b.activation(cur, act)
            steps.append(act)
        elif kind == "residual":
            style = draw(st.sampled_from(["plain", "depthwise", "grouped"]))
            if style == "depthwise":  # MobileNet-style: the branch passes channels through
                branch = b.activation(b.conv(cur, cur.c, 3, pad=1, group=cur.c), "Relu")
            elif style == "grouped" and cur.c % 2 == 0 and cur.c >= 4:  # ResNeXt-style: channel j of each group
                branch = b.batch_norm(b.conv(cur, cur.c, 3, pad=1, group=2))
            else:
                branch = conv_bn_act(cur, cur.c, 3, "res")
            steps.append(f"res-{style}")
            if draw(st.booleans()):
                branch = b.conv(branch, cur.c, 1)
            other = cur if draw(st.booleans()) else b.conv(cur, cur.c, 1, bias=True)
            cur = b.add(branch, other) if draw(st.booleans()) else b.add(other, branch)
            if draw(st.booleans()):
                cur = b.activation(cur, "Relu")
        elif kind == "concat":
            parts = [conv_bn_act(cur, draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), "cat")
                     for _ in range(draw(st.integers(1, 3)))]
            if draw(st.booleans()):
                parts.insert(draw(st.integers(0, len(parts))), cur)
            cur = b.concat(parts)
        elif kind == "split" and cur.c >= 2:
            n = draw(st.integers(2, min(3, cur.c)))
            cuts = sorted(draw(st.lists(st.integers(1, cur.c - 1), min_size=n - 1, max_size=n - 1, unique=True)))
            sizes = [e - s for s, e in zip([0] + cuts, cuts + [cur.c])]
            pieces = b.split(cur, sizes)
            outs = [conv_bn_act(p, draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), "split")
                    if draw(st.booleans()) or i == 0 else p for i, p in enumerate(pieces)]
            cur = b.concat(outs)
            steps.append(f"split{sizes}")
        elif kind == "depthwise":
            m = draw(st.sampled_from([1, 1, 2]))
            if cur.c * m <= 2 * MAX_C:
                cur = b.conv(cur, cur.c * m, 3, pad=1, group=cur.c, bias=draw(st.booleans()))
                steps.append(f"dw x{m}")
                if draw(st.booleans()):
                    cur = b.batch_norm(cur)
        elif kind == "grouped" and cur.c % 2 == 0 and cur.c >= 4:
            out = 2 * draw(st.integers(1, MAX_C // 2))
            k = draw(st.sampled_from([1, 3]))
            cur = b.conv(cur, out, k, pad=k // 2, group=2, bias=draw(st.booleans()))
            steps.append(f"grouped->{out}")
        elif kind == "scale_bias":
            cur = b.scale_bias(cur, draw(st.booleans()))
            steps.append("scale_bias")
        elif kind == "pool":
            if cur.h >= 4 and draw(st.booleans()):
                cur = b.max_pool(cur)
                steps.append("maxpool")
            else:
                cur = b.avg_pool(cur)
                steps.append("avgpool")
        elif kind == "gap" and draw(st.integers(0, 3)) == 0:
            cur = b.global_pool(cur)
            steps.append("gap")
        elif kind == "split_add" and cur.c % 2 == 0:  # halves of one tensor added: channel i couples with i + C/2
            a, c = b.split(cur, [cur.c // 2, cur.c // 2])
            cur = b.add(a, c) if draw(st.booleans()) else b.add(c, b.activation(a, "Relu"))
            steps.append("split_add")
        elif kind == "concat_split":  # CSP/DenseNet style: split boundaries not aligned with the concat's
            parts = [conv_bn_act(cur, draw(st.integers(1, 6)), 1, "cs") for _ in range(2)]
            if draw(st.booleans()):
                parts.append(cur)
            cat = b.concat(parts)
            cut = draw(st.integers(1, cat.c - 1))
            left, right = b.split(cat, [cut, cat.c - cut])
            right = conv_bn_act(right, draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), "cs")
            cur = b.concat([right, left] if draw(st.booleans()) else [left, right])
            steps.append(f"concat_split@{cut}")
        elif kind == "se":  # squeeze-and-excitation gate multiplied into the feature map
            gate = b.global_pool(cur)
            gate = b.activation(b.conv(gate, draw(st.integers(2, 4)), 1, bias=True), "Relu")
            gate = b.activation(b.conv(gate, cur.c, 1, bias=True), "Sigmoid")
            (y,) = b.node("Mul", [cur.name, gate.name] if draw(st.booleans()) else [gate.name, cur.name])
            cur = T(y, cur.c, cur.h, cur.w)
            steps.append("se")
        elif kind == "slice" and cur.c >= 3:
            start = draw(st.integers(0, cur.c - 2))
            end = draw(st.integers(start + 2, cur.c)) if draw(st.booleans()) else 2**62
            args = [np.array([start], np.int64), np.array([end], np.int64), np.array([1], np.int64)]
            (y,) = b.node("Slice", [cur.name] + [b.const(a, "sl") for a in args])
            cur = T(y, min(end, cur.c) - start, cur.h, cur.w)
            steps.append(f"slice{start}:{end}")
        elif kind == "nhwc_roundtrip":  # tf2onnx: per-channel ops on the last axis between two transposes
            (t,) = b.node("Transpose", [cur.name], perm=[0, 2, 3, 1])
            (m,) = b.node("Mul", [t, b.per_channel([cur.c])])
            (a,) = b.node("Add", [m, b.per_channel([1, 1, 1, cur.c], -1.0, 1.0)])
            (y,) = b.node("Transpose", [a], perm=[0, 3, 1, 2])
            cur = T(y, cur.c, cur.h, cur.w)
            steps.append("nhwc")
        elif kind == "prelu":
            (y,) = b.node("PRelu", [cur.name, b.per_channel([cur.c, 1, 1], 0.0, 0.5)])
            cur = T(y, cur.c, cur.h, cur.w)
            steps.append("prelu")
        elif kind == "instance_norm" and cur.h * cur.w > 1:
            (y,) = b.node("InstanceNormalization", [cur.name, b.per_channel([cur.c]), b.per_channel([cur.c], -1, 1)])
            cur = T(y, cur.c, cur.h, cur.w)
            steps.append("instnorm")
        elif kind == "resize" and cur.h <= 4:
            scales = b.const(np.array([1, 1, 2, 2], np.float32), "sc")
            (y,) = b.node("Resize", [cur.name, "", scales], mode="nearest")
            cur = T(y, cur.c, cur.h * 2, cur.w * 2)
            steps.append("resize")
        elif kind == "pad":
            pads = b.const(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads")
            (y,) = b.node("Pad", [cur.name, pads])
            cur = T(y, cur.c, cur.h + 1, cur.w + 1)
            steps.append("pad")

    extra_output = draw(st.integers(0, 15)) == 7  # rarely: hypothesis favours small values
    outputs = []
    if extra_output:  # a graph output in the middle: its groups must be blocked, the rest still pruned
        outputs.append(helper.make_tensor_value_info(cur.name, TensorProto.FLOAT, ["N" if dynamic else 1, cur.c,
                                                                                   cur.h, cur.w]))
    batch = "N" if dynamic else 1
    head = draw(st.sampled_from(HEADS))
    n_out = draw(st.integers(2, 6))
    if head == "conv":
        y = b.conv(cur, n_out, 1, bias=True)
        y_shape = [batch, n_out, y.h, y.w]
        y = y.name
    elif head == "nhwc_matmul":
        (t,) = b.node("Transpose", [cur.name], perm=[0, 2, 3, 1])
        (mm,) = b.node("MatMul", [t, b.weight(cur.c, n_out)])
        (y,) = b.node("Add", [mm, b.const(b.rng.standard_normal(n_out).astype(np.float32), "b")])
        y_shape = [batch, cur.h, cur.w, n_out]
    else:
        if head == "gap_gemm":
            cur = b.global_pool(cur)
        if head == "reduce_gemm":
            if opset >= 18:
                (r,) = b.node("ReduceMean", [cur.name, b.const(np.array([2, 3], np.int64), "axes")], keepdims=0)
            else:
                (r,) = b.node("ReduceMean", [cur.name], axes=[2, 3], keepdims=0)
            feat, n_feat = r, cur.c
        elif head == "reshape_matmul":
            target = draw(st.sampled_from([[-1, cur.c * cur.h * cur.w], [0, -1]] + ([] if dynamic else [[1, -1]])))
            (feat,) = b.node("Reshape", [cur.name, b.const(np.array(target, np.int64), "shape")])
            n_feat = cur.c * cur.h * cur.w
        else:
            (feat,) = b.node("Flatten", [cur.name], axis=1)
            n_feat = cur.c * cur.h * cur.w
        if head == "reshape_matmul":
            (mm,) = b.node("MatMul", [feat, b.weight(n_feat, n_out)])
            (y,) = b.node("Add", [mm, b.const(b.rng.standard_normal(n_out).astype(np.float32), "b")])
        else:
            (y,) = b.node("Gemm", [feat, b.weight(n_out, n_feat), b.const(np.zeros(n_out, np.float32) + 0.1, "b")],
                          transB=1)
        y_shape = [batch, n_out]
    steps.append(head)
    outputs.insert(0, helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape))
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [batch, c0, hw, hw])],
                              outputs, b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if draw(st.booleans()):  # exporters often store the shapes of intermediate tensors: they must be refreshed
        proto = onnx.shape_inference.infer_shapes(proto)
        steps.append("+value_info")
    return Case(proto, f"opset {opset} x[{batch},{c0},{hw},{hw}] " + " ".join(steps), extra_output)


# -- the property -----------------------------------------------------------------------------------------------------

def prune_random(proto: onnx.ModelProto, rng: np.random.Generator, head_dims: bool = False):
    """Groups of ``proto`` and a plan removing a random non-empty proper subset of every prunable group."""
    model = from_proto(_copy(proto))
    gs = build_groups(GraphIndex(model), head_dims) if head_dims else find_groups(model)
    plan = {}
    for g in gs.prunable():
        if g.size > 1:
            count = int(rng.integers(1, g.size))
            plan[g.id] = np.sort(rng.choice(g.size, size=count, replace=False))
    return model, gs, plan


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


@settings(max_examples=200, deadline=None, derandomize=True,  # the same 200 graphs every run: no flaky CI
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=graphs(), seed=st.integers(0, 2**32 - 1))
def test_random_graph_pruning_matches_masked_original(case: Case, seed: int):
    note(case.description)
    proto = case.proto
    onnx.checker.check_model(proto, full_check=True)
    model, gs, plan = prune_random(proto, np.random.default_rng(seed))
    for g in gs.groups:
        note(f"group {g.id} size {g.size} {'remove ' + str(plan.get(g.id)) if g.prunable else g.blocked}: "
             f"{[f'{d.tensor}:{d.axis}' for d in g.dims]}")
    STATS["graphs"] += 1
    if plan:
        STATS["with_prunable"] += 1
        STATS["groups_pruned"] += len(plan)
    else:
        event("no prunable group")
    # a group may legitimately be unprunable (one channel, or reaching the graph output); how often that happens is
    # checked by test_random_graphs_were_not_vacuous
    assert plan or case.extra_output or all(g.size == 1 for g in gs.prunable()), "nothing to prune"
    masked = masked_model(proto, gs, plan)
    apply_plan(gs, ChannelPlan(dict(plan)))
    onnx.checker.check_model(model.proto, full_check=True)
    assert_matches(masked, model.proto, random_feeds(proto))


def test_random_graphs_were_not_vacuous():
    """Runs after the property (file order): nearly every generated graph had channels removed."""
    if STATS["graphs"] == 0:
        pytest.skip("the random-graph property did not run in this session")
    assert STATS["graphs"] >= 100, STATS
    assert STATS["with_prunable"] >= 0.9 * STATS["graphs"], STATS
    assert STATS["groups_pruned"] >= 1.5 * STATS["graphs"], STATS


# -- attention blocks -------------------------------------------------------------------------------------------------

ATTENTION_STATS = {"graphs": 0, "heads_pruned": 0}


def _heads_expected(spec: Spec) -> bool:
    """Whether every layer's heads must come out as one removable group: more than one kv head, and a head dim
    over 1 for the [B, S, 3, H, D] reshape (with D = 1 the split cannot tell H from the q/k/v axis; frozen)."""
    return spec.kv_heads > 1 and not (spec.qkv == "reshape5" and spec.head_dim == 1)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), head_dims=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_attention_pruning_matches_masked_original(spec: Spec, head_dims: bool, seed: int):
    """Attention blocks as exporters write them (tests/attention_graphs.py): separate or fused q/k/v (Split, Slice,
    [B, S, 3, H, D] Reshape), MatMul+Add or Gemm, with and without bias, pre-/post-/no LayerNorm, mask Add, scale
    Div/Mul, grouped-query attention, static or symbolic batch and sequence. Every layer's heads form one group
    of kv-head units (or, with ``head_dims``, groups of head dims); random units and FFN neurons go, and the
    result equals the masked original."""
    note(f"{spec.describe()} head_dims={head_dims}")
    proto = build(spec)
    model, gs, plan = prune_random(proto, np.random.default_rng(seed), head_dims)
    for g in gs.groups:
        note(f"group {g.id} size {g.size} {'remove ' + str(plan.get(g.id)) if g.prunable else g.blocked}")
    heads = [g for g in gs.prunable() if g.size == spec.kv_heads and g.id in plan
             and any(Dim(t, 1) in g.dims for t in _q_weights(proto))]
    if _heads_expected(spec) and not head_dims:
        assert len(heads) == spec.layers, [(g.size, g.blocked) for g in gs.groups]
    ATTENTION_STATS["graphs"] += 1
    ATTENTION_STATS["heads_pruned"] += len(heads)
    masked = masked_model(proto, gs, plan)
    apply_plan(gs, ChannelPlan(dict(plan)))
    onnx.checker.check_model(model.proto, full_check=True)
    for batch in (spec.batch, spec.batch + 1) if spec.dynamic else (spec.batch,):  # symbolic dims: other sizes
        assert_matches(masked, model.proto, random_feeds(proto, batch=batch))


def _q_weights(proto: onnx.ModelProto) -> list[str]:
    """Weights of the layers whose output is cut into heads (the q or fused qkv projection)."""
    return [n.input[1] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]


def test_random_attention_graphs_were_not_vacuous():
    if ATTENTION_STATS["graphs"] == 0:
        pytest.skip("the attention property did not run in this session")
    assert ATTENTION_STATS["heads_pruned"] >= 0.6 * ATTENTION_STATS["graphs"], ATTENTION_STATS


# -- the oracle can fail ----------------------------------------------------------------------------------------------

def _fixed_case() -> onnx.ModelProto:
    b = Builder(np.random.default_rng(7), opset=13)
    x = T("x", 3, 6, 6)
    y = b.conv(x, 8, 3, pad=1, bias=True)
    y = b.batch_norm(y)
    y = b.activation(y, "Relu")
    r = b.add(b.conv(y, 8, 3, pad=1), y)
    out = b.conv(r, 4, 1, bias=True)
    graph = helper.make_graph(b.nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info(out.name, TensorProto.FLOAT, [1, 4, 6, 6])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_oracle_detects_a_wrong_channel_set():
    proto = _fixed_case()
    model, gs, _ = prune_random(proto, np.random.default_rng(0))
    (group,) = gs.prunable()
    assert group.size == 8
    removed, claimed = np.array([1, 5]), np.array([2, 6])
    masked_right = masked_model(proto, gs, {group.id: removed})
    masked_wrong = masked_model(proto, gs, {group.id: claimed})
    apply_plan(gs, ChannelPlan({group.id: removed}))
    feeds = random_feeds(proto)
    assert_matches(masked_right, model.proto, feeds)  # the right set matches...
    with pytest.raises(AssertionError):  # ...and a different set of the same size does not
        assert_matches(masked_wrong, model.proto, feeds)
    with pytest.raises(AssertionError):  # nor does the unpruned original
        assert_matches(proto, model.proto, feeds)
