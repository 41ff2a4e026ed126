"""Numerical proof of a structured removal: the exactness oracle, usable by the tool (``--verify``) and the tests.

Removing channel set S must give the same outputs as the *original* graph with every activation of S's groups
multiplied by a 0/1 channel mask. :func:`masked_model` builds that masked original; :func:`max_difference` runs it
and the pruned model on the same inputs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.dependency import GroupSet

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def masked_model(original: onnx.ModelProto, groups: GroupSet, remove: dict[int, np.ndarray]) -> onnx.ModelProto:
    """``original`` with a Mul by a 0/1 mask after every float activation that carries a removed channel.

    Constants need no mask (their consumers' outputs are masked), and non-float tensors (boolean masks, indices)
    cannot be multiplied; every float tensor downstream of them is masked anyway.
    """
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


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` in onnxruntime, unoptimised (what is compared is the graph, not a rewrite of it)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                 input_shapes: dict[str, list[int]] | None = None,
                 fill_unknown: int | None = None) -> dict[str, np.ndarray] | None:
    """Random inputs; dynamic dims come from ``input_shapes``, else are ``batch`` when leading and
    ``fill_unknown`` elsewhere (None when a dim stays unknown)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        given = (input_shapes or {}).get(inp.name)
        dims = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif given is not None:
                dims.append(given[axis])
            elif axis == 0:
                dims.append(batch)
            elif fill_unknown is not None:
                dims.append(fill_unknown)
            else:
                return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        values = rng.standard_normal(dims) if np.issubdtype(dtype, np.floating) else rng.integers(0, 4, dims)
        feeds[inp.name] = values.astype(dtype)
    return feeds


def max_difference(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Largest |difference| over all outputs, relative to max(1, the output's largest magnitude)."""
    worst = 0.0
    for e, a in zip(run(expected, feeds), run(actual, feeds)):
        if e.shape != a.shape:
            return float("inf")
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        worst = max(worst, float(np.abs(a.astype(np.float64) - e).max()) / scale if e.size else 0.0)
    return worst
