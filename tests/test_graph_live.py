"""The live GraphIndex: after every kind of edit it says what a GraphIndex freshly built on the same model says
(producers, consumers, constants, initializers, graph inputs, subgraph readers, constant shapes), so a run builds it
once; and inputs whose nodes are out of topological order are sorted and accepted (onnxruntime runs them)."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputModelError
from onnxprune.graph.check import check_input_model, sort_nodes
from onnxprune.graph.fold import fold_constant_subgraphs
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto, load_model
from onnxprune.pipeline import find_groups
from onnxprune.prune.structured import ChannelPlan, apply_plan

from conftest import MODELS, ZOO


def view(index: GraphIndex) -> dict:
    """What an index says about its graph, nodes given by their position in it (a detached copy has none)."""
    position = {id(n): k for k, n in enumerate(index.graph.node)}
    in_graph = {id(t) for t in index.graph.initializer}
    return {
        "producer": {n: (position.get(id(u.node)), u.index) for n, u in index.producer.items()},
        "consumers": {n: [(position.get(id(u.node)), u.index) for u in uses] for n, uses in index.consumers.items()
                      if uses},
        "initializers": {n: (id(t) in in_graph, t.name) for n, t in index.initializers.items()},
        "constant_nodes": {n: position.get(id(node)) for n, node in index.constant_nodes.items()},
        "graph_inputs": set(index.graph_inputs),
        "graph_outputs": set(index.graph_outputs),
        "subgraph_users": {n: position.get(id(node)) for n, node in index.subgraph_users.items()},
        "constant_shapes": {n: index.shapes.get(n) for n in [*index.initializers, *index.constant_nodes]},
    }


def assert_live(index: GraphIndex, infer: bool = True, shapes: bool = False) -> None:
    """``index`` equals a fresh index of its model (built with the same ``infer``); with ``shapes``, also on every
    shape the fresh one knows."""
    fresh = GraphIndex(index.model, infer=infer)
    assert view(index) == view(fresh)
    for name in [*fresh.initializers, *fresh.constant_nodes]:
        np.testing.assert_array_equal(index.const_value(name), fresh.const_value(name), err_msg=name)
    if shapes:
        known = {n: s for n, s in fresh.shapes.items() if s is not None and None not in s}
        assert {n: index.shape(n) for n in known} == known
        assert {n: index.dtypes.get(n) for n in fresh.dtypes} == fresh.dtypes


def _small_model(ir_version: int = 8) -> onnx.ModelProto:
    """x[1, 4] -> MatMul W -> Add B -> Mul by a Constant node -> Relu -> Add (residual) -> y, plus an unused V."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (4, 4)), ("B", (4,)), ("V", (4,)))]
    nodes = [helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0, 4.0]),
             helper.make_node("MatMul", ["x", "W"], ["a"], "mm"),
             helper.make_node("Add", ["a", "B"], ["b"], "bias"),
             helper.make_node("Mul", ["b", "c"], ["d"], "scale"),
             helper.make_node("Relu", ["d"], ["e"], "relu"),
             helper.make_node("Add", ["e", "a"], ["y"], "residual")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    if ir_version < 4:  # initializers declared as graph inputs too
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in weights]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


def _node(index: GraphIndex, name: str) -> onnx.NodeProto:
    return next(n for n in index.graph.node if n.name == name)


# -- each kind of edit ------------------------------------------------------------------------------------------------

def test_set_input_rewires_and_adds_a_slot():
    index = GraphIndex(from_proto(_small_model()))
    index.set_input(_node(index, "residual"), 1, "b")
    assert_live(index)
    conv_like = _node(index, "mm")
    index.set_input(conv_like, 3, "V")  # slots 2 added empty
    assert list(conv_like.input) == ["x", "W", "", "V"]
    assert_live(index)
    index.set_input(conv_like, 3, "")
    assert_live(index)


