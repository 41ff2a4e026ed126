"""Budgets instead of ratios (search/budget.py, cost.py, allocate.py, latency_table.py).

Oracles: the analytic cost equals graph/stats.py on the pruned model; a result meets its budget as stats measure the
saved file; a latency budget is met as the injected meter measures it (no timing in tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_support import assert_one_error, run_main
from conftest import MODELS

from onnxprune.channels.groups import build_groups
from onnxprune.graph.fold import fold_constant_subgraphs
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import LoadedModel, load_model
from onnxprune.graph.stats import model_stats, static_input_shapes
from onnxprune.passes.state import PruneOptions
from onnxprune.pipeline import prune_file
from onnxprune.prune.structured import ChannelPlan, apply_plan
from onnxprune.report import prune_dict
from onnxprune.search.allocate import Levels, allocate
from onnxprune.errors import ConfigError
from onnxprune.search.budget import _global_way, _hand_back, prune_to_budget
from onnxprune.search.cost import cost_model
from onnxprune.search.latency_table import interpolate, shrink_to_macs

DIGITS = MODELS / "digits_resnet.onnx"
CALIB = MODELS / "digits_calib.npz"


def _index(path):
    model = load_model(path)
    index = GraphIndex(model, static_input_shapes(model, None))
    fold_constant_subgraphs(index)
    return model, index


@pytest.mark.parametrize("name", ["digits_resnet.onnx", "mobilenetv2_bn.onnx", "densenet_bn.onnx", "csp_bn.onnx",
                                  "transformer.onnx", "convflatten_bn.onnx", "resnext_bn.onnx"])
def test_analytic_cost_equals_stats_on_the_pruned_model(name):
    """The cost model's MACs and parameters for random removals equal what graph/stats.py counts after applying
    them: bilinear layers, depthwise convs, concats, flatten and MatMul included."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        model, index = _index(MODELS / name)
        groups = build_groups(index)
        costs = {kind: cost_model(groups, kind) for kind in ("macs", "params")}
        removed = {g.id: int(rng.integers(1, g.size)) for g in groups.prunable() if rng.random() < 0.7}
        predicted = {kind: c.cost(removed) for kind, c in costs.items()}
        apply_plan(groups, ChannelPlan({gid: rng.choice(groups.groups[gid].size, n, replace=False)
                                        for gid, n in removed.items()}))
        after = model_stats(model, index=index, zeros={})
        assert removed and after.macs < costs["macs"].total
        assert predicted == {"macs": after.macs, "params": after.params}


def test_allocation_takes_the_cheapest_loss_per_cost_and_hands_back_what_the_goal_does_not_need():
    cost_per_channel = {0: 10.0, 1: 10.0, 2: 10.0}

    def cost(removed):
        return 100.0 - sum(cost_per_channel[g] * n for g, n in removed.items())

    levels = [Levels(0, (0, 1, 2, 4), (0.0, 0.5, 1.0, 2.0)), Levels(1, (0, 1, 2, 4), (0.0, 0.1, 0.2, 3.0))]
    chosen = allocate(levels, cost, 70.0)
    assert chosen.reached and chosen.removed == {0: 1, 1: 2} and chosen.cost == 70.0
    assert chosen.loss == pytest.approx(0.7)
    # a noisy loss that drops with more removal counts as the level before it
    assert Levels(0, (0, 1, 2), (0.0, 0.4, 0.3)).monotone() == (0.0, 0.4, 0.4)
    unreachable = allocate(levels, cost, 5.0)
    assert not unreachable.reached and unreachable.removed == {0: 4, 1: 4}
    assert allocate(levels, cost, 100.0).removed == {0: 0, 1: 0}
    # a fixed removal (--layer-channels) counts in the cost and is kept
    assert allocate(levels, cost, 70.0, fixed={2: 1}).removed == {2: 1, 0: 0, 1: 2}


def test_latency_table_interpolates_through_zero_and_extends_the_last_segment():
    points = {4: -0.1, 8: -0.3}
    assert interpolate(points, 0) == 0.0
    assert interpolate(points, 2) == pytest.approx(-0.05)
    assert interpolate(points, 6) == pytest.approx(-0.2)
    assert interpolate(points, 10) == pytest.approx(-0.4)


