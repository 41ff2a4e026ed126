"""Parameters, MACs and sparsity per layer: what `inspect` shows and what reports compare before and after."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr, is_weighted, node_label
from onnxprune.graph.io import LoadedModel, iter_tensors
from onnxprune.prune.unstructured import FLOAT_TYPES, find_weights


@dataclass
class LayerStats:
    node: str
    op: str
    weight: str
    weight_shape: tuple[int, ...]
    params: int
    zeros: int
    macs: int | None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass
class ModelStats:
    params: int
    macs: int | None
    layers: list[LayerStats] = field(default_factory=list)
    opset: int = 0
    producer: str = ""
    file_size: int = 0

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)


def static_input_shapes(model: LoadedModel, given: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Given shapes, plus batch 1 for inputs whose only unknown dim is the leading one."""
    shapes = dict(given or {})
    inits = {t.name for t in model.proto.graph.initializer}
    for inp in model.proto.graph.input:
        if inp.name in shapes or inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        known = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if known and known[0] is None and None not in known[1:]:
            shapes[inp.name] = [1] + known[1:]
    return shapes


def node_macs(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul at the index's static shapes (None if unknown)."""
    out = index.shape(node.output[0])
    if out is None or None in out:
        return None
    out_elems = int(np.prod(out, dtype=np.int64))
    if node.op_type == "Conv":
        w = index.shape(node.input[1])
        return None if w is None else out_elems * int(np.prod(w[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        x, w = index.shape(node.input[0]), index.shape(node.input[1])
        if x is None or w is None or None in x:
            return None
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if node.op_type in ("Gemm", "MatMul"):
        a = index.shape(node.input[0])
        if a is None or a[-1] is None:
            return None
        k = a[0] if node.op_type == "Gemm" and int(attr(node, "transA", 0)) else a[-1]
        return out_elems * int(k)
    return None


def model_stats(model: LoadedModel, input_shapes: dict[str, list[int]] | None = None,
                index: GraphIndex | None = None, zeros: dict[str, int] | None = None) -> ModelStats:
    """Parameters (all float constants), MACs of weighted layers, and per-layer sparsity.

    Args:
        zeros: zero counts already known per weight name (e.g. from a pruning pass); weights listed there are not
            read again, which matters for models of several GB.
    """
    index = index or GraphIndex(model, static_input_shapes(model, input_shapes))
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in iter_tensors(model.proto)
                 if t.data_type in FLOAT_TYPES and t.name not in _sparse_parts(model))
    params += sum(int(np.prod(s.dims, dtype=np.int64)) for s in model.proto.graph.sparse_initializer)
    weights = {w.name: w for w in find_weights(index)}
    layers, total_macs, unknown = [], 0, False
    seen_weight: set[str] = set()
    for node in index.graph.node:
        if not is_weighted(node):
            continue
        macs = node_macs(index, node)
        unknown |= macs is None
        total_macs += macs or 0
        name = next((n for n in node.input[:2] if n in weights), None)
        if name is None:
            continue
        shape = tuple(int(d) for d in index.shape(name))
        shared = name in seen_weight
        if shared:
            count = 0
        elif zeros is not None and name in zeros:
            count = zeros[name]
        else:
            count = int(np.count_nonzero(index.const_value(name) == 0))
        seen_weight.add(name)
        layers.append(LayerStats(node_label(node), node.op_type, name, shape,
                                 0 if shared else int(np.prod(shape, dtype=np.int64)), count, macs))
    producer = " ".join(p for p in (model.proto.producer_name, model.proto.producer_version) if p)
    return ModelStats(params, None if unknown else total_macs, layers, index.opset, producer,
                      model.file_size)


def _sparse_parts(model: LoadedModel) -> set[str]:
    names = set()
    for s in model.proto.graph.sparse_initializer:
        names.add(s.values.name)
        names.add(s.indices.name)
    return names
