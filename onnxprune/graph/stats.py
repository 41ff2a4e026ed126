"""Parameters, MACs and sparsity per layer: what `inspect` shows and what reports compare before and after."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import ConfigError
from onnxprune.graph.index import GraphIndex, node_label
from onnxprune.graph.io import LoadedModel, iter_tensors
from onnxprune.graph.layers import FLOAT_TYPES, find_weights, kind_of, node_macs


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


MAX_DIM = 2**31 - 1  # onnxruntime and most kernels index a dim with int32
MAX_ELEMENTS = 2**40  # a tensor this size (4 TB of float32) is a typo, not a shape


def _describe_input(value: onnx.ValueInfoProto) -> str:
    if not value.type.tensor_type.HasField("shape"):
        return f"{value.name} [rank unknown]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]
    return f"{value.name} [{', '.join(dims)}]"


def check_input_shapes(model: LoadedModel, given: dict[str, list[int]] | None) -> None:
    """Refuse ``--input-shape`` values the model cannot take, before any work: shape inference would otherwise
    ignore an unknown name, overflow on an absurd dim or silently keep the model's own static dim.

    Raises:
        ConfigError: an unknown input name, a wrong rank, a dim < 1 or > MAX_DIM, over MAX_ELEMENTS elements, or a
            dim that contradicts a static dim of the model.
    """
    if not given:
        return
    inits = {t.name for t in model.proto.graph.initializer}
    inputs = {v.name: v for v in model.proto.graph.input if v.name not in inits}
    for name, dims in given.items():
        text = f"--input-shape {name}:{'x'.join(map(str, dims))}"
        value = inputs.get(name)
        if value is None:
            raise ConfigError(f"{text}: the model has no input '{name}'; its inputs are "
                              f"{'; '.join(_describe_input(v) for v in inputs.values()) or 'none'}")
        bad = next((d for d in dims if not 1 <= d <= MAX_DIM), None)
        if bad is not None:
            raise ConfigError(f"{text}: every dim must be between 1 and {MAX_DIM} (got {bad})")
        if math.prod(dims) > MAX_ELEMENTS:
            raise ConfigError(f"{text}: {math.prod(dims):.3g} elements is more than any model input can hold "
                              f"(limit {MAX_ELEMENTS:.3g})")
        if not value.type.tensor_type.HasField("shape"):
            continue  # rank unknown: any shape may be right
        static = value.type.tensor_type.shape.dim
        if len(dims) != len(static):
            raise ConfigError(f"{text} has rank {len(dims)}; the model expects rank {len(static)}: "
                              f"{_describe_input(value)}")
        for axis, (have, want) in enumerate(zip(dims, static)):
            if want.HasField("dim_value") and want.dim_value > 0 and have != want.dim_value:
                raise ConfigError(f"{text}: axis {axis} is {have}, but the model fixes it to {want.dim_value} "
                                  f"({_describe_input(value)})")


def static_input_shapes(model: LoadedModel, given: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Given shapes (checked by :func:`check_input_shapes`), plus batch 1 for inputs whose only unknown dim is the
    leading one."""
    check_input_shapes(model, given)
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


def model_stats(model: LoadedModel, input_shapes: dict[str, list[int]] | None = None,
                index: GraphIndex | None = None, zeros: dict[str, int] | None = None) -> ModelStats:
    """Parameters (all float constants), MACs of weighted layers, and per-layer sparsity.

    Args:
        zeros: zero counts already known per weight name (e.g. from a pruning pass); weights listed there are not
            read again, which matters for models of several GB.
    """
    index = index or GraphIndex(model, static_input_shapes(model, input_shapes))
    values, scales = _quantized_parts(model)
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in iter_tensors(model.proto)
                 if (t.data_type in FLOAT_TYPES or t.name in values) and t.name not in scales
                 and t.name not in _sparse_parts(model))
    params += sum(int(np.prod(s.dims, dtype=np.int64)) for s in model.proto.graph.sparse_initializer)
    weights = {w.name: w for w in find_weights(index)}
    layers, total_macs, unknown = [], 0, False
    seen_weight: set[str] = set()
    for node in index.graph.node:
        kind = kind_of(node)
        if kind is None:
            continue
        macs = node_macs(index, node)
        unknown |= macs is None
        total_macs += macs or 0
        name = next((node.input[s] for s in kind.weight_slots if s < len(node.input) and node.input[s] in weights),
                    None)
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


# quantized ops: (inputs holding quantized values, inputs holding their scales and zero points)
_QUANTIZED_SLOTS = {"DequantizeLinear": ((0,), (1, 2)), "QuantizeLinear": ((), (1, 2)),
                    "ConvInteger": ((1,), (2, 3)), "MatMulInteger": ((1,), (2, 3))}


def _quantized_parts(model: LoadedModel) -> tuple[set[str], set[str]]:
    """Integer parameters of a quantized model count as parameters; their scales and zero points do not."""
    values, scales = set(), set()
    for node in model.proto.graph.node:
        value_slots, scale_slots = _QUANTIZED_SLOTS.get(node.op_type, ((), ()))
        values.update(node.input[i] for i in value_slots if i < len(node.input))
        scales.update(node.input[i] for i in scale_slots if i < len(node.input))
    return values, scales


def _sparse_parts(model: LoadedModel) -> set[str]:
    names = set()
    for s in model.proto.graph.sparse_initializer:
        names.add(s.values.name)
        names.add(s.indices.name)
    return names
