"""Helpers for the per-op rule tests (test_rules_*.py).

Every model is written in ONNX text syntax. Graph inputs whose name starts with ``x`` are data; every other graph
input is turned into a random initializer of its declared shape (or, with ``constants=True``, a Constant node), so
the text stays short. Integer shape constants are written as initializers in the text.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from oracle import assert_matches, masked_model, random_feeds

from onnxprune.channels import Dim
from onnxprune.graph.io import from_proto
from onnxprune.pipeline import find_groups
from onnxprune.prune.structured import ChannelPlan, apply_plan

def make(text: str, constants: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Parse ``text``; non-``x`` graph inputs become random float initializers (or Constant nodes)."""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    graph = proto.graph
    data, weights = [], []
    for inp in graph.input:
        (data if inp.name.startswith("x") else weights).append(inp)
    made = []
    for inp in weights:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        value = rng.standard_normal(dims).astype(np.float32)
        if "var" in inp.name:
            value = np.abs(value) + 0.5
        made.append(onnx.numpy_helper.from_array(value, inp.name))
    del graph.input[:]
    graph.input.extend(data)
    if constants:
        consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in list(graph.initializer) + made]
        del graph.initializer[:]
        nodes = consts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    else:
        graph.initializer.extend(made)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def groups_of(proto: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    model = from_proto(copy)
    return model, find_groups(model)


def groups_touching(gs, tensor: str, axis: int = 1) -> list:
    return [g for g in gs.groups if Dim(tensor, axis) in g.dims]


def group_of(gs, tensor: str, axis: int = 1):
    """The one group touching ``tensor`` axis ``axis`` (a Split or Slice input is shared by several groups)."""
    found = groups_touching(gs, tensor, axis)
    assert len(found) == 1, f"{len(found)} groups touch {tensor}:{axis}: {[(g.id, g.dims) for g in gs.groups]}"
    return found[0]


def assert_blocked(gs, tensor: str, *words: str, axis: int = 1):
    group = group_of(gs, tensor, axis)
    assert not group.prunable, f"group of {tensor} should be blocked, dims {group.dims}"
    text = " | ".join(group.blocked)
    for word in words:
        assert word in text, f"expected {word!r} in the reasons: {text}"
    return group


def assert_prunable(gs, tensor: str, size: int | None = None, axis: int = 1):
    group = group_of(gs, tensor, axis)
    assert group.prunable, f"group of {tensor} is blocked: {group.blocked}"
    if size is not None:
        assert group.size == size, (group.size, size)
    return group


def oracle(proto: onnx.ModelProto, remove: dict[str, list[int]] | None = None, seed: int = 0,
           expect_groups: int = 1) -> tuple:
    """Remove channels (``{tensor[:axis] or group id: channel ids}``, or a random proper subset
    of every prunable group) and compare against the masked original. Returns (groups, pruned proto, kept)."""
    model, gs = groups_of(proto)
    rng = np.random.default_rng(seed)
    if remove is None:
        plan = {g.id: np.sort(rng.choice(g.size, size=int(rng.integers(1, g.size)), replace=False))
                for g in gs.prunable() if g.size > 1}
    else:
        plan = {}
        for name, ids in remove.items():
            if isinstance(name, int):
                plan[name] = np.asarray(ids, dtype=np.int64)
                continue
            tensor, _, axis = name.partition(":")
            plan[group_of(gs, tensor, int(axis or 1)).id] = np.asarray(ids, dtype=np.int64)
    assert len(plan) >= expect_groups, f"expected {expect_groups} prunable groups, got {len(plan)}"
    masked = masked_model(proto, gs, plan)
    kept = apply_plan(gs, ChannelPlan(plan))
    onnx.checker.check_model(model.proto, full_check=True)
    assert_matches(masked, model.proto, random_feeds(proto))
    return gs, model.proto, kept


def init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for t in proto.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return onnx.numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def node_attr(proto: onnx.ModelProto, name: str, attribute: str):
    node = next(n for n in proto.graph.node if n.name == name)
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == attribute), None)


def input_value(proto: onnx.ModelProto, node_name: str, position: int) -> np.ndarray:
    node = next(n for n in proto.graph.node if n.name == node_name)
    return init(proto, node.input[position])


OPSET13 = '<ir_version: 8, opset_import: ["" : 13]>'
OPSET17 = '<ir_version: 8, opset_import: ["" : 17]>'
OPSET18 = '<ir_version: 8, opset_import: ["" : 18]>'
OPSET21 = '<ir_version: 10, opset_import: ["" : 21]>'