def test_table_entries_are_pulled_halfway_towards_the_macs_fit():
    class Macs:  # group 0 removes 10% of the MACs per channel, group 1 20%
        total = 100.0

        def cost(self, removed):
            return 100.0 - 10.0 * removed.get(0, 0) - 20.0 * removed.get(1, 0)

    points = {0: {1: -0.2}, 1: {1: -0.1}}  # measured: the other way round
    slope = (0.1 * 0.2 + 0.2 * 0.1) / (0.1 ** 2 + 0.2 ** 2)  # least squares through the origin
    shrunk = shrink_to_macs(points, Macs())
    assert shrunk[0][1] == pytest.approx(0.5 * -0.2 + 0.5 * slope * -0.1)
    assert shrunk[1][1] == pytest.approx(0.5 * -0.1 + 0.5 * slope * -0.2)
    # timings that say pruning makes it slower (noise): latency proportional to MACs is the fit
    noise = shrink_to_macs({0: {1: 0.01}, 1: {1: 0.02}}, Macs())
    assert noise[0][1] == pytest.approx(0.5 * 0.01 + 0.5 * -0.1) and noise[1][1] == pytest.approx(0.5 * 0.02 - 0.1)


def _measured(path, kind):
    stats = model_stats(load_model(path))
    return stats.macs if kind == "macs" else stats.params


@pytest.mark.parametrize("kind, target", [("macs", 0.5), ("params", 0.6)])
def test_result_meets_the_budget_as_stats_measure_the_saved_model(tmp_path, kind, target):
    out = tmp_path / "out.onnx"
    options = PruneOptions(round_to=1, calib=str(CALIB), calib_limit=32, recover="none", steps=2, criterion="l1",
                           **{f"target_{kind}": target})
    report = prune_to_budget(DIGITS, out, options)
    measured = _measured(out, kind) / _measured(DIGITS, kind)
    assert measured <= target
    assert report.budget.reached == pytest.approx(measured)
    path = report.budget.rounds
    assert len(path) == 2 and path[0].reached > path[1].reached == pytest.approx(measured)
    assert all(r.predicted == pytest.approx(r.reached) for r in path)  # the analytic cost is exact
    assert sum(r.removed for r in path) == sum(g.before - g.after for g in report.groups) > 0
    data = json.loads(json.dumps(prune_dict(report)))["budget"]  # the report's JSON section
    assert data["kind"] == kind and data["reached"] == report.budget.reached and len(data["rounds"]) == 2
    assert data["ratios"] == {g.name: round(1 - g.after / g.before, 4) for g in report.groups if not g.blocked}


class FakeMeter:
    """Latency = a fixed overhead plus time proportional to MACs (a memory-bound part that pruning does not
    shrink), computed from graph/stats.py, so tests know the truth without timing anything. ``table_bias`` scales
    the savings the per-group table reports and ``offset`` is added to the measurements of whole results from the
    ``offset_from``-th on, to make the table wrong on purpose."""

    name = "fake meter"

    def __init__(self, overhead: float = 0.3, table_bias: float = 1.0, offset: float = 0.0,
                 offset_from: int = 1) -> None:
        self.overhead, self.table_bias, self.offset, self.offset_from = overhead, table_bias, offset, offset_from
        self.measured = 0

    def latency(self, model: bytes) -> float:
        macs = model_stats(LoadedModel(onnx.ModelProto.FromString(model))).macs
        return self.overhead * 533824 + macs

    def ratios(self, reference, candidates, feed):
        base = self.latency(reference)
        return [1 - (1 - self.latency(c) / base) * self.table_bias for c in candidates]

    def measure(self, reference, model, feed):
        self.measured += 1
        return self.latency(model) / self.latency(reference) + (self.offset if self.measured >= self.offset_from
                                                               else 0.0)


def test_latency_budget_is_met_as_the_meter_measures_it(tmp_path):
    meter = FakeMeter()
    options = PruneOptions(round_to=1, calib=str(CALIB), calib_limit=32, recover="none", steps=2, criterion="l1",
                           target_latency=0.6)
    report = prune_to_budget(DIGITS, tmp_path / "out.onnx", options, meter=meter)
    original = meter.latency(load_model(DIGITS).proto.SerializeToString())
    truth = meter.latency(load_model(tmp_path / "out.onnx").proto.SerializeToString()) / original
    assert truth <= 0.6 and report.budget.reached == pytest.approx(truth)
    assert report.budget.method == "fake meter" and report.budget.timings > 0


def test_excluded_groups_stay_whole_and_layer_channels_take_their_ratio(tmp_path):
    options = PruneOptions(round_to=1, calib=str(CALIB), calib_limit=32, recover="none", steps=2, criterion="l1",
                           target_macs=0.5, exclude=("/layer2/conv1/*",), layer_channels=(("/stem/*", 0.25),))
    report = prune_to_budget(DIGITS, tmp_path / "out.onnx", options)
    groups = {g.name: g for g in report.groups}
    excluded, fixed = groups["/layer2/conv1/Conv"], groups["/stem/stem.0/Conv, /layer1/conv2/Conv"]
    assert excluded.after == excluded.before == 32 and excluded.note == "excluded by --exclude"
    assert (fixed.before, fixed.after) == (16, 12) and "--layer-channels" in fixed.note
    assert _measured(tmp_path / "out.onnx", "macs") <= 0.5 * _measured(DIGITS, "macs")


