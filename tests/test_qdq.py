"""Already-quantized input: channels are removed through QuantizeLinear/DequantizeLinear pairs of QDQ models made by
onnxruntime.quantization from the zoo. Oracle: the pruned QDQ model computes what the original QDQ model computes with
the removed channels masked to zero in the float domain (a removed channel's dequantized weights and activations are
zero); per-channel scales and zero points are sliced with their channels, per-tensor ones kept; channels are scored
on the dequantized weights; an op without a rule (MatMulNBits) freezes its group with its name in the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.channels.qdq import dequantized_value
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.prune.structured import ChannelPlan, apply_plan
from oracle import assert_matches, masked_model, random_feeds

from cli_support import assert_one_error, run_main
from conftest import MODELS

# per-channel weights on models with residual adds, depthwise convs, concats and a split; per-tensor on one
CASES = [("resnet_bn.onnx", True), ("mobilenetv2_bn.onnx", True), ("densenet_bn.onnx", True), ("csp_bn.onnx", True),
         ("resnet_bn.onnx", False)]


class _Reader:
    def __init__(self, model: onnx.ModelProto) -> None:
        self._feeds = iter([random_feeds(model, batch=2, seed=s) for s in range(4)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _quantized(name: str, folder: Path, per_channel: bool) -> onnx.ModelProto:
    """The zoo model through onnxruntime's own static QDQ quantization (its defaults, int8 weights)."""
    from onnxruntime import quantization as q

    class Reader(_Reader, q.CalibrationDataReader):
        pass

    source = onnx.load(str(MODELS / name))
    target = folder / f"{Path(name).stem}.qdq.onnx"
    q.quantize_static(str(MODELS / name), str(target), Reader(source), quant_format=q.QuantFormat.QDQ,
                      per_channel=per_channel)
    return onnx.load(str(target))


def _weight_dequantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    constants = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
            and numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[0])).dtype == np.int8]


@pytest.mark.parametrize(("name", "per_channel"), CASES)
def test_random_removal_through_qdq_matches_the_masked_original(name, per_channel, tmp_path):
    original = _quantized(name, tmp_path, per_channel)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    model = from_proto(copy)
    groups = find_groups(model)
    prunable = groups.prunable()
    assert len(prunable) >= 3, f"{name}: {[(g.id, g.blocked) for g in groups.groups]}"
    rng = np.random.default_rng(0)
    remove = {g.id: np.sort(rng.choice(g.size, size=int(rng.integers(1, g.size)), replace=False)) for g in prunable}
    masked = masked_model(original, groups, remove)
    # the oracle can fail here: the same removal compared with a mask at other channels differs
    wrong = masked_model(original, groups, {gid: (ids + 1) % groups.groups[gid].size for gid, ids in remove.items()})
    apply_plan(groups, ChannelPlan(remove))
    onnx.checker.check_model(model.proto, full_check=True)
    feeds = random_feeds(original, batch=2)
    with pytest.raises(AssertionError):
        assert_matches(wrong, model.proto, feeds, rtol=1e-5, atol=1e-5)
    # the activations' grids are per tensor: a removed channel changes no kept value, so the match is exact
    assert_matches(masked, model.proto, feeds, rtol=1e-5, atol=1e-5)
    # every weight's scale still fits its weight: per-channel ones were sliced, per-tensor ones kept
    index = GraphIndex(model)
    for dq in _weight_dequantizers(model.proto):
        scale = index.const_value(dq.input[1])
        weight_shape = index.shape(dq.input[0])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if per_channel and axis < len(weight_shape):  # a BatchNormalization parameter gets a per-tensor scale
            assert scale.size == weight_shape[axis], dq.name
        else:
            assert scale.size == 1, dq.name


def _dequantized_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every DequantizeLinear of a constant weight replaced by its float value: the weights the QDQ
    model computes with, in a model the float path scores."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    index = GraphIndex(from_proto(model))
    graph = result.graph
    for dq in _weight_dequantizers(model):
        graph.initializer.append(numpy_helper.from_array(dequantized_value(index, dq).astype(np.float32), dq.output[0]))
        graph.node.remove(next(n for n in graph.node if n.name == dq.name))
    return result


