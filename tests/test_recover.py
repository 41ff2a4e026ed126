"""Recovery from calibration data: no-ops where nothing was lost, exact where a linear fix exists, never worse."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.channels import Dim
from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.prune.structured import ChannelPlan, apply_plan
from onnxprune.recovery.recover import recover

from conftest import MODELS
from cli_support import run_main
from oracle import first_output

RNG = np.random.default_rng(0)


def _two_convs(w1: np.ndarray, b1: np.ndarray | None, relu: bool) -> onnx.ModelProto:
    w2 = RNG.standard_normal((3, w1.shape[0], 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    conv1_inputs = ["x", "w1"]
    if b1 is not None:
        inits.append(numpy_helper.from_array(b1, "b1"))
        conv1_inputs.append("b1")
    nodes = [helper.make_node("Conv", conv1_inputs, ["h"], pads=[1, 1, 1, 1])]
    nodes.append(helper.make_node("Relu", ["h"], ["a"]) if relu else helper.make_node("Identity", ["h"], ["a"]))
    nodes.append(helper.make_node("Conv", ["a", "w2"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _prune_and_recover(proto, channels, method, damp=0.01):
    model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    groups = find_groups(model)
    group = next(g for g in groups.prunable() if "w1" in {d.tensor for d in g.dims})
    kept = apply_plan(groups, ChannelPlan({group.id: np.array(channels)}))
    changed = {d.tensor for d in kept if groups.index.is_constant(d.tensor)}
    batches = [{"x": RNG.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    result = recover(proto, model, kept, batches, method, changed, damp=damp)
    return model.proto, result


@pytest.mark.parametrize("method", ["bn", "lsq"])
def test_dead_channels_change_nothing(method):
    w1 = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[5:] = 0
    b1 = RNG.standard_normal(8).astype(np.float32)
    b1[5:] = 0
    proto = _two_convs(w1, b1, relu=True)
    pruned, _ = _prune_and_recover(proto, [5, 6, 7], method)
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(first_output(pruned, {"x": x}), first_output(proto, {"x": x}), rtol=1e-4, atol=1e-4)


def test_linear_consumer_is_recovered_exactly():
    w1 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w1[5] = 2 * w1[0]  # channel 5 is redundant: the consumer can take it from channel 0
    proto = _two_convs(w1, None, relu=False)
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    unrecovered, _ = _prune_and_recover(proto, [5], "none")
    assert np.abs(first_output(unrecovered, {"x": x}) - first_output(proto, {"x": x})).max() > 0.1
    recovered, result = _prune_and_recover(proto, [5], "lsq", damp=1e-9)
    assert result.layers and result.layers[-1].accepted
    np.testing.assert_allclose(first_output(recovered, {"x": x}), first_output(proto, {"x": x}), rtol=1e-3, atol=1e-3)


ZOO_SAMPLE = ["resnet_bn.onnx", "mobilenetv2_folded.onnx", "densenet_bn.onnx", "unet_bn.onnx", "csp_folded.onnx",
              "keras_cnn.onnx", "nhwc_cnn.onnx", "transformer.onnx", "convflatten_bn.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_SAMPLE)
def test_recovery_never_worse_than_none_on_held_out_data(name, tmp_path):
    proto = onnx.load(str(MODELS / name))
    inp = proto.graph.input[0]
    shape = [d.dim_value or 48 for d in inp.type.tensor_type.shape.dim]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{inp.name: RNG.standard_normal(shape).astype(np.float32)})
    held_out = {inp.name: RNG.standard_normal([16] + shape[1:]).astype(np.float32)}
    ref = first_output(proto, held_out)
    errors = {}
    for method in ("none", "bn", "lsq"):
        model = from_proto(onnx.load(str(MODELS / name)))
        prune_model(model, PruneOptions(channels=0.3, round_to=1, calib=str(calib), recover=method, criterion="l1"))
        out = first_output(model.proto, held_out)
        errors[method] = float(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
    assert errors["bn"] <= errors["none"] * 1.02 + 1e-9, errors
    assert errors["lsq"] <= errors["none"] * 1.02 + 1e-9, errors
    assert errors["lsq"] < errors["none"] or errors["none"] < 1e-6, errors


def _prune_digits(name: str, calib: Path, **options):
    """A fresh copy of a trained digits model, pruned with calibration data; returns (model, report)."""
    model = from_proto(onnx.load(str(MODELS / name)))
    return model, prune_model(model, PruneOptions(calib=str(calib), **options))


def test_unstructured_recovery_keeps_zeros_and_helps(tmp_path):
    data = np.load(MODELS / "digits_val.npz")
    np.savez(tmp_path / "calib.npz", input=data["input"][:128])
    counts = {}
    for method in ("none", "lsq"):
        model, report = _prune_digits("digits_resnet.onnx", tmp_path / "calib.npz", sparsity=0.7, recover=method)
        zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in model.proto.graph.initializer
                    if t.name in {w.name for w in report.unstructured.weights})
        counts[method] = zeros
        out = first_output(model.proto, {"input": data["input"][128:]})
        counts[method + "_acc"] = float((out.argmax(1) == data["labels"][128:]).mean())
    assert counts["lsq"] >= counts["none"]  # recovery never refills pruned weights
    assert counts["lsq_acc"] >= counts["none_acc"]


def test_wanda_and_act_criteria_use_calibration(tmp_path):
    data = np.load(MODELS / "digits_val.npz")
    np.savez(tmp_path / "calib.npz", input=data["input"][:64])
    masks = {}
    for criterion in ("l1", "wanda"):
        model, _ = _prune_digits("digits_plain.onnx", tmp_path / "calib.npz", sparsity=0.5, criterion=criterion,
                                 recover="none")
        masks[criterion] = [numpy_helper.to_array(t) == 0 for t in model.proto.graph.initializer if t.dims]
    assert any((a != b).any() for a, b in zip(masks["l1"], masks["wanda"]))
    model = from_proto(onnx.load(str(MODELS / "digits_plain.onnx")))
    report = prune_model(model, PruneOptions(channels=0.5, criterion="act", calib=str(tmp_path / "calib.npz"),
                                             recover="none", round_to=1))
    assert any(g.after < g.before for g in report.groups)


@pytest.mark.parametrize("args, code, message", [
    (["--channels", "0.3", "--recover", "lsq"], 2, "needs calibration data"),
    (["--channels", "0.3", "--criterion", "act"], 2, "needs calibration data"),
    (["--sparsity", "0.3", "--criterion", "wanda"], 2, "needs calibration data"),
    (["--channels", "0.3", "--calib", "{wrong_name}"], 7, "input"),
    (["--channels", "0.3", "--calib", "{wrong_shape}"], 7, "input"),
    (["--channels", "0.3", "--calib", "{missing}"], 7, "missing.npz: not a readable .npz file"),
])
def test_calibration_errors(tmp_path, capsys, args, code, message):
    np.savez(tmp_path / "wrong_name.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    names = {"wrong_name": tmp_path / "wrong_name.npz", "wrong_shape": tmp_path / "wrong_shape.npz",
             "missing": tmp_path / "missing.npz"}
    exit_code, out, err = run_main([MODELS / "digits_plain.onnx", "-o", tmp_path / "out.onnx",
                                    *[a.format(**names) for a in args]], capsys)
    assert exit_code == code, err
    assert message in err and "Traceback" not in out + err
    assert not (tmp_path / "out.onnx").exists()


def test_recon_criterion_removes_the_redundant_channel_first():
    """A channel that the others can reproduce costs nothing to remove once the consumer is re-fitted; magnitude
    scoring misses it when its weights are large."""
    w1 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w1[0] *= 3
    w1[5] = 2 * w1[0]  # channels 0 and 5 are the largest, and each reproduces the other
    proto = _two_convs(w1, None, relu=False)
    from onnxprune.pipeline import prune_channels

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "c.npz"
        np.savez(calib, x=RNG.standard_normal((64, 4, 6, 6)).astype(np.float32))
        batches = [{"x": np.load(calib)["x"]}]
        removed = {}
        for criterion in ("recon", "l1"):
            model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
            options = PruneOptions(channels=1 / 6, criterion=criterion, calib=str(calib), round_to=1, recover="none")
            groups, plan, _, _ = prune_channels(model, options, batches)
            group = next(g for g in groups.prunable() if Dim("w1", 0) in g.dims)
            idx, owner = group.members[Dim("w1", 0)]
            removed[criterion] = {int(idx[owner == c][0]) for c in plan.remove[group.id]}
    assert removed["recon"] <= {0, 5} and len(removed["recon"]) == 1
    assert not removed["l1"] & {0, 5}  # magnitude removes a small but useful channel instead


@pytest.mark.slow
def test_steps_prune_in_rounds_and_report_against_the_original():
    data = np.load(MODELS / "digits_val.npz")
    results = {}
    for steps in (1, 2):
        model = from_proto(onnx.load(str(MODELS / "digits_resnet.onnx")))
        report = prune_model(model, PruneOptions(channels=0.5, steps=steps, round_to=1, criterion="recon",
                                                 calib=str(MODELS / "digits_calib.npz")))
        out = first_output(model.proto, {"input": data["input"]})
        results[steps] = (float((out.argmax(1) == data["labels"]).mean()), report, model)
    (_, one, _), (_, two, model) = results[1], results[2]
    assert [g.before for g in two.groups] == [g.before for g in one.groups]  # sizes of the original model
    assert sum(g.after for g in two.groups) <= sum(g.after for g in one.groups) + len(one.groups)
    assert two.before.macs == one.before.macs and two.after.macs <= one.after.macs * 1.1
    assert results[2][0] >= results[1][0]  # measured on this model: 96.1% in one round, 96.7% in two
    final = two.recovery  # the reported error is the final model's, against the original (not the last round's)
    assert len(final.steps) == 2 and final.output_error_after < final.steps[0][0]
    calib = np.load(MODELS / "digits_calib.npz")["input"]
    ref = first_output(MODELS / "digits_resnet.onnx", {"input": calib})
    out = first_output(model.proto, {"input": calib})
    assert final.output_error_after == pytest.approx(float(np.sum((out - ref) ** 2) / np.sum(ref ** 2)), rel=1e-3)


def test_auto_criterion_uses_calibration_data_when_given(tmp_path):
    """auto = l1 without data; with data recon for channels and obs for weights (wanda when lsq is off)."""
    plain = {}
    for criterion in ("auto", "l1"):
        model = from_proto(onnx.load(str(MODELS / "digits_plain.onnx")))
        prune_model(model, PruneOptions(channels=0.5, sparsity=0.3, round_to=1, criterion=criterion))
        plain[criterion] = model.proto.SerializeToString()
    assert plain["auto"] == plain["l1"]
    calib = str(MODELS / "digits_calib.npz")
    for recover_method, weights in (("lsq", "obs"), ("none", "wanda")):
        model = from_proto(onnx.load(str(MODELS / "digits_plain.onnx")))
        report = prune_model(model, PruneOptions(channels=0.5, sparsity=0.3, round_to=1, calib=calib,
                                                 recover=recover_method))
        assert f"criterion auto with calibration data: recon for channels, {weights} for weights" in report.notes


def _grouped(w: np.ndarray, x_shape: list, duplicate: np.ndarray | None, pads: int) -> onnx.ModelProto:
    """x -> [1x1 conv with weights ``duplicate``] -> grouped conv ``w`` (groups = channels / w.shape[1]) -> y."""
    groups = w.shape[0] // w.shape[1] if w.shape[1] > 1 else w.shape[0]
    nodes, inits, source = [], [numpy_helper.from_array(w, "w")], "x"
    if duplicate is not None:
        inits.append(numpy_helper.from_array(duplicate, "d"))
        nodes.append(helper.make_node("Conv", ["x", "d"], ["h"]))
        source = "h"
    nodes.append(helper.make_node("Conv", [source, "w"], ["y"], group=groups, pads=[pads] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _zero_and_recover(proto: onnx.ModelProto, zero, batches: list[dict]) -> tuple[onnx.ModelProto, np.ndarray]:
    """Zero some weights of the grouped conv ``w`` (as unstructured pruning would) and run lsq."""
    model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    w = next(t for t in model.proto.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w).copy()
    zero(values)
    w.CopyFrom(numpy_helper.from_array(values, "w"))
    result = recover(proto, model, {}, batches, "lsq", {"w"}, damp=1e-9)
    assert result.layers and result.layers[-1].accepted
    return model.proto, values


def test_grouped_conv_is_refitted_within_its_groups():
    """Group 2: in each group the second input channel is a multiple of the first, so the first's weights can move
    onto the second exactly; the re-fit must find that and stay a grouped conv with the zeros kept."""
    duplicate = np.zeros((4, 2, 1, 1), np.float32)
    duplicate[[0, 1, 2, 3], [0, 0, 1, 1], 0, 0] = [1, 2, 1, 3]  # channels x0, 2 x0, x1, 3 x1
    w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    proto = _grouped(w, [None, 2, 6, 6], duplicate, pads=1)
    batches = [{"x": RNG.standard_normal((8, 2, 6, 6)).astype(np.float32)} for _ in range(2)]

    def zero(values: np.ndarray) -> None:
        values[:, 0] = 0
    recovered, zeroed = _zero_and_recover(proto, zero, batches)
    x = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)
    assert np.abs(first_output(_with_w(proto, zeroed), {"x": x}) - first_output(proto, {"x": x})).max() > 0.1
    np.testing.assert_allclose(first_output(recovered, {"x": x}), first_output(proto, {"x": x}), rtol=1e-3, atol=1e-3)
    new = numpy_helper.to_array(next(t for t in recovered.graph.initializer if t.name == "w"))
    assert new.shape == w.shape and not new[:, 0].any()


def test_depthwise_conv_is_refitted_per_channel():
    """Inputs constant along the width and no padding: a kernel's left column reads what its middle column reads, so
    zeroing it is undone exactly by moving it to the other columns, channel by channel."""
    w = RNG.standard_normal((3, 1, 3, 3)).astype(np.float32)
    proto = _grouped(w, [None, 3, 6, 6], None, pads=0)

    def columns(n: int) -> np.ndarray:
        return np.repeat(RNG.standard_normal((n, 3, 6, 1)).astype(np.float32), 6, axis=3)
    batches = [{"x": columns(8)} for _ in range(2)]

    def zero(values: np.ndarray) -> None:
        values[:, 0, :, 0] = 0
    recovered, zeroed = _zero_and_recover(proto, zero, batches)
    x = columns(2)
    assert np.abs(first_output(_with_w(proto, zeroed), {"x": x}) - first_output(proto, {"x": x})).max() > 0.1
    np.testing.assert_allclose(first_output(recovered, {"x": x}), first_output(proto, {"x": x}), rtol=1e-3, atol=1e-3)
    new = numpy_helper.to_array(next(t for t in recovered.graph.initializer if t.name == "w"))
    assert not new[:, 0, :, 0].any()


def _with_w(proto: onnx.ModelProto, w: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(proto.SerializeToString())
    next(t for t in out.graph.initializer if t.name == "w").CopyFrom(numpy_helper.from_array(w, "w"))
    return out