def _latency_search(tmp_path, meter: FakeMeter):
    options = PruneOptions(round_to=1, calib=str(CALIB), calib_limit=32, recover="none", steps=2, criterion="l1",
                           target_latency=0.6)
    return prune_to_budget(DIGITS, tmp_path / "out.onnx", options, meter=meter).budget


def test_latency_search_corrects_a_table_that_promises_too_much(tmp_path):
    """A table promising twice the real savings: the first round falls short of its goal as measured, the next one
    scales the table by what was really saved and the result meets the budget."""
    path = _latency_search(tmp_path, FakeMeter(table_bias=2.0)).rounds
    assert path[0].predicted <= path[0].goal < path[0].reached
    assert path[-1].reached <= 0.6


def test_latency_search_keeps_removing_while_the_measured_result_misses(tmp_path):
    """From the second round's result on, measurements 0.05 above what the table adds up to (a cost the table cannot
    see): the last planned round ends above the budget as measured, so the search runs more rounds until the
    measurement meets it."""
    budget = _latency_search(tmp_path, FakeMeter(offset=0.05, offset_from=2))
    assert len(budget.rounds) > 2 and budget.rounds[1].reached > 0.6 >= budget.reached == budget.rounds[-1].reached


@pytest.mark.parametrize("args, fragments", [
    (["--target-macs", "0"], ["outside (0, 1)"]),
    (["--target-macs", "1"], ["outside (0, 1)"]),
    (["--target-params", "-0.5"], ["outside (0, 1)"]),
    (["--target-latency", "fast"], ["not a number"]),
    (["--target-macs", "0.5", "--channels", "0.3"], ["--channels and --target-macs"]),
    (["--target-macs", "0.5", "--target-params", "0.5"], ["give one budget"]),
    (["--target-macs", "0.5", "--calib", None, "--scope", "global"], ["--scope global"]),
    (["--target-macs", "0.5", "--calib", None, "--sparsity", "0.5"], ["--sparsity"]),
    (["--target-macs", "0.5", "--calib", None, "--max-accuracy-drop", "0.01"], ["give --data"]),
])
def test_bad_budgets_are_one_line_errors_with_exit_2(tmp_path, capsys, args, fragments):
    args = [str(CALIB) if a is None else a for a in args]
    code, _, err = run_main([DIGITS, "-o", tmp_path / "out.onnx", *args], capsys)
    assert code == 2, err
    assert_one_error(err, *fragments)
    assert not (tmp_path / "out.onnx").exists()


def test_budget_needs_calibration_data(tmp_path, capsys):
    code, _, err = run_main([DIGITS, "-o", tmp_path / "out.onnx", "--target-macs", "0.5"], capsys)
    assert code == 2
    assert_one_error(err, "--target-macs", "give --calib")


def _top1(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0].argmax(1)


@pytest.mark.slow
def test_budget_beats_uniform_layer_scope_at_equal_macs_on_calibration_data(tmp_path):
    """The trained digits CNN: uniform --channels 0.5 (one shot) against --target-macs at the MACs it kept in 3
    rounds (the CLI's default), both with lsq recovery; measured top-1 agreement with the original on the
    calibration inputs."""
    base = {"round_to": 1, "calib": str(CALIB)}
    prune_file(DIGITS, tmp_path / "uniform.onnx", PruneOptions(channels=0.5, **base))
    kept = _measured(tmp_path / "uniform.onnx", "macs") / _measured(DIGITS, "macs")
    prune_to_budget(DIGITS, tmp_path / "budget.onnx", PruneOptions(target_macs=kept, steps=3, **base))
    assert _measured(tmp_path / "budget.onnx", "macs") <= _measured(tmp_path / "uniform.onnx", "macs")
    inputs = np.load(CALIB)["input"]
    reference = _top1(DIGITS, inputs)
    agreement = {name: np.mean(_top1(tmp_path / f"{name}.onnx", inputs) == reference) for name in ("uniform", "budget")}
    assert agreement["budget"] > agreement["uniform"]


def test_unreachable_budget_is_exit_2_and_writes_nothing(tmp_path, capsys):
    code, _, err = run_main([DIGITS, "-o", tmp_path / "out.onnx", "--target-macs", "0.05", "--round-to", "1",
                             "--max-group-ratio", "0.5", "--calib", CALIB, "--calib-limit", "32", "--recover", "none",
                             "--criterion", "l1", "--steps", "1"], capsys)
    assert code == 2
    assert_one_error(err, "--target-macs 0.05: cannot be reached")
    assert not (tmp_path / "out.onnx").exists()


