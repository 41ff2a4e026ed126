"""The importance-criterion registry: what the CLI offers, what each criterion declares and needs, the auto rule,
every criterion scoring a small model, and a criterion added by ``@register`` alone being used by
``plan_channels``, unstructured pruning and the pipeline without touching other code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.cli.prune_cmd import prune_command
from onnxprune.errors import ConfigError
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import from_proto
from onnxprune.importance import registry
from onnxprune.importance.registry import Criterion, Target, register
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.prune.structured import plan_channels
from onnxprune.prune.unstructured import prune_unstructured

RNG = np.random.default_rng(0)
# x -> conv1 -> BatchNormalization -> Relu -> conv2 -> y: one group of 6 channels (w1 rows, BN, w2 columns)
TOY = """
<ir_version: 8, opset_import: ["" : 13]>
toy (float[N, 4, 6, 6] x) => (float[N, 3, 6, 6] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    n = BatchNormalization (h, gamma, beta, mean, var)
    r = Relu (n)
    y = Conv (r, w2)
}
"""


def _toy() -> onnx.ModelProto:
    """The same model every call."""
    rng = np.random.default_rng(1)
    values = {"w1": rng.standard_normal((6, 4, 3, 3)), "gamma": rng.uniform(0.5, 2.0, 6), "beta": np.zeros(6),
              "mean": np.zeros(6), "var": np.ones(6), "w2": rng.standard_normal((3, 6, 1, 1))}
    proto = onnx.parser.parse_model(TOY)
    proto.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items())
    return proto


BATCHES = [{"x": RNG.standard_normal((8, 4, 6, 6)).astype(np.float32)} for _ in range(2)]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Criteria registered in a test are gone after it."""
    monkeypatch.setattr(registry, "CRITERIA", dict(registry.CRITERIA))


def test_every_criterion_is_a_cli_choice_with_its_needs_in_the_help():
    option = next(p for p in prune_command.params if p.name == "criterion")
    assert list(option.type.choices) == ["auto", *registry.names()] == registry.choices()
    assert registry.names() == ["l1", "l2", "bn-scale", "act", "recon", "wanda", "obs"]
    assert option.default == "auto"
    for criterion in registry.CRITERIA.values():
        assert criterion.help and criterion.target and registry.get(criterion.name) is criterion
        needs = ", needs --calib" if criterion.needs_data else ""
        assert f"{criterion.name} = {criterion.help} (" in option.help
        assert needs in option.help.split(f"{criterion.name} = ")[1].split(";")[0]
    assert "auto = l1, or with --calib recon (channels) and obs (weights; wanda without lsq)" in option.help


def test_targets_and_needs_are_declared():
    assert registry.names(Target.CHANNELS) == ["l1", "l2", "bn-scale", "act", "recon"]
    assert registry.names(Target.WEIGHTS) == ["l1", "l2", "wanda", "obs"]
    assert [n for n, c in registry.CRITERIA.items() if c.needs_data] == ["act", "recon", "wanda", "obs"]
    obs = registry.get("obs")  # wanda sets the counts, recovery chooses the zeros
    assert obs.recovery_chooses and obs.ranking() is registry.get("wanda")
    assert not any(c.recovery_chooses for n, c in registry.CRITERIA.items() if n != "obs")
    with pytest.raises(ConfigError, match=r"unknown criterion 'wanda' \(choose from l1, l2, bn-scale, act, recon\)"):
        registry.get("wanda", Target.CHANNELS)
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Again", (Criterion,), {"name": "l1", "help": "", "target": Target.WEIGHTS}))


@pytest.mark.parametrize("name", ["act", "recon"])
def test_channel_criteria_needing_data_refuse_to_run_without_it(name):
    groups = find_groups(from_proto(_toy()))
    with pytest.raises(ConfigError, match=f"--criterion {name} needs calibration data \\(--calib\\)"):
        plan_channels(groups, 0.5, criterion=name)


@pytest.mark.parametrize("name", ["wanda", "obs"])
def test_weight_criteria_needing_data_refuse_to_run_without_it(name):
    with pytest.raises(ConfigError, match=f"--criterion {name} needs calibration data \\(--calib\\)"):
        prune_unstructured(GraphIndex(from_proto(_toy())), sparsity=0.5, criterion=name)
    with pytest.raises(ConfigError, match=f"--criterion {name} needs calibration data \\(--calib\\)"):
        prune_model(from_proto(_toy()), PruneOptions(sparsity=0.5, criterion=name))


def test_auto_rule():
    rule = registry.auto_choice
    assert [rule(t, False, z) for t in Target for z in (True, False)] == ["l1"] * 4
    assert rule(Target.CHANNELS, True, True) == rule(Target.CHANNELS, True, False) == "recon"
    assert rule(Target.WEIGHTS, True, True) == "obs" and rule(Target.WEIGHTS, True, False) == "wanda"


