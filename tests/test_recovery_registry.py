"""The recovery-method registry: what the CLI offers, what each method needs, the default, and a method added by
registration alone running through ``recover()`` (fit order, notes, progress) without touching other code."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune.recovery.recover as driver
from onnxprune.cli.prune_cmd import prune_command
from onnxprune.errors import ConfigError
from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, prune_model
from onnxprune.recovery import registry
from onnxprune.recovery.recover import Recovery, RecoveryResult, recover

RNG = np.random.default_rng(0)
# x -> conv1 -> relu -> conv2 -> y, and a side branch x -> side -> z that no change reaches
TOY = """
<ir_version: 8, opset_import: ["" : 13]>
toy (float[N, 4, 6, 6] x) => (float[N, 3, 6, 6] y, float[N, 4, 6, 6] z) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (h)
    y = Conv (r, w2)
    z = Relu (x)
}
"""


def _toy() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(TOY)
    for name, value in {"w1": RNG.standard_normal((6, 4, 3, 3)), "b1": RNG.standard_normal(6),
                        "w2": RNG.standard_normal((3, 6, 1, 1))}.items():
        proto.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    names = ["conv1", "relu", "conv2", "side"]
    for node, name in zip(proto.graph.node, names):
        node.name = name
    return proto


def _batches() -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((8, 4, 6, 6)).astype(np.float32)} for _ in range(2)]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Methods registered in a test are gone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_every_method_is_a_cli_choice_with_its_help():
    option = next(p for p in prune_command.params if p.name == "recover_method")
    assert list(option.type.choices) == registry.names() == ["none", "bn", "lsq"]
    for method in registry.methods():
        assert registry.get(method.name) is method
        assert method.help_text in option.help
    assert registry.DEFAULT_HELP in option.help


def test_needs_are_declared():
    assert not registry.get("none").needs_calibration and registry.get("none").fitter is None
    assert all(registry.get(name).needs_calibration for name in ("bn", "lsq"))
    assert [m.name for m in registry.methods() if m.chooses_zeros] == ["lsq"]  # what --criterion obs needs
    assert registry.get("lsq").shortcut_first and not registry.get("bn").shortcut_first
    model = from_proto(_toy())
    for method in registry.methods():
        if method.needs_calibration:  # refused before anything is pruned
            with pytest.raises(ConfigError, match=f"--recover {method.name} needs calibration data"):
                prune_model(model, PruneOptions(channels=0.3, recover=method.name))


def test_default_rule():
    assert registry.default_method(calibrated=True) == "lsq"
    assert registry.default_method(calibrated=False) == "none"
    assert registry.chosen_method(None, calibrated=True).name == "lsq"
    assert registry.chosen_method(None, calibrated=False).name == "none"
    assert registry.chosen_method("bn", calibrated=True).name == "bn"
    with pytest.raises(ConfigError, match=r"unknown recovery 'nope' \(choose from none, bn, lsq\)"):
        registry.chosen_method("nope", calibrated=True)


def test_a_name_is_registered_once(scratch_registry):
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(dataclasses.replace(registry.get("bn")))


def test_a_registered_method_runs_through_recover(scratch_registry, tmp_path):
    """A method that fixes nothing and notes every node it is handed: it sees the nodes downstream of the change
    (the side branch is not), of its ops only, in fit order, and its finish step runs once."""
    finished = []

    @registry.register("toy", "say which nodes were handed over", ops=frozenset({"Conv", "Relu"}))
    class Toy:
        def __init__(self, job: Recovery) -> None:
            self.job = job

        def fix(self, node: onnx.NodeProto) -> str:
            return f"saw {node.name}"

        def finish(self, result: RecoveryResult, backup: onnx.ModelProto) -> None:
            finished.append(result.output_error_after)

    proto = _toy()
    model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    result = recover(proto, model, {}, _batches(), "toy", {"w1"})
    assert result.notes == ["saw conv1", "saw relu", "saw conv2"]
    assert result.layers == [] and result.kept and finished == [0.0]
    assert result.output_error_before == result.output_error_after == 0.0
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((16, 4, 6, 6)).astype(np.float32))
    report = prune_model(from_proto(_toy()), PruneOptions(sparsity=0.5, criterion="l1", recover="toy",
                                                          calib=str(tmp_path / "calib.npz")))
    assert report.recovery.method == "toy" and report.recovery.notes == result.notes  # the pipeline as it is


def test_each_sweep_shows_one_bar_of_one_unit_per_layer(monkeypatch):
    """lsq on a conv whose output reaches a Relu runs two sweeps (refined, then plain): two bars."""
    bars = []

    @contextlib.contextmanager
    def recording(total: int, label: str):
        bar = [label, total, 0]
        bars.append(bar)

        def advance(n: int = 1) -> None:
            bar[2] += n
        yield advance

    monkeypatch.setattr(driver, "progress", recording)
    proto = _toy()
    model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    weights = {t.name: t for t in model.proto.graph.initializer}
    pruned = numpy_helper.to_array(weights["w1"]).copy()
    pruned[np.abs(pruned) < 0.5] = 0  # a crude weight pruning, so there is something to recover
    model.replace(weights["w1"], pruned)
    result = recover(proto, model, {}, _batches(), "lsq", {"w1"})
    assert any("lsq kept" in note for note in result.notes), result.notes
    assert bars == [["recovery lsq", 2, 2], ["recovery lsq (plain fit)", 2, 2]]