def _linear_cost(per_channel: dict[int, float]):
    def cost(removed):
        return 100.0 - sum(per_channel.get(g, 0.0) * n for g, n in removed.items())
    return cost


def _toy_groups(sizes: dict[int, int]):
    """Stand-ins for ChannelGroup (id and size are all the allocation helpers read), with every kept count from
    1 to size - 1 allowed, and random scores (group 1's ten times larger: normalising by the group's mean must
    undo that)."""
    rng = np.random.default_rng(3)
    groups = [SimpleNamespace(id=gid, size=n) for gid, n in sizes.items()]
    scores = {gid: rng.random(n) * (10.0 if gid == 1 else 1.0) + 0.01 for gid, n in sizes.items()}
    allowed = {gid: list(range(1, n)) for gid, n in sizes.items()}
    order = {gid: np.argsort(s, kind="stable") for gid, s in scores.items()}
    return groups, allowed, scores, order


@pytest.mark.parametrize("goal", [95.0, 80.0, 61.0, 40.0])
def test_global_aim_removes_the_lowest_normalised_scores_and_no_more_than_the_goal_needs(goal):
    groups, allowed, scores, _ = _toy_groups({0: 8, 1: 12, 2: 6})
    cost = _linear_cost({0: 3.0, 1: 2.0, 2: 5.0})
    removed = _global_way(groups, allowed, cost, goal, {}, scores)
    assert cost(removed) <= goal
    normalised = {gid: np.sort(s / s.mean()) for gid, s in scores.items()}
    gone = [normalised[gid][:n] for gid, n in removed.items() if n]
    kept = [normalised[gid][n:-1] for gid, n in removed.items()]  # a group's last channel is never offered
    assert max(np.concatenate(gone)) <= min(np.concatenate(kept))  # one ranking over every group
    last = max(removed, key=lambda gid: normalised[gid][removed[gid] - 1] if removed[gid] else -1)
    assert cost({**removed, last: removed[last] - 1}) > goal  # the ranking's shortest prefix within the goal


def test_global_aim_is_none_when_even_every_group_at_its_limit_misses_the_goal():
    groups, allowed, scores, _ = _toy_groups({0: 4, 1: 4})
    assert _global_way(groups, allowed, _linear_cost({0: 1.0, 1: 1.0}), 50.0, {}, scores) is None


@pytest.mark.parametrize("seed", range(4))
def test_hand_back_returns_channels_while_the_cost_stays_within_the_goal(seed):
    groups, allowed, scores, order = _toy_groups({0: 8, 1: 12, 2: 6})
    cost = _linear_cost({0: 3.0, 1: 2.0, 2: 5.0})
    rng = np.random.default_rng(seed)
    start = {g.id: int(rng.integers(1, g.size)) for g in groups}
    goal = cost(start) + float(rng.uniform(5.0, 15.0))  # overshot by at least one channel of any group
    after = _hand_back(groups, allowed, cost, goal, start, scores, order)
    assert cost(after) <= goal and all(after[gid] <= start[gid] for gid in start)
    assert sum(after.values()) < sum(start.values())
    # nothing more could be given back: every group's next step back would exceed the goal
    assert all(cost({**after, gid: n - 1}) > goal for gid, n in after.items() if n)


def test_search_compares_the_global_aim_and_takes_the_best_recovered_one(tmp_path):
    """Every round with distinct aims recovers each of them at the target and takes the lowest error on --calib;
    the result meets the budget as stats measure the saved model, and the hand-back leaves it within one
    channel's cost: predicted equals measured in every round."""
    options = PruneOptions(round_to=1, calib=str(CALIB), calib_limit=32, recover="none", steps=2, criterion="l1",
                           target_macs=0.3)
    budget = prune_to_budget(DIGITS, tmp_path / "out.onnx", options).budget
    compared = [r for r in budget.rounds if r.errors]
    assert compared and all(r.choice == min(r.errors, key=r.errors.get) for r in compared)
    assert any("global" in r.errors for r in compared)
    assert budget.recoveries == sum(len(r.errors) for r in budget.rounds)
    assert _measured(tmp_path / "out.onnx", "macs") / _measured(DIGITS, "macs") == pytest.approx(budget.reached)
    assert all(r.predicted == pytest.approx(r.reached) and r.reached <= r.goal for r in budget.rounds)
    with pytest.raises(ConfigError, match="budget aims"):
        prune_to_budget(DIGITS, tmp_path / "x.onnx", options, aims=("random",))
