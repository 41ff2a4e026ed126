"""Numerical proof of a structured removal: the exactness oracle, usable by the tool (``--verify``) and the tests.

Removing channel set S must give the same outputs as the *original* graph with every activation of S's groups
multiplied by a 0/1 channel mask. :func:`masked_model` builds that masked original; :func:`max_difference` runs it
and the pruned model on the same inputs in onnxruntime. onnxruntime runs protos from memory here, so external data
is loaded first (:func:`in_memory`): the oracle is for models under protobuf's 2 GB limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.channels.groups import GroupSet
from onnxprune.data import tokens
from onnxprune.graph.io import LoadedModel, iter_tensors, uses_external_data
from onnxprune.graph.layers import FLOAT_TYPES


def masked_model(original: onnx.ModelProto, groups: GroupSet, remove: dict[int, np.ndarray],
                 in_place: bool = False) -> onnx.ModelProto:
    """``original`` with a Mul by a 0/1 mask after every float activation that carries a removed channel.

    Constants need no mask (their consumers' outputs are masked), and non-float tensors (boolean masks, indices)
    cannot be multiplied; every float tensor downstream of them is masked anyway. ``in_place`` edits ``original``
    itself (a caller that holds a throw-away copy saves a second one).
    """
    if in_place:
        model = original
    else:
        model = onnx.ModelProto()
        model.CopyFrom(original)
    index = groups.index
    masks: dict[str, np.ndarray] = {}
    for gid, channel_ids in remove.items():
        group = groups.groups[gid]
        for dim in group.dims:
            if index.is_constant(dim.tensor) or index.dtypes.get(dim.tensor, 1) not in FLOAT_TYPES:
                continue
            rank = index.rank(dim.tensor)
            shape = [1] * rank
            shape[dim.axis] = groups.dim_sizes[dim]
            axis_mask = np.ones(groups.dim_sizes[dim], np.float32)
            axis_mask[group.indices_of(dim, np.asarray(channel_ids))] = 0.0
            masks[dim.tensor] = masks.get(dim.tensor, np.ones([1] * rank, np.float32)) * axis_mask.reshape(shape)
    graph = model.graph
    for name, mask in masks.items():
        raw = name + "__unmasked"
        for node in graph.node:
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = raw
        dtype = onnx.helper.tensor_dtype_to_np_dtype(index.dtypes.get(name, onnx.TensorProto.FLOAT))
        graph.initializer.append(onnx.numpy_helper.from_array(mask.astype(dtype), name + "__mask"))
        graph.node.append(onnx.helper.make_node("Mul", [raw, name + "__mask"], [name]))
    del graph.value_info[:]
    return _toposort(model)


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(n in ready for n in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or a missing input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def in_memory(model: LoadedModel, copy: bool = True) -> onnx.ModelProto:
    """``model``'s proto with every tensor's values in memory, so onnxruntime can run it from bytes.

    External tensors are read with :meth:`LoadedModel.array`, which finds them in the input's data file or, for
    tensors pruning already rewrote, in the output's unfinished data file. Without ``copy`` a model that has no
    external data is returned as it is (the caller must then not change it).
    """
    external = [t for t in iter_tensors(model.proto) if uses_external_data(t)]
    if not external and not copy:
        return model.proto
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for tensor in iter_tensors(proto):
        if uses_external_data(tensor):
            tensor.CopyFrom(onnx.numpy_helper.from_array(model.array(tensor), tensor.name))
    return proto


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` in onnxruntime, unoptimised (what is compared is the graph, not a rewrite of it)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@dataclass(frozen=True)
class DynamicInput:
    """An input with a dynamic dim other than the leading (batch) one: the oracle cannot pick its size."""

    name: str
    dims: tuple[int | str, ...]  # static sizes, or the dim's symbolic name ("?" when it has none)

    @property
    def unknown(self) -> list[str]:
        return [str(d) for axis, d in enumerate(self.dims) if isinstance(d, str) and axis > 0]

    def example(self) -> str:
        """A shape to give ``--input-shape``: the static dims, 1 for the batch, N for each size to choose."""
        return "x".join(str(d) if isinstance(d, int) else ("1" if axis == 0 else "N")
                        for axis, d in enumerate(self.dims))


def feed_shapes(model: onnx.ModelProto, batch: int = 2, input_shapes: dict[str, list[int]] | None = None,
                fill_unknown: int | None = None) -> tuple[dict[str, list[int]], list[DynamicInput]]:
    """The shape of every input to feed: the given shape (checked by the caller), else the static dims with
    ``batch`` for a dynamic leading dim and ``fill_unknown`` for other dynamic dims; inputs left with an unknown
    dim come back as :class:`DynamicInput` instead."""
    given = input_shapes or {}
    inits = {t.name for t in model.graph.initializer}
    shapes: dict[str, list[int]] = {}
    dynamic: list[DynamicInput] = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name in given:
            shapes[inp.name] = list(given[inp.name])
            continue
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in inp.type.tensor_type.shape.dim]
        dims = [d if isinstance(d, int) else batch if axis == 0 else fill_unknown for axis, d in enumerate(declared)]
        if None in dims:
            dynamic.append(DynamicInput(inp.name, tuple(declared)))
        else:
            shapes[inp.name] = dims
    return shapes, dynamic


def random_values(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given shapes: floats ~ N(0, 1), integers in [0, 4) (small: they may be indices); token
    ids below their embedding table's rows and attention masks all ones (``data/tokens.py``), so a BERT-style model
    runs (its token-type table may have 2 rows)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        dims = shapes[inp.name]
        values = rng.standard_normal(dims) if np.issubdtype(dtype, np.floating) else rng.integers(0, 4, dims)
        feeds[inp.name] = values.astype(dtype)
    return tokens.valid_tokens(tokens.token_rules(model), feeds, seed)


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                 input_shapes: dict[str, list[int]] | None = None,
                 fill_unknown: int | None = None) -> dict[str, np.ndarray] | None:
    """Random inputs; dynamic dims come from ``input_shapes``, else are ``batch`` when leading and
    ``fill_unknown`` elsewhere (None when a dim stays unknown)."""
    shapes, dynamic = feed_shapes(model, batch, input_shapes, fill_unknown)
    return None if dynamic else random_values(model, shapes, seed)


def relative_difference(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Largest |difference| over all outputs, relative to max(1, the output's largest magnitude); inf when the
    outputs differ in number or shape, or either holds NaN or inf (nothing is proved by comparing those)."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for e, a in zip(expected, actual):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        if e.shape != a.shape or not (np.isfinite(e).all() and np.isfinite(a).all()):
            return float("inf")
        if e.size:
            worst = max(worst, float(np.abs(a - e).max()) / max(1.0, float(np.abs(e).max())))
    return worst


def max_difference(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """:func:`relative_difference` of the two models' outputs on ``feeds``."""
    return relative_difference(run(expected, feeds), run(actual, feeds))