def test_a_new_bias_is_an_initializer_and_an_input():
    """What recovery's add_bias does: a fresh name, an initializer, the node's optional input."""
    index = GraphIndex(from_proto(_small_model()))
    node = _node(index, "mm")
    name = index.add_initializer(index.fresh_name("W_bias"), np.ones(4, dtype=np.float32))
    index.set_input(node, 2, name)
    assert name == "W_bias" and index.fresh_name("W_bias") == "W_bias1"
    assert index.consumers_of(name)[0].node is node and index.shape(name) == [4]
    assert_live(index, shapes=True)


@pytest.mark.parametrize("name", ["W", "c"])
def test_set_constant_on_an_initializer_and_a_constant_node(name):
    index = GraphIndex(from_proto(_small_model()))
    index.const_value(name)  # cached first: the edit must not leave the old value behind
    value = np.arange(12, dtype=np.float32).reshape(3, 4) if name == "W" else np.arange(3, dtype=np.float32)
    index.set_constant(name, value)
    np.testing.assert_array_equal(index.const_value(name), value)
    assert index.shape(name) == list(value.shape)
    assert_live(index)


def test_set_constant_updates_the_graph_input_declaration_before_ir_4():
    index = GraphIndex(from_proto(_small_model(ir_version=3)))
    index.set_constant("B", np.zeros(2, dtype=np.float32))
    declared = next(i for i in index.graph.input if i.name == "B")
    assert [d.dim_value for d in declared.type.tensor_type.shape.dim] == [2]
    assert_live(index)


def test_set_input_value_copies_a_shared_constant():
    model = _small_model()
    model.graph.node[3].input[1] = "B"  # Mul now reads B too: B has two readers
    index = GraphIndex(from_proto(model))
    before = index.const_value("B").copy()
    index.set_input_value(_node(index, "scale"), 1, np.full(4, 7, dtype=np.float32))
    assert _node(index, "scale").input[1] == "B_pruned0"
    np.testing.assert_array_equal(index.const_value("B"), before)  # the other reader keeps its value
    assert_live(index)
    index.set_input_value(_node(index, "scale"), 1, np.full(4, 8, dtype=np.float32))  # now sole reader: in place
    assert _node(index, "scale").input[1] == "B_pruned0"
    assert_live(index)


@pytest.mark.parametrize("ir_version", [3, 8])
def test_removing_initializers(ir_version):
    index = GraphIndex(from_proto(_small_model(ir_version)))
    tensors = {n: t for n, t in index.initializers.items() if n != "V"}
    assert index.drop_unused_initializers() == 1  # V
    assert "V" not in index.initializers and all(index.initializers[n] is t for n, t in tensors.items())
    assert "V" not in {i.name for i in index.graph.input}
    assert_live(index)
    index.remove_initializer("B")  # still read: the caller's business, but the index must agree
    assert_live(index)


def test_removing_nodes():
    index = GraphIndex(from_proto(_small_model()))
    index.remove_nodes([_node(index, "scale"), next(n for n in index.graph.node if n.op_type == "Constant")])
    assert "d" not in index.producer and "c" not in index.constant_nodes and len(index.graph.node) == 4
    assert_live(index)


def test_folding_edits_through_the_index():
    """Identity/Cast/Transpose of a weight folded into initializers: producers, consumers and shapes stay true."""
    model = _small_model()
    graph = model.graph
    graph.node[1].input[1] = "Wt"
    graph.node.insert(1, helper.make_node("Transpose", ["Wc"], ["Wt"], "t", perm=[1, 0]))
    graph.node.insert(1, helper.make_node("Cast", ["Wi"], ["Wc"], "cast", to=TensorProto.FLOAT))
    graph.node.insert(1, helper.make_node("Identity", ["W"], ["Wi"], "tie"))
    index = GraphIndex(from_proto(model))
    assert fold_constant_subgraphs(index) == 3
    assert index.is_constant("Wt") and "Wi" not in index.initializers
    assert_live(index, shapes=True)