def test_channels_are_scored_on_the_dequantized_weights(tmp_path):
    """The QDQ model and the float model holding its dequantized weights lose the same channels (l1)."""
    qdq = _quantized("resnet_bn.onnx", tmp_path, per_channel=True)
    options = PruneOptions(channels=0.3, round_to=1)
    kept = []
    for proto in (qdq, _dequantized_float(qdq)):
        model = from_proto(proto)
        report = prune_model(model, options)
        kept.append([(g.producers, g.after) for g in report.groups])
        weights = {n.name: n.input[1] for n in model.proto.graph.node if n.op_type == "Conv"}
        kept.append({name: GraphIndex(model).shape(w) for name, w in weights.items()})
    assert kept[0] == kept[2] and kept[1] == kept[3]
    assert any(after < 64 for _, after in kept[0])


def _nbits_model(exclude: list[str]) -> onnx.ModelProto:
    """x -> [MatMul mm0 (64 -> 48) + MatMul mm1 (64 -> 48)] -> Relu -> MatMul mm2 (48 -> 10), the MatMuls not in
    ``exclude`` turned into 4-bit MatMulNBits (block 32, with zero points) by onnxruntime's own quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w0", (64, 48)), ("w1", (64, 48)), ("w2", (48, 10)))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], "mm0"), helper.make_node("MatMul", ["x", "w1"], ["h1"], "mm1"),
             helper.make_node("Add", ["h0", "h1"], ["h"], "add"), helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], weights)
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                     block_size=32, is_symmetric=False, nodes_to_exclude=exclude)
    quantizer.process()
    model = quantizer.model.model
    # onnx's shape inference does not know com.microsoft ops: the output shape is recorded, as exporters do
    model.graph.value_info.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 48]) for n in ("h0", "h1"))
    return model


def test_matmul_nbits_output_features_are_removed_row_by_row():
    """The 4-bit layer's output rows (packed weights, scales, zero points) go with its features when a group reaches
    them (here through the residual add: MatMulNBits is not a layer of its own in graph/layers.py, so it seeds no
    group); exact by the oracle, N updated."""
    original = _nbits_model(exclude=["mm0", "mm2"])
    assert [n.op_type for n in original.graph.node] == ["MatMul", "MatMulNBits", "Add", "Relu", "MatMul"]
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    model = from_proto(copy)
    groups = find_groups(model)
    [group] = groups.prunable()
    remove = {group.id: np.array([0, 5, 6, 30, 47])}
    masked = masked_model(original, groups, remove)
    apply_plan(groups, ChannelPlan(remove))
    nbits = model.proto.graph.node[1]
    assert next(a.i for a in nbits.attribute if a.name == "N") == 43
    shapes = {t.name: list(t.dims) for t in model.proto.graph.initializer}
    assert shapes["w1_Q4"][0] == shapes["w1_scales"][0] == shapes["w1_zero_points"][0] == 43
    assert_matches(masked, model.proto, random_feeds(original, batch=3), rtol=1e-5, atol=1e-5)


def test_matmul_nbits_input_features_freeze_their_group_by_name():
    """Input features are packed into 32-wide quantization blocks: the group feeding a MatMulNBits is kept, and the
    report names the node and why."""
    groups = find_groups(from_proto(_nbits_model(exclude=["mm0"])))
    assert not groups.prunable()
    hidden = next(g for g in groups.groups if any(d.tensor == "h" for d in g.dims))
    assert any("MatMulNBits packs its input features 32 to a quantization block" in reason
               for reason in hidden.blocked), hidden.blocked
    assert any("mm2" in reason for reason in hidden.blocked), hidden.blocked


def test_quantizing_a_quantized_model_is_refused_before_any_work(tmp_path, capsys):
    _quantized("resnet_bn.onnx", tmp_path, per_channel=True)
    source, out = tmp_path / "resnet_bn.qdq.onnx", tmp_path / "out.onnx"
    code, _, err = run_main([source, "--channels", "0.3", "--quantize", "int8-dynamic", "-o", out], capsys)
    assert code == 2 and not out.exists()
    assert_one_error(err, "quantized already", "DequantizeLinear", "without --quantize")
