"""Where the residual stream of a transformer is: its normalisations, the constants that write it and the layers
that read it, found from the graph's structure (no node names, no one exporter's patterns).

Pre-LN (GPT, ViT, most recent encoders): each block reads the stream through a norm and adds its branch output back,
``x + f(norm(x))``; a final norm feeds the head. Post-LN (BERT): the norm follows the residual Add,
``norm(x + f(x))``, so between blocks the stream *is* a norm's output. The stream is written only by sums of
constants and of MatMul/Gemm/Gather outputs with constant weights (embeddings, position tables, output projections),
and read only by MatMul/Gemm with constant weights; on both sides ops that move data along the other axes only are
seen through (through.py: a ViT's class token Concat on the sequence axis and its Expand, Transpose and Reshape of the
other axes, ReduceMean over the sequence, Gather of the CLS token, Slice), and then the hidden axis need not be last
(a patch-embedding Conv writes it on axis 1). The norms themselves are found by norms.py. Anything else on the stream is
refused with the reason: a failed match returns a reason instead of raising (the pass turns it into exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr, node_label
from onnxprune.prune.hidden.norms import Norm, Refused, find_norms
from onnxprune.prune.hidden.shapes import settle_shapes, stand_in_shapes
from onnxprune.prune.hidden.through import OPS as THROUGH_OPS
from onnxprune.prune.hidden.through import Passage, Sized, Through

FUSED = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization")
MIN_OPSET = 13  # Slice/ReduceMean/Concat forms the rewrite emits


@dataclass
class Writer:
    """A constant term of the stream: ``node.input[slot]`` has the hidden width on ``axis`` (a MatMul/Gemm weight's
    output axis, an embedding table's rows, a bias or position table's last axis)."""

    node: onnx.NodeProto
    slot: int
    axis: int


@dataclass
class Reader:
    """A layer reading a norm's output through ``tensor``: ``node.input[slot]`` is its weight, hidden channels on
    ``axis``; ``bias`` is where its bias lives or goes (an Add after a MatMul, a Gemm's C). ``node`` None: ``tensor``
    is a graph output, which the rewrite projects back to the full width."""

    norm: Norm
    node: onnx.NodeProto | None
    slot: int
    axis: int
    bias: tuple[onnx.NodeProto, int] | None
    tensor: str
    shift_scale: float = 1.0  # a Gemm's alpha / beta: what a shift of its input adds to C


@dataclass
class Stream:
    post_ln: bool
    width: int
    norms: list[Norm]
    writers: list[Writer] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)  # run-time tensors with the hidden width
    axes: dict[str, int] = field(default_factory=dict)  # of those tensors, the hidden axis (negative)
    ranks: dict[str, int] = field(default_factory=dict)  # of those tensors, where known
    shapes: list[onnx.NodeProto] = field(default_factory=list)  # Shape nodes reading one of them, to report d
    sized: list[Sized] = field(default_factory=list)  # constant Reshape targets / Expand shapes spelling the width

    @property
    def rms(self) -> bool:
        return self.norms[0].rms


def find_stream(index: GraphIndex) -> Stream | str:
    """The residual stream of the model ``index`` describes, or the reason there is none this module can slice."""
    try:
        return _Walk(index).stream()
    except Refused as reason:
        return str(reason)


class _Walk:
    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.seen: set[str] = set()
        self.stand_in = stand_in_shapes(index)

    def dims(self, t: str) -> list | None:
        return self.index.shape(t) or self.stand_in.get(t)

    def rank(self, t: str) -> int | None:
        shape = self.dims(t)
        return None if shape is None else len(shape)

    def width(self, t: str) -> int | None:
        shape = self.dims(t)
        return shape[-1] if shape else None

    def stream(self) -> Stream:
        index = self.index
        if index.opset < MIN_OPSET:
            raise Refused(f"opset {index.opset} is below {MIN_OPSET}")
        norms = find_norms(index)
        if not norms:
            raise Refused(self.no_norm_reason())
        widths = {self.width(n.x) for n in norms}
        if len(widths) != 1 or None in widths:
            raise Refused(f"the normalisations have different or unknown widths ({sorted(map(str, widths))})")
        if len({n.rms for n in norms}) != 1:
            raise Refused("LayerNormalization and RMSNorm are mixed on the stream")
        xs, ys = {n.x for n in norms}, {n.y for n in norms}
        post_ln = self.layout(norms, xs, ys)
        self.s = Stream(post_ln, widths.pop(), norms)
        self.through = Through(index, self.s.width, self.dims)
        self.xs, self.ys = xs, ys
        for n in norms:
            if n.gamma(index, self.s.width).shape != (self.s.width,):
                raise Refused(f"{n.label}: scale is not a vector of the hidden width")
            if post_ln:  # the chain of a decomposed norm is sliced with it
                for t in n.inner:
                    self.track(t)
            self.written(n)
            self.read(n, n.y)
        self.s.shapes = settle_shapes(index, self.s.shapes, self.s.axes, self.rank)
        return self.s

    def no_norm_reason(self) -> str:
        ops = {node.op_type for node in self.index.graph.node}
        reason = ("no LayerNormalization, SimplifiedLayerNormalization or RMSNormalization over the last axis, nor "
                  "the same decomposed into ReduceMean/Sub/Pow/Sqrt/Div")
        fused = [op for op in FUSED if op in ops]
        if fused:
            reason += f" (fused {', '.join(fused)} is not handled yet)"
        return reason

    def layout(self, norms: list[Norm], xs: set[str], ys: set[str]) -> bool:
        """True for post-LN: residual Adds that make a norm's input add a norm's output, not a norm's input."""
        pre = post = 0
        for n in norms:
            use = self.index.producer.get(n.x)
            if use is not None and use.node.op_type == "Add":
                pre += bool(set(use.node.input) & xs)
                post += bool(set(use.node.input) & ys)
        if pre and not post:
            return False
        if post and not pre:
            return True
        raise Refused("neither pre-LN (x + f(norm(x))) nor post-LN (norm(x + f(x))) residual blocks were found"
                       if not pre else "the residual Adds mix pre-LN and post-LN blocks")

    def written(self, n: Norm) -> None:
        """Everything that adds into the norm's input: the previous stream position plus a branch, or the
        embedding sum that starts the stream."""
        x = n.x
        self.track(x)
        stream_side = self.ys if self.s.post_ln else self.xs
        use = self.index.producer.get(x)
        residual = use is not None and use.node.op_type == "Add" and set(use.node.input) & stream_side
        if residual:
            branch = [name for name in use.node.input if name not in stream_side]
            if len(branch) != 1:
                raise Refused(f"{node_label(use.node)} adds two stream positions")
            self.sole_use(branch[0])
            self.expression(branch[0])
        else:
            self.expression(x)
        for use in self.index.consumers_of(x):
            op = use.node
            if any(op is node for node in n.nodes) or (not self.s.post_ln and (
                    op.output[0] in self.xs and op.op_type == "Add"
                    or any(op is node for m in self.s.norms for node in m.nodes))):
                continue
            if op.op_type == "Shape":
                self.shape(op)
                continue
            raise Refused(f"the stream tensor '{x}' is read by {node_label(op)}, which is neither a normalisation "
                           "nor the next residual Add")
        if x in self.index.graph_outputs:
            raise Refused(f"the stream tensor '{x}' is a graph output")

    def expression(self, t: str, axis: int = -1) -> None:
        """``t`` (hidden width on ``axis``) is a sum of terms the rewrite can rotate: constants, MatMul/Gemm/Gather/Conv
        with constant weights, and what ops along the other axes make of such terms."""
        index = self.index
        self.track(t, axis)
        use = index.producer.get(t)
        if use is None:
            raise Refused(f"the stream is written by the graph input '{t}'")
        op = use.node
        if op.op_type == "Add":
            for slot in range(len(op.input)):
                self.term(op, slot, axis)
        elif op.op_type == "MatMul" and axis == -1 and self.weight(op.input[1]):
            self.add_writer(op, 1, 1)
        elif op.op_type == "Gemm" and axis == -1 and not attr(op, "transA", 0) and self.weight(op.input[1]):
            self.add_writer(op, 1, 0 if attr(op, "transB", 0) else 1)
            if len(op.input) > 2 and op.input[2]:
                self.constant(op, 2, -1)
        elif op.op_type == "Gather" and axis == -1 and int(attr(op, "axis", 0)) == 0 and self.weight(op.input[0]):
            self.add_writer(op, 0, 1)
        elif op.op_type == "Conv" and self.conv_writer(op, axis):
            self.add_writer(op, 1, 0)
            if len(op.input) > 2 and op.input[2]:
                self.constant(op, 2, -1)
        elif op.op_type in THROUGH_OPS:
            passage = self.passage(self.through.into(op, axis), op)
            for slot in passage.slots:
                self.term(op, slot, passage.axis)
        else:
            raise Refused(f"the stream is written by {node_label(op)}, which cannot be rotated or sliced (only "
                           "sums of constants and MatMul/Gemm/Gather/Conv outputs with constant weights can, and "
                           "ops along the other axes of such terms)")

    def term(self, op: onnx.NodeProto, slot: int, axis: int) -> None:
        """Input ``slot`` of ``op`` writes the stream with the hidden width on ``axis``: a constant or an expression."""
        name = op.input[slot]
        if self.index.is_constant(name):
            self.constant(op, slot, axis)
        else:
            self.sole_use(name)
            self.expression(name, axis)

    def passage(self, found: Passage | str, op: onnx.NodeProto) -> Passage:
        if isinstance(found, str):
            raise Refused(f"the stream cannot pass: {found}")
        if found.sized is not None and all(s.node is not op for s in self.s.sized):
            self.s.sized.append(found.sized)
        return found

    def read(self, n: Norm, t: str, axis: int = -1) -> None:
        """Every reader of the normalised stream ``t`` (a norm output or what a pass-through op made of it), whose
        hidden axis is ``axis``."""
        index = self.index
        self.track(t, axis)
        if t in index.graph_outputs:
            if axis != -1:
                raise Refused(f"the graph output '{t}' has the normalised stream on axis {axis}, not the last")
            self.s.readers.append(Reader(n, None, 0, 0, None, t))
        for use in index.consumers_of(t):
            op = use.node
            last = axis == -1 and use.index == 0
            onward = self.through.out_of(op, use.index, axis) if op.op_type in THROUGH_OPS else ""
            if op.op_type == "MatMul" and last and self.weight(op.input[1]):
                self.s.readers.append(Reader(n, op, 1, 0, self.bias_after(op), t))
            elif op.op_type == "Gemm" and last and not attr(op, "transA", 0) and self.weight(op.input[1]):
                if len(op.input) > 2 and op.input[2] and not index.is_constant(op.input[2]):
                    raise Refused(f"{node_label(op)}: its C input is computed")
                alpha, beta = float(attr(op, "alpha", 1.0)), float(attr(op, "beta", 1.0))
                if beta == 0:
                    raise Refused(f"{node_label(op)}: beta = 0 leaves no bias to take the norm's shift")
                self.s.readers.append(Reader(n, op, 1, 1 if attr(op, "transB", 0) else 0, (op, 2), t, alpha / beta))
            elif isinstance(onward, Passage):
                self.read(n, op.output[0], self.passage(onward, op).axis)
            elif op.op_type == "Shape":
                self.shape(op)
            elif self.s.post_ln and op.op_type == "Add" and op.output[0] in self.xs:
                continue  # the residual Add into the next norm
            else:
                raise Refused(f"{node_label(op)} reads the normalised stream '{t}' and is not a MatMul or Gemm "
                               "with a constant weight" + (f" ({onward})" if onward else ""))

    # -- small checks ---------------------------------------------------------------------------------------------

    def track(self, t: str, axis: int = -1) -> None:
        shape = self.dims(t)
        width = shape[axis] if shape is not None and -len(shape) <= axis else None
        if width is not None and width != self.s.width:
            raise Refused(f"'{t}' on the stream has {width} on its hidden axis, not the hidden width {self.s.width}")
        if t not in self.seen:
            self.seen.add(t)
            self.s.tensors.append(t)
            self.s.axes[t] = axis
            if self.rank(t):
                self.s.ranks[t] = self.rank(t)
        elif self.s.axes[t] != axis:
            raise Refused(f"'{t}' is on the stream with the hidden width on two different axes")

    def sole_use(self, t: str) -> None:
        """``t`` feeds one node, apart from Shape nodes (recorded)."""
        uses = self.index.consumers_of(t)
        for use in uses:
            if use.node.op_type == "Shape":
                self.shape(use.node)
        if len([u for u in uses if u.node.op_type != "Shape"]) != 1 or t in self.index.graph_outputs:
            raise Refused(f"'{t}', a term of the stream, is also read elsewhere")

    def weight(self, name: str) -> bool:
        value = self.index.const_value(name) if self.index.is_constant(name) else None
        return value is not None and value.ndim == 2 and value.dtype == np.float32

    def conv_writer(self, op: onnx.NodeProto, axis: int) -> bool:
        """A Conv (a patch embedding) with a constant float32 weight, writing the stream on its channel axis."""
        value = self.index.const_value(op.input[1]) if self.index.is_constant(op.input[1]) else None
        return (value is not None and value.dtype == np.float32 and value.ndim >= 3 and axis == 1 - value.ndim
                and int(attr(op, "group", 1)) == 1)

    def add_writer(self, node: onnx.NodeProto, slot: int, axis: int) -> None:
        if self.index.const_value(node.input[slot]).shape[axis] != self.s.width:
            raise Refused(f"{node_label(node)}: its weight does not have the hidden width")
        self.s.writers.append(Writer(node, slot, axis))

    def constant(self, node: onnx.NodeProto, slot: int, axis: int) -> None:
        """A constant added to (or making) a stream term whose hidden axis is ``axis``; broadcasting aligns trailing
        axes, so the constant's hidden axis is ``axis`` too."""
        value = self.index.const_value(node.input[slot])
        if value.ndim < -axis or value.shape[axis] != self.s.width or value.dtype != np.float32:
            raise Refused(f"the constant '{node.input[slot]}' added to the stream is not float32 with the hidden "
                           f"width on its axis {axis}")
        self.s.writers.append(Writer(node, slot, value.ndim + axis))

    def bias_after(self, matmul: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
        """The Add of a constant vector right after a MatMul (its bias), as (node, slot); None if there is none."""
        uses = self.index.consumers_of(matmul.output[0])
        if len(uses) != 1 or uses[0].node.op_type != "Add" or matmul.output[0] in self.index.graph_outputs:
            return None
        add, slot = uses[0].node, 1 - uses[0].index
        value = self.index.const_value(add.input[slot]) if self.index.is_constant(add.input[slot]) else None
        outputs = self.index.const_value(matmul.input[1]).shape[1]
        if value is None or value.ndim == 0 or value.shape[-1] != outputs or value.size != outputs:
            return None
        return add, slot

    def shape(self, op: onnx.NodeProto) -> None:
        if attr(op, "start", None) is not None or attr(op, "end", None) is not None:
            raise Refused(f"{node_label(op)} takes part of the stream's shape")
        if all(op is not s for s in self.s.shapes):
            self.s.shapes.append(op)
