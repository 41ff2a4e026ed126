"""The exactness oracle for structured pruning.

Removing channel set S must give the same outputs as the *original* graph with every activation of S's groups
multiplied by a 0/1 channel mask. ``masked_model`` builds that masked original; ``assert_matches`` runs both in
onnxruntime and compares.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.dependency import GroupSet


def masked_model(original: onnx.ModelProto, groups: GroupSet, remove: dict[int, np.ndarray]) -> onnx.ModelProto:
    """``original`` with a Mul by a 0/1 mask after every non-constant tensor that carries a removed channel."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    masks: dict[str, np.ndarray] = {}
    index = groups.index
    for gid, channel_ids in remove.items():
        group = groups.groups[gid]
        for c in channel_ids:
            for dim, idx in group.channels[int(c)].items():
                if index.is_constant(dim.tensor):
                    continue
                rank = index.rank(dim.tensor)
                shape = [1] * rank
                shape[dim.axis] = groups.dim_sizes[dim]
                mask = masks.setdefault(dim.tensor, np.ones([1] * rank, np.float32))
                axis_mask = np.ones(shape, np.float32)
                np.put_along_axis(axis_mask, idx.reshape([-1 if a == dim.axis else 1 for a in range(rank)]),
                                  0.0, axis=dim.axis)
                masks[dim.tensor] = mask * axis_mask
    graph = model.graph
    for name, mask in masks.items():
        raw = name + "__unmasked"
        for node in graph.node:
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = raw
        graph.initializer.append(onnx.numpy_helper.from_array(mask, name + "__mask"))
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
            raise AssertionError("graph has a cycle or a missing input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def assert_matches(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   rtol: float = 1e-3, atol: float = 1e-4) -> None:
    for e, a in zip(run(expected, feeds), run(actual, feeds)):
        assert e.shape == a.shape, (e.shape, a.shape)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)
