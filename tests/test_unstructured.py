"""Unstructured pruning: exact zero counts, N:M groups, overrides, and only values change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto, load_model
from onnxprune.pipeline import PruneOptions, prune_file
from onnxprune.prune.unstructured import parse_pattern, prune_unstructured

from conftest import MODELS, ZOO
from oracle import first_output


def _weights(model, names):
    index = GraphIndex(model)
    return {n: index.const_value(n) for n in names}


def _structure(proto: onnx.ModelProto) -> list:
    return [(n.op_type, list(n.input), list(n.output), n.SerializeToString() if n.op_type != "Constant" else b"")
            for n in proto.graph.node] + [(t.name, list(t.dims), t.data_type) for t in proto.graph.initializer]


@pytest.mark.parametrize("name", ZOO)
def test_layer_scope_exact_counts_on_zoo(name, model_copy, tmp_path):
    path = model_copy(name)
    original = load_model(path)
    report = prune_file(path, tmp_path / "out.onnx", PruneOptions(sparsity=0.5))
    weights = report.unstructured.weights
    assert weights, name
    pruned = load_model(tmp_path / "out.onnx")
    values = _weights(pruned, [w.name for w in weights])
    for w in weights:
        zeros = int(np.count_nonzero(values[w.name] == 0))
        assert zeros == w.zeros_after == max(w.zeros_before, int(round(0.5 * w.params))), w.name
    assert _structure(pruned.proto) == _structure(original.proto)  # only values changed
    feeds = {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in pruned.proto.graph.input if i.name not in {t.name for t in pruned.proto.graph.initializer}}
    first_output(tmp_path / "out.onnx", feeds)


def test_global_scope_exact_total_and_uneven_layers():
    model = load_model(MODELS / "vgg_bn.onnx")
    index = GraphIndex(model)
    result = prune_unstructured(index, sparsity=0.6, scope="global")
    total = result.params
    assert result.zeros_after == int(round(0.6 * total))
    ratios = [w.zeros_after / w.params for w in result.weights]
    assert max(ratios) - min(ratios) > 0.05  # a real global ranking, not the same ratio everywhere
    # every kept weight is at least as large as every zeroed weight, across tensors
    kept_min = min(np.abs(index.const_value(w.name)[index.const_value(w.name) != 0]).min() for w in result.weights)
    original = load_model(MODELS / "vgg_bn.onnx")
    orig_index = GraphIndex(original)
    zeroed_max = max(np.abs(orig_index.const_value(w.name)[index.const_value(w.name) == 0]).max()
                     for w in result.weights)
    assert zeroed_max <= kept_min


def test_n_m_pattern_group_by_group():
    model = load_model(MODELS / "resnet_bn.onnx")
    index = GraphIndex(model)
    result = prune_unstructured(index, pattern=parse_pattern("2:4"))
    checked = 0
    for w in result.weights:
        if w.skipped:
            assert w.shape[w.reduction_axis] % 4
            continue
        groups = np.moveaxis(index.const_value(w.name), w.reduction_axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) <= 2).all()
        checked += 1
    assert checked >= 8


def test_overrides_exclude_and_min_params():
    model = load_model(MODELS / "resnet_bn.onnx")
    result = prune_unstructured(GraphIndex(model), sparsity=0.5, exclude=("/stem/*",),
                                layer_sparsity=(("*layer2*", 0.8),), min_params=300)
    by_node = {w.node: w for w in result.weights}
    assert by_node["/stem/stem.0/Conv"].skipped == "excluded"
    assert by_node["/fc/Gemm"].skipped is None
    for w in result.weights:
        if w.skipped:
            continue
        expected = 0.8 if "layer2" in w.node else 0.5
        assert w.zeros_after == int(round(expected * w.params))


def test_sparse_storage_shrinks_file_and_runs(model_copy, tmp_path):
    path = model_copy("vgg_bn.onnx")
    dense = prune_file(path, tmp_path / "dense.onnx", PruneOptions(sparsity=0.9))
    sparse = prune_file(path, tmp_path / "sparse.onnx", PruneOptions(sparsity=0.9, sparse_storage=True))
    assert sparse.output_size < 0.5 * dense.output_size
    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    a, b = first_output(tmp_path / "dense.onnx", feeds), first_output(tmp_path / "sparse.onnx", feeds)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(0, 0.99), rows=st.integers(1, 24), cols=st.integers(1, 24),
       scope=st.sampled_from(["layer", "global"]), seed=st.integers(0, 2**16), fp16=st.booleans())
def test_property_exact_counts(ratio, rows, cols, scope, seed, fp16):
    rng = np.random.default_rng(seed)
    dtype = np.float16 if fp16 else np.float32
    a = rng.standard_normal((rows, cols)).astype(dtype)
    b = rng.standard_normal((cols, 5)).astype(dtype)
    a[rng.random(a.shape) < 0.1] = 0  # some zeros already, and duplicates in fp16
    elem = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem, [1, rows])], [helper.make_tensor_value_info("y", elem, [1, 5])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    index = GraphIndex(model)
    result = prune_unstructured(index, sparsity=ratio, scope=scope)
    zeros = {n: int(np.count_nonzero(index.const_value(n) == 0)) for n in ("a", "b")}
    if scope == "layer":
        for w in result.weights:
            assert zeros[w.name] == max(w.zeros_before, int(round(ratio * w.params)))
    else:
        before = result.zeros_before
        assert sum(zeros.values()) == max(before, int(round(ratio * result.params)))


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=5), rounding=st.sampled_from([None, 1, 0]),
       fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_global_threshold_matches_radix_select(sizes, rounding, fraction, seed):
    """The sampled bracket must give exactly the radix-select answer, ties and duplicates included."""
    from onnxprune.prune.unstructured import WeightInfo, _global_threshold, _radix_threshold

    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    if rounding is not None:
        arrays = [np.round(a, rounding) for a in arrays]
    weights = [WeightInfo(f"w{i}", "", "", a.shape, 0) for i, a in enumerate(arrays)]
    scores = {w.name: np.abs(a).view(np.uint32) for w, a in zip(weights, arrays)}
    count = max(1, int(fraction * sum(sizes)))
    assert _global_threshold(lambda w: scores[w.name], weights, count) == \
        _radix_threshold(lambda w: scores[w.name], weights, count)