@pytest.mark.parametrize("name", registry.names(Target.CHANNELS))
def test_every_channel_criterion_scores_a_small_model(name):
    groups = find_groups(from_proto(_toy()))
    (group,) = groups.prunable()
    scored = registry.channel_scorer(name, groups, "mean", BATCHES)(groups.prunable())
    scores, note = scored[group.id]
    assert scores.shape == (6,) and np.all(np.isfinite(scores)) and note is None
    assert len(set(scores.round(9))) == 6  # distinct: the ranking is decided by the scores, not by position
    if name == "bn-scale":  # one BN scale, mean-normalised
        gamma = numpy_helper.to_array(next(t for t in groups.index.graph.initializer if t.name == "gamma"))
        np.testing.assert_allclose(scores, gamma / gamma.mean(), rtol=1e-6)


@pytest.mark.parametrize("name", registry.names(Target.WEIGHTS))
def test_every_weight_criterion_scores_a_small_model(name):
    model = from_proto(_toy())
    result = prune_unstructured(GraphIndex(model), sparsity=0.5, criterion=name, batches=BATCHES)
    assert {w.name: w.zeros_after for w in result.weights} == {"w1": 108, "w2": 9}
    criterion = registry.get(name).ranking()
    scales = criterion.weight_scales(GraphIndex(model), result.weights, BATCHES)
    assert (scales is None) == (criterion.name in ("l1", "l2"))
    if scales is not None:  # wanda: the input feature norms of each weight's reduction axis
        assert scales["w1"].shape == (4,) and scales["w2"].shape == (6,)
        assert np.all(scales["w1"] > 0)


def test_a_criterion_for_channels_only_ranks_weights_by_l1_and_says_so():
    plain, other = from_proto(_toy()), from_proto(_toy())
    prune_model(plain, PruneOptions(sparsity=0.5, criterion="l1"))
    report = prune_model(other, PruneOptions(sparsity=0.5, criterion="bn-scale"))
    assert "criterion bn-scale applies to channels; weights ranked by l1" in report.notes
    assert plain.proto.SerializeToString() == other.proto.SerializeToString()


def test_a_registered_criterion_is_used_without_touching_other_code(scratch_registry):
    """A toy criterion scoring channels by position (the last go first) and weights by 1/|w| (the largest go
    first): registration alone makes it a choice of plan_channels, unstructured pruning and the pipeline."""

    @register
    class Backwards(Criterion):
        name = "backwards"
        help = "the last channels and the largest weights go first"
        target = Target.CHANNELS | Target.WEIGHTS

        def score_channels(self, groups, chosen, reduction, batches):
            return {g.id: (np.arange(g.size, 0, -1, dtype=np.float64), "scored backwards") for g in chosen}

        def weight_scales(self, index, weights, batches):
            return {w.name: 1 / np.maximum(np.square(index.const_value(w.name)), 1e-12) for w in weights}

    assert "backwards" in registry.names(Target.CHANNELS) and "backwards" in registry.help_text()
    groups = find_groups(from_proto(_toy()))
    (group,) = groups.prunable()
    plan = plan_channels(groups, 0.5, criterion="backwards", round_to=1)
    assert plan.remove[group.id].tolist() == [3, 4, 5] and plan.notes[group.id] == "scored backwards"

    model = from_proto(_toy())
    report = prune_model(model, PruneOptions(channels=0.5, sparsity=0.5, criterion="backwards", round_to=1))
    assert [(g.before, g.after, g.note) for g in report.groups if not g.blocked] == [(6, 3, "scored backwards")]
    original = {t.name: numpy_helper.to_array(t) for t in _toy().graph.initializer}
    pruned = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    kept_rows = original["w1"][:3]  # channels 0-2 stay; then the largest half of each weight is zeroed
    zeroed = pruned["w1"] == 0
    assert zeroed.sum() == kept_rows.size // 2
    assert np.abs(kept_rows[zeroed]).min() >= np.abs(kept_rows[~zeroed]).max()


def test_unknown_criterion_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown criterion 'nope' \(choose from l1, l2, wanda, obs\)"):
        prune_unstructured(GraphIndex(from_proto(_toy())), sparsity=0.5, criterion="nope")
    groups = find_groups(from_proto(_toy()))
    with pytest.raises(ConfigError, match="unknown criterion 'obs'"):
        plan_channels(groups, 0.5, criterion="obs")
    with pytest.raises(ConfigError, match="unknown group reduction 'median'"):
        plan_channels(groups, 0.5, reduction="median")
