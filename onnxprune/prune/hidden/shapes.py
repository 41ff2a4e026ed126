"""Shapes around the hidden stream: what onnx cannot infer, and what the Shape nodes reading the stream are for.

A Shape node on the stream is there to size something. When its last dim only sizes Reshapes *of the stream*
(torch's nn.MultiheadAttention reshapes its [B*S, D] projection back by the projection's own shape), it must follow
the new width and is left alone; when the last dim sizes anything else (``models/transformer.onnx`` takes the
attention output's width from the norm's output), it must keep reporting the old width, so the rewrite replaces it
(apply.py). A shape that does both cannot be served and is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, node_label
from onnxprune.graph.inference import without_weights
from onnxprune.prune.hidden.norms import Refused


# onnxruntime contrib ops (unknown to onnx's shape inference) whose first output has the first input's shape
SAME_SHAPE = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
              "BiasGelu", "FastGelu", "Gelu", "QuickGelu")


def stand_in_shapes(index: GraphIndex) -> dict[str, list]:
    """Shapes onnx cannot infer past onnxruntime's contrib ops that keep their input's shape (SimplifiedLayer-
    Normalization, BiasGelu, ...) or are a plain MatMul (FusedMatMul without transposes): inferred on a weight-free
    copy in which each stands in as an Identity or a MatMul."""
    light = without_weights(index.model.proto)
    contrib = [node for node in light.graph.node if node.domain not in ("", "ai.onnx")
               or node.op_type == "SimplifiedLayerNormalization"]
    stand_ins = 0
    for node in contrib:
        if node.op_type in SAME_SHAPE:
            node.op_type, node.domain = "Identity", ""
            del node.input[1:], node.output[1:], node.attribute[:]
        elif node.op_type == "FusedMatMul" and not any(a.i for a in node.attribute if a.name.startswith("trans")):
            node.op_type, node.domain = "MatMul", ""  # alpha * A B: the shape of A B
            del node.attribute[:]
        else:
            continue
        stand_ins += 1
    if not stand_ins:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # best effort, as for the index's own inference
        return {}
    return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in inferred.graph.value_info if vi.type.tensor_type.HasField("shape")}


def settle_shapes(index: GraphIndex, shapes: list[onnx.NodeProto], stream: dict[str, int],
                  rank: Callable[[str], int | None]) -> list[onnx.NodeProto]:
    """The Shape nodes (among ``shapes``, which read tensors of ``stream``: name -> hidden axis, negative) that must
    keep reporting the full width.

    Raises:
        Refused: a shape whose last dim sizes both a Reshape of the stream and something else.
    """
    keep = []
    for shape in shapes:
        size = rank(shape.input[0])
        targets = _reshape_targets(index, shape, None if size is None else (size, size + stream[shape.input[0]]))
        if targets is None or (targets and all(t in stream for t in targets)):
            continue  # the width is not used, or only to reshape the stream itself
        if any(t in stream for t in targets):
            raise Refused(f"{node_label(shape)} sizes both a Reshape of the stream and another tensor")
        keep.append(shape)
    return keep


def _reshape_targets(index: GraphIndex, shape: onnx.NodeProto, where: tuple[int, int] | None) -> list[str] | None:
    """The data inputs of the Reshapes the shape's width entry may size, following the shape arithmetic; None when
    no user takes that entry at all. ``where``: (the shape vector's length, the width's position), None if unknown."""
    targets: list[str] = []
    visited: set[int] = set()
    todo, used = [(shape.output[0], True)], False
    while todo:
        tensor, first = todo.pop()
        for use in index.consumers_of(tensor):
            node = use.node
            if first and not _picks_width(index, tensor, node, where):
                continue
            used = True
            if node.op_type == "Reshape":
                if use.index == 1:
                    targets.append(node.input[0])
                continue
            if id(node) not in visited:
                visited.add(id(node))
                todo += [(o, False) for o in node.output if o]
        used |= tensor in index.graph_outputs
    return targets if used else None


def _picks_width(index: GraphIndex, shape_out: str, op: onnx.NodeProto, where: tuple[int, int] | None) -> bool:
    """Whether ``op``, reading a shape vector, may take the width's entry (``where``: the vector's length and that
    position): a Gather or Slice with constant positions that leave it out does not."""
    if where is None or op.op_type not in ("Gather", "Slice") or op.input[0] != shape_out:
        return True
    rank, position = where
    if op.op_type == "Gather":
        if not index.is_constant(op.input[1]):
            return True
        return position in {int(i) % rank for i in np.ravel(index.const_value(op.input[1]))}
    bounds = [index.const_value(n) if n and index.is_constant(n) else None for n in op.input[1:]]
    if len(bounds) < 2 or any(b is None for b in bounds):
        return True
    step = int(bounds[3][0]) if len(bounds) > 3 else 1
    return position in list(range(rank))[slice(int(bounds[0][0]), int(bounds[1][0]), step)]
