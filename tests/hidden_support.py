"""Small transformer encoders built with onnx.helper, for the hidden-width tests and tools/bench_hidden.py.

Each is an embedding (MatMul + bias + position table; or a ViT's: 2x2 patches by a Conv, flattened and transposed to
tokens, a class token Expanded to the batch and Concatenated on the sequence axis), blocks of multi-head attention (q/k/v MatMul + Add, Reshape
to heads by a constant [0, 0, H, D], score MatMul, scale, Softmax, context MatMul, output projection) and an FFN
(MatMul, SiLU, MatMul), arranged pre-LN (``x + f(norm(x))``, a final norm) or post-LN (``norm(x + f(x))``, BERT's
norm after the embedding too), then mean pooling over the sequence (a ViT: its class token, by Gather or by
Slice + Squeeze) and a Gemm head. Weights are random with a
few dominant stream directions (as trained models have), so PCA slicing has something to find.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NORM_KINDS = ("layer", "simplified", "rms23", "decomposed", "decomposed-rms")


class _Builder:
    def __init__(self, seed: int, opset: int, gemm_style: bool = False, fused_gelu: bool = False) -> None:
        self.gemm_style, self.fused_gelu = gemm_style, fused_gelu
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape: tuple[int, ...], base: str, scale: float = 1.0) -> str:
        fan_in = shape[0] if len(shape) > 1 else 1
        return self.const((self.rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32), base)

    def op(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", domain=domain, **attrs))
        return out

    def linear(self, x: str, n_in: int, n_out: int, base: str, scale: float = 1.0) -> str:
        y = self.op("MatMul", [x, self.weight((n_in, n_out), f"{base}_w", scale)])
        return self.op("Add", [self.const((0.1 * self.rng.standard_normal(n_out)).astype(np.float32),
                                          f"{base}_b"), y])

    def norm(self, x: str, width: int, kind: str) -> str:
        scale = self.const((1 + 0.3 * self.rng.standard_normal(width)).astype(np.float32), "gamma")
        if kind == "layer":
            shift = self.const((0.2 * self.rng.standard_normal(width)).astype(np.float32), "beta")
            return self.op("LayerNormalization", [x, scale, shift], axis=-1, epsilon=1e-5)
        if kind == "simplified":
            return self.op("SimplifiedLayerNormalization", [x, scale], axis=-1, epsilon=1e-5)
        if kind == "rms23":
            return self.op("RMSNormalization", [x, scale], axis=-1, epsilon=1e-5)
        # as exporters write them below opset 17: elementwise ops and ReduceMean over the last axis
        centred = x if kind == "decomposed-rms" else self.op("Sub", [x, self.mean_last(x)])
        square = self.op("Mul", [centred, centred]) if kind == "decomposed-rms" else \
            self.op("Pow", [centred, self.const(np.array(2.0, np.float32), "two")])
        root = self.op("Sqrt", [self.op("Add", [self.mean_last(square), self.const(np.array(1e-5, np.float32),
                                                                                        "eps")])])
        scaled = self.op("Mul", [self.op("Div", [centred, root]), scale])
        if kind == "decomposed-rms":
            return scaled
        return self.op("Add", [scaled, self.const((0.2 * self.rng.standard_normal(width)).astype(np.float32),
                                                  "beta")])

    def mean_last(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(np.array([-1], np.int64), "axes")], keepdims=1)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def attention(self, x: str, width: int, heads: int) -> str:
        dim = width // heads
        shape = self.const(np.array([0, 0, heads, dim], np.int64), "heads_shape")
        parts = []
        for p in ("q", "k", "v"):
            parts.append(self.op("Reshape", [self.linear(x, width, width, p), shape]))
        q = self.op("Transpose", [parts[0]], perm=[0, 2, 1, 3])
        k = self.op("Transpose", [parts[1]], perm=[0, 2, 3, 1])
        v = self.op("Transpose", [parts[2]], perm=[0, 2, 1, 3])
        scores = self.op("Mul", [self.op("MatMul", [q, k]), self.const(np.array(dim ** -0.5, np.float32), "s")])
        context = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])
        merged = self.op("Reshape", [self.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                     self.const(np.array([0, 0, width], np.int64), "merge_shape")])
        if not self.gemm_style:
            return self.linear(merged, width, width, "proj")
        # torch's nn.MultiheadAttention: the projection on [B*S, D] rows, then back to the input's [B, S] by a
        # shape computed from Shape nodes (batch and sequence from the input, the width from the Gemm's output)
        flat = self.op("Reshape", [merged, self.const(np.array([-1, width], np.int64), "rows")])
        rows = self.gemm(flat, width, width, "proj")
        return self.op("Reshape", [rows, self.op("Concat", [self.dim(x, 0), self.dim(x, 1), self.dim(rows, 1)],
                                                axis=0)])

    def ffn(self, x: str, width: int, hidden: int) -> str:
        if self.gemm_style:  # on [B*S, D] rows: a Reshape with a constant target ending in the width reads the stream
            rows = self.op("Reshape", [x, self.const(np.array([-1, width], np.int64), "rows")])
            up = self.gemm(rows, width, hidden, "fc1", alpha=0.5, beta=2.0)  # a reader with alpha and beta
            down = self.gemm(self.op("Mul", [up, self.op("Sigmoid", [up])]), hidden, width, "fc2")
            return self.op("Reshape", [down, self.op("Shape", [x])])
        if self.fused_gelu:  # onnxruntime's contrib op: onnx's shape inference stops there
            up = self.op("MatMul", [x, self.weight((width, hidden), "fc1_w")])
            bias = self.const((0.1 * self.rng.standard_normal(hidden)).astype(np.float32), "fc1_b")
            return self.linear(self.op("BiasGelu", [up, bias], domain="com.microsoft"), hidden, width, "fc2")
        up = self.linear(x, width, hidden, "fc1")
        return self.linear(self.op("Mul", [up, self.op("Sigmoid", [up])]), hidden, width, "fc2")

    def gemm(self, x: str, n_in: int, n_out: int, base: str, alpha: float = 1.0, beta: float = 1.0) -> str:
        return self.op("Gemm", [x, self.weight((n_out, n_in), f"{base}_w", np.sqrt(n_out / n_in)),
                                self.const((0.1 * self.rng.standard_normal(n_out)).astype(np.float32), f"{base}_b")],
                       transB=1, alpha=alpha, beta=beta)

    def dim(self, x: str, axis: int) -> str:
        return self.op("Gather", [self.op("Shape", [x]), self.const(np.array([axis], np.int64), "axis")], axis=0)

    def patches(self, x: str, width: int, mixing: np.ndarray, tile: bool) -> str:
        """A ViT's tokens from a [B, 1, 8, 8] image, as torch exports them: a 2x2 Conv with stride 2, Reshape to
        [B, D, 16] (a constant target spelling the width), Transpose to [B, 16, D]; a [1, 1, D] class token Expanded
        to [B, 1, D] by a shape computed from the input's (``tile``: a [1, D] token Unsqueezed, then Tiled by
        computed repeats, as ``repeat`` exports), Concatenated before them on the sequence axis."""
        kernel = (self.rng.standard_normal((4, width)) @ np.diag(mixing) / 2).T.reshape(width, 1, 2, 2)
        conv = self.op("Conv", [x, self.const(kernel.astype(np.float32), "patch_w"),
                                self.const((0.1 * self.rng.standard_normal(width)).astype(np.float32), "patch_b")],
                       kernel_shape=[2, 2], strides=[2, 2])
        flat = self.op("Reshape", [conv, self.const(np.array([0, width, -1], np.int64), "flatten")])
        tokens = self.op("Transpose", [flat], perm=[0, 2, 1])
        shape = self.op("Concat", [self.dim(x, 0), self.const(np.array([1, 1], np.int64), "ones")], axis=0)
        token = self.const((self.rng.standard_normal((1, 1, width)) * mixing).astype(np.float32), "cls")
        if tile:
            flat_token = self.const(numpy_helper.to_array(self.inits.pop()).reshape(1, width), "cls")
            token = self.op("Unsqueeze", [flat_token, self.const(np.array([0], np.int64), "axes")])
            return self.op("Concat", [self.op("Tile", [token, shape]), tokens], axis=1)
        return self.op("Concat", [self.op("Expand", [token, shape]), tokens], axis=1)

    def positions(self, seq: int, width: int, sliced: bool) -> str:
        """The position table [1, seq, D]; ``sliced``: the first ``seq`` rows of a longer one, by Slice."""
        rows = 2 * seq if sliced else seq
        table = self.const((0.3 * self.rng.standard_normal((1, rows, width))).astype(np.float32), "pos")
        if not sliced:
            return table
        return self.op("Slice", [table, self.const(np.array([0], np.int64), "start"),
                                 self.const(np.array([seq], np.int64), "stop"),
                                 self.const(np.array([1], np.int64), "axes")])

    def class_token(self, x: str, by: str) -> str:
        """The class token of [B, S, D]: Gather of index 0 on the sequence axis, or Slice [0:1] and Squeeze."""
        if by == "gather":
            return self.op("Gather", [x, self.const(np.array(0, np.int64), "first")], axis=1)
        first = self.op("Slice", [x, self.const(np.array([0], np.int64), "start"), self.const(
            np.array([1], np.int64), "stop"), self.const(np.array([1], np.int64), "axes")])
        return self.op("Squeeze", [first, self.const(np.array([1], np.int64), "axes")])

    def pool(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(np.array([1], np.int64), "axes")], keepdims=0)
        return self.op("ReduceMean", [x], axes=[1], keepdims=0)


def encoder(post_ln: bool = False, norm: str = "layer", layers: int = 2, width: int = 32, heads: int = 4,
            ffn: int = 64, seq: int = 8, features: int = 16, classes: int = 10, seed: int = 0,
            sequence_output: bool = False, tokens: int = 0, gemm_style: bool = False,
            fused_gelu: bool = False, vit: str = "") -> onnx.ModelProto:
    """A small encoder (see the module docstring); ``sequence_output``: the final normalised sequence is a graph
    output too (it must keep its width); ``tokens``: the input is int64 token ids embedded by a Gather from a table
    of this many rows (BERT's word embedding) instead of float features and a MatMul; ``gemm_style``: the attention
    output and the FFN work on [B*S, D] rows through Gemm, as torch's nn.MultiheadAttention exports them;
    ``fused_gelu``: the FFN's bias and GELU are onnxruntime's com.microsoft BiasGelu, as its optimizer writes them;
    ``vit`` ("gather", "slice" or "tile"): the input is a [B, 1, 8, 8] image cut into 16 patches plus a class token
    (``seq`` becomes 17), and the head reads the class token by Gather or Slice + Squeeze ("tile": Gather, the class
    token Unsqueezed and Tiled, the positions Sliced from a longer table)."""
    opset = 23 if norm == "rms23" else 17
    b = _Builder(seed, opset, gemm_style, fused_gelu)
    # a stream with a few strong directions: the embedding writes mostly into a low-dimensional subspace
    mixing = b.rng.standard_normal((features, width)) * np.linspace(3.0, 0.2, width) / np.sqrt(features)
    if vit:
        seq = 17
        embedded = b.patches("x", width, np.linspace(3.0, 0.2, width), tile=vit == "tile")
    elif tokens:
        table = b.rng.standard_normal((tokens, features)) @ mixing
        embedded = b.op("Gather", [b.const(table.astype(np.float32), "word_table"), "x"], axis=0)
    else:
        embedded = b.op("MatMul", ["x", b.const(mixing.astype(np.float32), "embed_w")])
        embedded = b.op("Add", [b.const((0.1 * b.rng.standard_normal(width)).astype(np.float32), "embed_b"),
                                embedded])
    stream = b.op("Add", [embedded, b.positions(seq, width, sliced=vit == "tile")])
    if post_ln:
        stream = b.norm(stream, width, norm)
    for _ in range(layers):
        if post_ln:
            stream = b.norm(b.op("Add", [stream, b.attention(stream, width, heads)]), width, norm)
            stream = b.norm(b.op("Add", [stream, b.ffn(stream, width, ffn)]), width, norm)
        else:
            stream = b.op("Add", [stream, b.attention(b.norm(stream, width, norm), width, heads)])
            stream = b.op("Add", [stream, b.ffn(b.norm(stream, width, norm), width, ffn)])
    final = stream if post_ln else b.norm(stream, width, norm)
    logits = b.op("Gemm", [b.class_token(final, "slice" if vit == "slice" else "gather") if vit else b.pool(final), b.weight((classes, width), "head_w"),
                           b.const(np.zeros(classes, np.float32), "head_b")], transB=1)
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", classes])]
    if sequence_output:
        outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, ["batch", seq, width]))
    source = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", seq]) if tokens else \
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8] if vit else ["batch", seq, features])
    graph = helper.make_graph(b.nodes, "encoder", [source], outputs, b.inits)
    imports = [helper.make_opsetid("", opset)]
    if norm == "simplified" or fused_gelu:  # contrib ops: with com.microsoft imported, the input check lets ORT judge
        imports.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=imports, producer_name="tests/hidden_support.py")
    model.ir_version = 10 if opset >= 21 else 8
    return model


def calibration(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of the encoder's input shape (token ids below the table's size)."""
    source = model.graph.input[0].type.tensor_type
    dims = [d.dim_value for d in source.shape.dim[1:]]
    rng = np.random.default_rng(seed)
    if source.elem_type == TensorProto.INT64:
        rows = next(t.dims[0] for t in model.graph.initializer if t.name.startswith("word_table"))
        return {"x": rng.integers(0, rows, (samples, *dims), dtype=np.int64)}
    return {"x": rng.standard_normal((samples, *dims)).astype(np.float32)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the rows of two outputs."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