@pytest.mark.parametrize("name", ZOO)
def test_channel_removal_leaves_a_true_index(name):
    """apply_plan on a zoo model: the index afterwards is what a fresh one says, shapes of run-time tensors included
    (the pipeline goes on with it to weight sparsity instead of rebuilding it)."""
    model = from_proto(onnx.load(str(MODELS / name)))
    groups = find_groups(model)
    rng = np.random.default_rng(0)
    remove = {g.id: np.sort(rng.choice(g.size, size=max(1, g.size // 3), replace=False)) for g in groups.prunable()}
    apply_plan(groups, ChannelPlan(remove))
    assert_live(groups.index, shapes=True)


# -- random edit sequences --------------------------------------------------------------------------------------------

EDITS = st.lists(st.tuples(st.sampled_from(["rewire", "set_constant", "set_value", "add", "remove_init",
                                            "drop_unused", "remove_node"]),
                           st.integers(0, 50), st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EDITS)
def test_random_edit_sequences_keep_the_index_true(edits):
    index = GraphIndex(from_proto(_small_model()), infer=False)
    for kind, a, slot, b in edits:
        nodes = list(index.graph.node)
        names = sorted({*index.initializers, *index.producer, *index.graph_inputs})
        constants = sorted({*index.initializers, *index.constant_nodes})
        value = np.arange(b % 5 + 1, dtype=np.float32)
        if kind == "rewire" and nodes:
            index.set_input(nodes[a % len(nodes)], slot, "" if b % 7 == 0 else names[b % len(names)])
        elif kind == "set_constant" and constants:
            index.set_constant(constants[a % len(constants)], value)
        elif kind == "set_value" and nodes:
            index.set_input_value(nodes[a % len(nodes)], slot, value)
        elif kind == "add":
            name = index.add_initializer(index.fresh_name("extra"), value)
            if nodes:
                index.set_input(nodes[a % len(nodes)], slot, name)
        elif kind == "remove_init" and index.initializers:
            index.remove_initializer(sorted(index.initializers)[a % len(index.initializers)])
        elif kind == "drop_unused":
            index.drop_unused_initializers()
        elif kind == "remove_node" and nodes:
            index.remove_nodes([nodes[a % len(nodes)]])
        assert_live(index, infer=False)


# -- inputs out of topological order ----------------------------------------------------------------------------------

def _order(graph: onnx.GraphProto) -> list[str]:
    return [n.name or n.output[0] for n in graph.node]


def test_sort_nodes_leaves_sorted_and_cyclic_graphs_alone():
    graph = _small_model().graph
    before = _order(graph)
    assert not sort_nodes(graph) and _order(graph) == before
    graph.node[1].input[0] = "y"  # MatMul reads the last output: a cycle
    cyclic = _order(graph)
    assert not sort_nodes(graph) and _order(graph) == cyclic


def test_sort_nodes_moves_only_what_it_must():
    graph = _small_model().graph
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([nodes[4], *nodes[:4], nodes[5]])  # Relu first, before what it reads
    assert sort_nodes(graph)
    assert _order(graph) == ["c", "mm", "bias", "scale", "relu", "residual"]


def test_an_unsorted_input_is_sorted_and_accepted(tmp_path):
    proto = _small_model()
    nodes = list(proto.graph.node)
    random.Random(0).shuffle(nodes)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    path = tmp_path / "unsorted.onnx"
    onnx.save(proto, path)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(path), full_check=True)
    model = load_model(path)
    assert check_input_model(model) is True
    onnx.checker.check_model(model.proto, full_check=True)


def test_an_unsorted_external_data_input_is_accepted_and_pruned(model_copy, tmp_path):
    """The checker judges the sorted graph in memory, where it cannot find external data: that data is checked at
    load and by onnxruntime, which reads the file."""
    from onnxprune.pipeline import PruneOptions, prune_file

    path = model_copy("resnet_dynamo.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    unsorted = path.with_name("unsorted.onnx")
    onnx.save(proto, str(unsorted))
    assert check_input_model(load_model(unsorted))
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    prune_file(unsorted, out, PruneOptions(channels=0.3, round_to=1))
    onnx.checker.check_model(str(out), full_check=True)  # written sorted


def test_a_cycle_is_still_refused(tmp_path):
    proto = _small_model()
    proto.graph.node[1].input[0] = "y"
    path = tmp_path / "cycle.onnx"
    onnx.save(proto, path)
    with pytest.raises(InputModelError, match="not a valid ONNX model"):
        check_input_model(load_model(path))
