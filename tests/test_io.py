"""Model I/O: clear errors for bad files, atomic writes, external data, Constant-node weights, subgraphs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxprune.errors import InputModelError, OutputError
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import load_model, save_model
from onnxprune.prune.unstructured import prune_unstructured

from conftest import MODELS
from oracle import first_output


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.onnx", "no such file"),
    "directory": (lambda d: d, "is a directory"),
    "empty": (lambda d: _write(d / "empty.onnx", b""), "empty"),
    "text": (lambda d: _write(d / "text.onnx", b"hello, I am not a model\n" * 10), "not"),
    "truncated": (lambda d: _write(d / "trunc.onnx", (MODELS / "resnet_bn.onnx").read_bytes()[:5000]), "ONNX"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(tmp_path, case):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputModelError, match=message):
        load_model(path)


def test_missing_and_truncated_external_data(model_copy, tmp_path):
    path = model_copy("resnet_dynamo.onnx")
    data = tmp_path / "resnet_dynamo.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(InputModelError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(InputModelError, match="missing"):
        load_model(path)


def test_external_data_round_trip_streams_and_keeps_input(model_copy, tmp_path):
    path = model_copy("resnet_dynamo.onnx")
    before = {p.name: _bytes(p) for p in tmp_path.iterdir()}
    model = load_model(path)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    model.open_output(out)
    index = GraphIndex(model)
    result = prune_unstructured(index, sparsity=0.5)
    save_model(model, out)
    assert {p.name: _bytes(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert (out.parent / "pruned.onnx.data").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    reloaded = onnx.load(str(out))
    zeros = sum(int((numpy_helper.to_array(t, base_dir=str(out.parent)) == 0).sum())
                for t in reloaded.graph.initializer if t.name in {w.name for w in result.weights})
    assert zeros == result.zeros_after
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_refuses_to_overwrite_input(model_copy):
    path = model_copy("resnet_bn.onnx")
    model = load_model(path)
    with pytest.raises(OutputError, match="refusing"):
        save_model(model, path)


def test_unwritable_folder_leaves_nothing(model_copy, tmp_path):
    if os.geteuid() == 0:
        missing = tmp_path / "does" / "not" / "exist" / "out.onnx"
        with pytest.raises(OutputError, match="does not exist"):
            save_model(load_model(model_copy("resnet_bn.onnx")), missing)
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(OutputError, match="not writable"):
        save_model(load_model(model_copy("resnet_bn.onnx")), folder / "out.onnx")


def test_failed_check_leaves_no_partial_file(model_copy, tmp_path):
    model = load_model(model_copy("resnet_bn.onnx"))
    model.proto.graph.node[0].input[0] = "nonexistent_tensor"  # break the graph
    out = tmp_path / "broken.onnx"
    with pytest.raises(OutputError, match="failed its check"):
        save_model(model, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["resnet_bn.onnx"]


def test_constant_node_weights_are_prunable(model_copy):
    model = load_model(model_copy("resnet_constants.onnx"))
    assert len(model.proto.graph.initializer) == 0
    result = prune_unstructured(GraphIndex(model), sparsity=0.5)
    assert len(result.weights) == 11
    assert all(abs(w.zeros_after / w.params - 0.5) <= 1 / w.params for w in result.weights)


def test_subgraph_models_pass_through(tmp_path):
    """A model with an If node loads, prunes the weights outside it and keeps the subgraph untouched."""
    then_graph = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [2, 4])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [2, 4])])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("If", ["c"], ["z"], then_branch=then_graph, else_branch=else_graph)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "if.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    before = model.proto.graph.node[1].SerializeToString()
    prune_unstructured(GraphIndex(model), sparsity=0.5)
    save_model(model, tmp_path / "if.pruned.onnx")
    after = onnx.load(str(tmp_path / "if.pruned.onnx"))
    assert after.graph.node[1].SerializeToString() == before
    assert int((numpy_helper.to_array(after.graph.initializer[0]) == 0).sum()) == 8


def test_large_models_switch_to_external_data(model_copy, tmp_path, monkeypatch):
    """Over the inline limit the output gets a .data file (the limit is lowered so the test stays small)."""
    import onnxprune.graph.io as io

    monkeypatch.setattr(io, "INLINE_LIMIT_BYTES", 10_000)
    model = load_model(model_copy("vgg_bn.onnx"))
    assert model.external
    out = tmp_path / "big" / "m.onnx"
    out.parent.mkdir()
    model.open_output(out)
    prune_unstructured(GraphIndex(model), sparsity=0.5)
    save_model(model, out)
    assert (out.parent / "m.onnx.data").stat().st_size > out.stat().st_size
    first_output(out, {"input": np.zeros((1, 3, 32, 32), np.float32)})


def test_public_api_round_trip(model_copy, tmp_path):
    import onnxprune

    model = onnxprune.load_model(model_copy("resnet_bn.onnx"))
    groups = onnxprune.find_groups(model)
    plan = onnxprune.ChannelPlan({g.id: np.array([0, 3]) for g in groups.prunable()})
    onnxprune.apply_plan(groups, plan)
    onnxprune.save_model(model, tmp_path / "p.onnx")
    assert onnxprune.model_stats(onnxprune.load_model(tmp_path / "p.onnx")).params < 43706
