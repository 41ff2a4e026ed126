"""Attention blocks written the way exporters write them, for the head tests and the random graphs.

One :class:`Spec` describes a small encoder: input x [B, S, E] (E = H * D), optional pre- or post-LayerNorm,
q/k/v projections (separate MatMul(+Add) or Gemm, or one fused qkv MatMul cut by Split, by Slice, or by a Reshape to
[B, S, 3, H, D] and Gather), Reshape to heads, Transpose, scores, scale (Div or Mul), mask Add, Softmax, context,
Transpose back, merging Reshape, output projection, residual, an FFN, a MatMul head. Grouped-query attention has
fewer kv heads, expanded to the q heads by Unsqueeze -> Expand -> Reshape. ``dynamic`` makes batch and sequence
symbolic and builds every Reshape target as exporters do then: Shape -> Gather -> Unsqueeze -> Concat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graph_builder import GraphBuilder

QKV = ("separate", "split", "slice", "reshape5")


@dataclass(frozen=True)
class Spec:
    heads: int = 4
    head_dim: int = 3
    kv_heads: int = 4  # < heads: grouped-query attention (heads % kv_heads == 0)
    qkv: str = "separate"
    gemm: bool = False  # projections as Gemm on the flattened tokens [B*S, E]
    bias: bool = True
    norm: str = "pre"  # "pre", "post" or "none"
    mask: bool = True
    scale: str = "div"  # "div", "mul" or "none"
    dynamic: bool = False
    ffn: int = 0  # FFN width (0: none)
    layers: int = 1
    batch: int = 2
    seq: int = 5
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        return (f"H{self.heads}xD{self.head_dim} kv{self.kv_heads} {self.qkv}{' gemm' if self.gemm else ''} "
                f"bias={self.bias} {self.norm}-LN mask={self.mask} scale={self.scale} ffn={self.ffn} "
                f"layers={self.layers} {'dynamic' if self.dynamic else 'static'}")


@dataclass
class _Graph(GraphBuilder):
    spec: Spec = field(default_factory=Spec)

    def ints(self, values) -> str:
        return self.const(np.array(values, np.int64), "shape")

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), "w")

    def one(self, op: str, inputs: list[str], **attrs) -> str:
        return self.node(op, inputs, **attrs)[0]

    def size_of(self, x: str, axis: int) -> str:
        """A run-time size as a 1-element tensor: Shape -> Gather -> Unsqueeze (the legacy exporter's pattern)."""
        picked = self.one("Gather", [self.one("Shape", [x]), self.const(np.array(axis, np.int64))], axis=0)
        return self.one("Unsqueeze", [picked, self.ints([0])])

    def target(self, x: str, dims: list) -> str:
        """A shape tensor: ints stay constants; "B" and "S" are x's axes 0 and 1 (read at run time when dynamic);
        "E" is read from x's axis 2 when dynamic."""
        s = self.spec
        if not s.dynamic:
            sizes = {"B": s.batch, "S": s.seq, "E": s.hidden}
            return self.ints([sizes.get(d, d) for d in dims])
        pieces = [self.size_of(x, {"B": 0, "S": 1, "E": 2}[d]) if isinstance(d, str) else self.ints([d])
                  for d in dims]
        return self.one("Concat", pieces, axis=0)

    def linear(self, x: str, n_in: int, n_out: int, bias: bool) -> str:
        """x [B, S, n_in] -> [B, S, n_out]: MatMul(+Add), or Gemm on the flattened tokens."""
        s = self.spec
        if s.gemm:
            flat = self.one("Reshape", [x, self.ints([-1 if s.dynamic else s.batch * s.seq, n_in])])
            inputs = [flat, self.weight(n_out, n_in)] + ([self.const(self.bias(n_out))] if bias else [])
            y = self.one("Gemm", inputs, transB=1)
            return self.one("Reshape", [y, self.target(x, ["B", "S", n_out])])
        y = self.one("MatMul", [x, self.weight(n_in, n_out)])
        return self.one("Add", [y, self.const(self.bias(n_out))]) if bias else y

    def bias(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal(n) * 0.5).astype(np.float32)

    def norm(self, x: str) -> str:
        e = self.spec.hidden
        gamma = self.const(self.rng.uniform(0.5, 1.5, e).astype(np.float32))
        return self.one("LayerNormalization", [x, gamma, self.const(self.bias(e))], axis=-1)

    def heads(self, t: str, count: int, shape_of: str) -> str:
        """[B, S, count * D] -> [B, count, S, D]."""
        r = self.one("Reshape", [t, self.target(shape_of, ["B", "S", count, self.spec.head_dim])])
        return self.one("Transpose", [r], perm=[0, 2, 1, 3])

    def repeat_kv(self, t: str, shape_of: str) -> str:
        """[B, Hkv, S, D] -> [B, H, S, D], each kv head repeated for its H / Hkv q heads (HF's repeat_kv)."""
        s = self.spec
        rep = s.heads // s.kv_heads
        u = self.one("Unsqueeze", [t, self.ints([2])])
        e = self.one("Expand", [u, self.target(shape_of, ["B", s.kv_heads, rep, "S", s.head_dim])])
        return self.one("Reshape", [e, self.target(shape_of, ["B", s.heads, "S", s.head_dim])])

    def qkv(self, h: str) -> tuple[str, str, str]:
        """q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, D]."""
        s = self.spec
        e, d, kv = s.hidden, s.head_dim, s.kv_heads * s.head_dim
        if s.qkv == "separate":
            return tuple(self.heads(self.linear(h, e, n, s.bias), n // d, h) for n in (e, kv, kv))
        fused = self.linear(h, e, e + 2 * kv, s.bias)
        if s.qkv == "reshape5":  # timm: qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4), then q, k, v = qkv[i]
            r = self.one("Reshape", [fused, self.target(h, ["B", "S", 3, s.heads, d])])
            p = self.one("Transpose", [r], perm=[2, 0, 3, 1, 4])
            return tuple(self.one("Gather", [p, self.const(np.array(i, np.int64))], axis=0) for i in range(3))
        if s.qkv == "split":
            parts = self.node("Split", [fused, self.ints([e, kv, kv])], n_out=3, axis=-1)
        else:
            bounds = [(0, e), (e, e + kv), (e + kv, e + 2 * kv)]
            parts = [self.one("Slice", [fused, self.ints([a]), self.ints([b]), self.ints([-1])]) for a, b in bounds]
        return tuple(self.heads(p, n // d, h) for p, n in zip(parts, (e, kv, kv)))

    def attention(self, x: str, mask: str | None) -> str:
        s = self.spec
        q, k, v = self.qkv(x)
        if s.kv_heads != s.heads:
            k, v = self.repeat_kv(k, x), self.repeat_kv(v, x)
        scores = self.one("MatMul", [q, self.one("Transpose", [k], perm=[0, 1, 3, 2])])
        if s.scale != "none":
            factor = np.sqrt(s.head_dim) if s.scale == "div" else 1 / np.sqrt(s.head_dim)
            scores = self.one(s.scale.capitalize(), [scores, self.const(np.array(factor, np.float32))])
        if mask is not None:
            scores = self.one("Add", [scores, mask])
        context = self.one("MatMul", [self.one("Softmax", [scores], axis=-1), v])
        merged = self.one("Reshape", [self.one("Transpose", [context], perm=[0, 2, 1, 3]),
                                      self.target(x, ["B", "S", "E"])])
        return self.linear(merged, s.hidden, s.hidden, s.bias)

    def layer(self, x: str, mask: str | None) -> str:
        s = self.spec
        h = self.norm(x) if s.norm == "pre" else x
        x = self.one("Add", [x, self.attention(h, mask)])
        if s.norm == "post":
            x = self.norm(x)
        if s.ffn:
            h = self.norm(x) if s.norm == "pre" else x
            f = self.linear(self.one("Relu", [self.linear(h, s.hidden, s.ffn, s.bias)]), s.ffn, s.hidden, s.bias)
            x = self.one("Add", [x, f])
            if s.norm == "post":
                x = self.norm(x)
        return x


def build(spec: Spec, outputs: int = 3) -> onnx.ModelProto:
    """The encoder of ``spec``: inputs x [B, S, E] (and mask [B, 1, 1, S]), output y [B, S, outputs]."""
    g = _Graph(np.random.default_rng(spec.seed), spec=spec)
    b, s = ("B", "S") if spec.dynamic else (spec.batch, spec.seq)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, s, spec.hidden])]
    mask = None
    if spec.mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [b, 1, 1, s]))
        mask = "mask"
    x = "x"
    for _ in range(spec.layers):
        x = g.layer(x, mask)
    y = g.one("MatMul", [x, g.weight(spec.hidden, outputs)])
    graph = helper.make_graph(g.nodes, "attention", inputs,
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [b, s, outputs])], g.inits)
    opset = 17 if spec.norm != "none" else 13
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@st.composite
def specs(draw) -> Spec:
    """Attention encoders of every kind :func:`build` writes."""
    heads = draw(st.sampled_from([2, 3, 4, 6]))
    qkv = draw(st.sampled_from(QKV))
    kv_options = [k for k in range(1, heads + 1) if heads % k == 0] if qkv in ("separate", "split") else [heads]
    dynamic = draw(st.booleans())
    return Spec(heads=heads, head_dim=draw(st.integers(1, 4)), kv_heads=draw(st.sampled_from(kv_options)),
                qkv=qkv, gemm=draw(st.integers(0, 3)) == 0, bias=draw(st.booleans()),
                norm=draw(st.sampled_from(["pre", "post", "none"])), mask=draw(st.booleans()),
                scale=draw(st.sampled_from(["div", "mul", "none"])), dynamic=dynamic,
                ffn=draw(st.sampled_from([0, 5])), layers=draw(st.integers(1, 2)), seq=draw(st.integers(2, 6)),
                seed=draw(st.integers(0, 2**16)))
