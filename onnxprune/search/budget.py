"""Budgets instead of ratios: ``--target-macs F``, ``--target-params F``, ``--target-latency F``.

The search runs the prune job's round (passes/job.py ROUND: groups, removal, recovery, measurement) several times on
the same model, with a planner in place of the ratio selection. Each round aims at a goal on the way to the target
(the target's k-th root per round, so every round removes a similar share), and its planner:

1. offers every group a few kept counts (allowed by ``--round-to``, not below ``--max-group-ratio`` of the group's
   size before the first round), the lowest-ranked channels of the run's criterion going first;
2. measures the loss of each group at each count alone: the round's model with those channels replaced by their
   mean on the calibration batches (removal plus the bias correction recovery makes), its outputs' relative squared
   error against the model as it is on the same batches; these evaluations are independent tasks
   (search/executor.py: local processes or Ray). Why the mean and not zero (prune/verify.py's masked original):
   on the digits CNN, zeroing 4 and 8 of the residual stream's 16 channels gave relative errors 0.99 and 1.29
   (saturated), replacing them by their means 0.34 and 0.67: a loss that keeps growing with the count, as it does
   after recovery;
3. knows the cost of any allocation: MACs and parameters analytically (search/cost.py, exact), latency from a table
   of measured group timings (search/latency_table.py);
4. allocates greedily, least loss per cost saved (search/allocate.py), for the final target: where the whole
   search should end, re-planned every round on the model as the last round's recovery left it;
5. checks that plan against two others at the target: the even one (every group the same fraction) and the global
   one (``--scope global``'s ranking of scores over their group's mean, as many channels as the target needs): each
   applied to a copy and recovered with the run's method, the one with the lowest output error on ``--calib`` is the
   aim (the losses of groups alone are a proxy that misses what recovery can restore);
6. goes the aim's way as far as this round's goal needs (greedy: the same share of the way to its plan in every
   group; even: the same fraction everywhere; global: a shorter prefix of the ranking), and in the rounds aimed at
   the target, MACs and parameters being exact, hands back channels while the cost stays within it (the way
   otherwise overshoots it, every group moving to its nearest allowed count).

Recovery after each round makes later rounds measure losses on a model that has already adapted to earlier removals
(the iterative pruning of NetAdapt and AMC). After the planned rounds the result is measured as it is (stats for
MACs and parameters, a fresh interleaved timing against the original for latency); while it misses the target,
more rounds aim at the target itself. Held-out data never takes part: the selection sees only ``--calib``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.channels import Dim
from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.data.loader import Feed
from onnxprune.data.probe import collect_moments
from onnxprune.errors import ConfigError, OnnxPruneError, ValidationFailed
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.layers import FLOAT_TYPES
from onnxprune.graph.stats import static_input_shapes
from onnxprune.importance import registry as criteria
from onnxprune.passes.base import Pass, run_passes
from onnxprune.passes.job import ROUND
from onnxprune.passes.preflight import Preflight
from onnxprune.passes.state import BudgetReport, BudgetRound, PruneOptions, PruneReport, PruneState
from onnxprune.passes.steps import merge_rounds
from onnxprune.pipeline import prune_file
from onnxprune.prune.structured import ChannelPlan, allowed_keeps, apply_plan, matches, round_keep
from onnxprune.prune.verify import in_memory
from onnxprune.recovery import registry as recovery_methods
from onnxprune.recovery.recover import output_error, recover
from onnxprune.search.allocate import Levels, allocate
from onnxprune.search.cost import cost_model
from onnxprune.search.executor import run_tasks, worker_threads
from onnxprune.search.latency_table import LatencyMeter, OrtMeter, interpolate, shrink_to_macs, table_counts
from onnxprune.validate.providers import create_session

DEFAULT_ROUNDS = 3  # the CLI's rounds without --steps (PruneOptions.steps, 1, for library callers)
EXTRA_ROUNDS = 3  # at most this many more while the measured result misses the target
LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # counts offered per group and round: these fractions removed
MAX_LEVELS = 16  # a group with at most this many allowed counts in range is offered all of them
DEFAULT_CAP = 0.9  # most of its channels a group may lose over the whole search, without --max-group-ratio
AIMS = ("even", "global", "greedy")  # the allocations compared every round; on a tie, the earlier one is taken


def budget_job(meter: LatencyMeter | None = None, aims: Sequence[str] = AIMS) -> tuple[Pass[PruneState], ...]:
    """The prune job with a budget: Preflight, then the search's rounds. ``meter``: how ``--target-latency``
    times models (default: onnxruntime on ``options.latency_provider``); ``aims``: the allocations compared (a
    subset of :data:`AIMS`, for benchmarks that measure what each adds)."""
    unknown = set(aims) - set(AIMS)
    if not aims or unknown:
        raise ConfigError(f"budget aims must be some of {', '.join(AIMS)}, got {', '.join(aims) or 'none'}")
    return (Preflight(), BudgetSearch(ROUND, meter, tuple(a for a in AIMS if a in aims)))


def prune_to_budget(input_path: str | Path, output_path: str | Path | None, options: PruneOptions,
                    meter: LatencyMeter | None = None, aims: Sequence[str] = AIMS) -> PruneReport:
    """:func:`onnxprune.pipeline.prune_file` meeting ``options``' ``target_*`` budget."""
    return prune_file(input_path, output_path, options, job=budget_job(meter, aims))


class BudgetSearch(Pass[PruneState]):
    """Rounds of the prune job, each planned by :class:`_Planner`, until the measured result meets the budget."""

    name = "budget-search"

    def __init__(self, rounds: Sequence[Pass[PruneState]], meter: LatencyMeter | None = None,
                 aims: tuple[str, ...] = AIMS) -> None:
        self.rounds, self.meter, self.aims = rounds, meter, aims

    def applies(self, state: PruneState) -> bool:
        return bool(state.options.budgets)

    def run(self, state: PruneState) -> None:
        options = state.options
        (kind, target), = options.budgets.items()
        planned = options.steps
        meter = self.meter or (OrtMeter(options.latency_provider, options.latency_threads) if kind == "latency"
                               else None)
        planner = _Planner(kind, target, options, meter, self.aims)
        reports: list[PruneReport] = []
        original = None
        for number in range(planned + EXTRA_ROUNDS):
            goal = target ** ((number + 1) / planned) if number < planned else target
            round_state = PruneState(state.model, replace(options, steps=1), batches=state.batches,
                                     calibrated=state.calibrated, index=state.index,
                                     planner=partial(planner.plan, goal=goal))
            run_passes(self.rounds, round_state)
            original = original if original is not None else round_state.original
            state.batches, state.calibrated, state.index = round_state.batches, True, round_state.index
            reports.append(round_state.report)
            planner.measure(round_state)
            if planner.met and number >= planned - 1:
                break
            if planner.stuck:
                raise ConfigError(f"--target-{kind} {target}: cannot be reached; every group that may shrink is at "
                                  f"its limit (--max-group-ratio, --round-to, --exclude, blocked groups) at "
                                  f"{planner.report.reached:.3f} of the original. Nothing was written.")
        else:
            path = ", ".join(f"{r.reached:.3f}" for r in planner.report.rounds)
            raise ValidationFailed(f"--target-{kind} {target}: still {planner.report.reached:.3f} of the original "
                                   f"as measured after {len(reports)} rounds (after each: {path}); nothing was "
                                   "written")
        merge_rounds(state, reports, original)
        state.report.budget = planner.report


@dataclass
class _LossInputs:
    """What every loss evaluation of a round reads (shipped once per worker by the executor)."""

    token: str
    model: bytes  # the round's model, before removal
    groups: list[ChannelGroup]
    dim_sizes: dict
    input_shapes: dict[str, list[int]]
    batches: list[Feed]
    reference: list[list[np.ndarray]]  # the model's outputs on each batch
    means: dict[Dim, np.ndarray]  # per activation axis of the searched groups: each index's calibration mean


class _Planner:
    """Plans the rounds of one search and keeps its path (``report``)."""

    def __init__(self, kind: str, target: float, options: PruneOptions, meter: LatencyMeter | None,
                 aims: tuple[str, ...]) -> None:
        self.kind, self.target, self.options, self.meter, self.aims = kind, target, options, meter, aims
        self.report = BudgetReport(kind, target, method="analytic" if meter is None else meter.name)
        self.sizes: dict[str, int] = {}  # group name -> channels before the first round
        self.total = 0.0  # the original's cost (MACs, parameters; latency: 1)
        self.original: bytes | None = None  # latency: the original model, timed against every round's result
        self.current = 1.0  # measured cost of the model as it is, as a fraction of the original
        self.table_scale = 1.0  # latency: measured savings over the table's predicted ones, last round
        self.removed_last = 0

    @property
    def met(self) -> bool:
        return self.report.reached is not None and self.report.reached <= self.target

    @property
    def stuck(self) -> bool:
        return self.removed_last == 0 and not self.met

    def plan(self, state: PruneState, goal: float) -> ChannelPlan:
        groups, options = state.groups, state.options
        round_to = state.report.round_to
        model = in_memory(state.model)
        first = not self.sizes
        if first:
            self.original = model.SerializeToString() if self.kind == "latency" else None
        plan = ChannelPlan()
        searched, fixed_groups = [], []
        for g in groups.prunable():
            self.sizes.setdefault(g.name, g.size)
            if any(matches(g, p) for p in options.exclude):
                plan.notes[g.id] = "excluded by --exclude"
            elif any(matches(g, p) for p, _ in options.layer_channels):
                fixed_groups.append(g)  # --layer-channels: its ratio, taken in the first round
            else:
                searched.append(g)
        scored = criteria.channel_scorer(options.criterion, groups, options.reduction,
                                         state.batches)(searched + fixed_groups) if searched or fixed_groups else {}
        order = {gid: np.argsort(scores, kind="stable") for gid, (scores, _) in scored.items()}
        fixed = {}
        for g in fixed_groups:
            ratio = next(r for p, r in options.layer_channels if matches(g, p))
            fixed[g.id] = g.size - round_keep(g.size, g.size * (1 - ratio), round_to) if first else 0
            plan.notes[g.id] = f"--layer-channels: {ratio:g} of its channels, not searched"
        cap = options.max_group_ratio if options.max_group_ratio is not None else DEFAULT_CAP
        allowed = {g.id: [k for k in allowed_keeps(g.size, round_to)
                          if max(1, math.ceil(self.sizes[g.name] * (1 - cap))) <= k < g.size] for g in searched}
        counts = {g.id: _level_counts(g.size, allowed[g.id]) for g in searched}
        levels = self._losses(state, model, searched, counts, order)
        if first:  # budgets are fractions of the model as it came in (before constants were folded)
            self.total = 1.0 if self.kind == "latency" else float(getattr(state.report.before, self.kind) or 0)
        cost = self._cost(state, model, searched, allowed, order)
        final = allocate(levels, cost, self.target * self.total, fixed)  # where the whole search should end
        row = BudgetRound(goal, float("nan"), float("nan"), 0, final.loss)
        aim = {g.id: final.removed.get(g.id, 0) for g in searched}
        scores = {g.id: scored[g.id][0] for g in searched}
        ways = {  # each aim's removals at a cost goal (even: every group the same fraction, all the way down)
            "even": partial(_walk, searched, allowed, cost, fixed=fixed, aim={g.id: g.size for g in searched}),
            "global": partial(_global_way, searched, allowed, cost, fixed=fixed, scores=scores),
            "greedy": lambda at: _walk(searched, allowed, cost, at, fixed, aim) or {**fixed, **aim}}
        ways = {name: ways[name] for name in self.aims}
        row.choice = self.aims[-1]  # when the aims end at the same removals
        ends = {name: way(self.target * self.total) for name, way in ways.items()}
        distinct = {name: end for name, end in ends.items() if end is not None and end not in
                    [ends[other] for other in list(ways)[:list(ways).index(name)]]}
        if len(distinct) > 1:
            # the losses of groups alone are a proxy: compare the end points as the run's recovery leaves them
            row.errors = {name: self._after_recovery(state, model, end, order) for name, end in distinct.items()}
            row.choice = min(row.errors, key=lambda name: (row.errors[name], list(ways).index(name)))
        removed = ways[row.choice](goal * self.total)  # this round's share of the way
        if removed is None:  # the goal is beyond what the way reaches: the greedy plan, all the way
            removed = {**fixed, **aim}
        if self.kind != "latency" and goal <= self.target:  # exact costs, the last rounds: give back what overshoots
            # the target, most important channel first (in earlier rounds it changed the path for the worse on
            # --calib: at --target-macs 0.2545 on digits, output error 0.154 against uniform pruning's 0.135)
            removed = _hand_back(searched, allowed, cost, goal * self.total, removed, scores, order)
        for gid, n in removed.items():
            if n:
                plan.remove[gid] = np.sort(order[gid][:n])
        row.predicted = cost(removed) / self.total
        row.removed = self.removed_last = sum(removed.values())
        self.report.rounds.append(row)
        return plan

    def _after_recovery(self, state: PruneState, model: onnx.ModelProto, removed: dict[int, int],
                        order: dict[int, np.ndarray]) -> float:
        """Output error on ``--calib`` of the round's model with ``removed`` applied to a copy and the run's
        recovery method run on it, against the round's model."""
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        copy = LoadedModel(proto)
        index = _index(proto, state.options.input_shapes)
        kept = apply_plan(GroupSet(index, state.groups.groups, state.groups.dim_sizes),
                          ChannelPlan({gid: np.sort(order[gid][:n]) for gid, n in removed.items() if n}))
        method = recovery_methods.chosen_method(state.options.recover, calibrated=True).name
        result = recover(model, copy, kept, state.batches, method,
                         {d.tensor for d in kept if index.is_constant(d.tensor)})
        self.report.recoveries += 1
        if result.output_error_after is None:  # --recover none
            return output_error(model, copy, state.batches)
        return result.output_error_after if result.kept else result.output_error_before  # an undone recovery

    def _losses(self, state: PruneState, model: onnx.ModelProto, searched: list[ChannelGroup],
                counts: dict[int, list[int]], order: dict[int, np.ndarray]) -> list[Levels]:
        """Each searched group's loss at each count, measured (one executor task per group and count)."""
        tasks = [(g.id, np.sort(order[g.id][:n])) for g in searched for n in counts[g.id]]
        if not tasks:
            return []
        options = state.options
        index = state.groups.index
        activations = [d for g in searched for d in g.dims if not index.is_constant(d.tensor)
                       and index.dtypes.get(d.tensor) in FLOAT_TYPES]
        means = {d: m.mean for d, m in collect_moments(model, activations, state.batches).items()}
        shared = _LossInputs(uuid.uuid4().hex, model.SerializeToString(), state.groups.groups,
                             state.groups.dim_sizes, dict(options.input_shapes), state.batches,
                             _outputs(model, state.batches), means)
        local = options.ray is None and options.workers == 1
        results = iter(run_tasks(_loss, shared, tasks, workers=options.workers, ray=options.ray,
                                 progress="budget: group losses", threads=0 if local else 1))
        self.report.evaluations += len(tasks)
        return [Levels(g.id, (0, *counts[g.id]), (0.0, *(next(results) for _ in counts[g.id]))) for g in searched]

    def _cost(self, state: PruneState, model: onnx.ModelProto, searched: list[ChannelGroup],
              allowed: dict[int, list[int]], order: dict[int, np.ndarray]):
        """The cost of an allocation: MACs or parameters, or latency as a fraction of the original's."""
        if self.kind != "latency":
            return cost_model(state.groups, self.kind).cost
        counts = {g.id: table_counts(g.size, allowed[g.id]) for g in searched}
        feed = {name: value[:1] for name, value in state.batches[0].items()}
        candidates = _pruned_copies(model, state.groups, [(g.id, order[g.id][:n]) for g in searched
                                                          for n in counts[g.id]], state.options.input_shapes)
        ratios = iter(self.meter.ratios(model.SerializeToString(), candidates, feed))
        self.report.timings += sum(len(c) for c in counts.values())
        points = {g.id: {n: next(ratios) - 1.0 for n in counts[g.id]} for g in searched}
        points = shrink_to_macs(points, cost_model(state.groups, "macs"))
        current, scale = self.current, self.table_scale

        def cost(removed: dict[int, int]) -> float:
            change = sum(interpolate(points[gid], n) for gid, n in removed.items() if n and gid in points)
            return current * (1.0 + scale * change)

        return cost

    def measure(self, state: PruneState) -> None:
        """The round's result as it is: stats for MACs and parameters, a timing against the original for latency."""
        if self.kind == "latency":
            feed = {name: value[:1] for name, value in state.batches[0].items()}
            reached = self.meter.measure(self.original, in_memory(state.model).SerializeToString(), feed)
        else:
            after = state.report.after
            reached = (after.macs if self.kind == "macs" else after.params) / self.total
        last = self.report.rounds[-1]
        promised, saved = self.current - last.predicted, self.current - reached
        if self.kind == "latency" and promised > 0 and saved > 0:  # the table's error this round corrects the next
            self.table_scale = min(4.0, max(0.25, self.table_scale * saved / promised))
        self.current = reached
        self.report.reached = reached
        last.reached = reached
        if state.report.recovery is not None:
            last.output_error = state.report.recovery.output_error_after


def _walk(searched: list[ChannelGroup], allowed: dict[int, list[int]], cost, goal: float, fixed: dict[int, int],
          aim: dict[int, int]) -> dict[int, int] | None:
    """Removals the same share of the way from nothing to ``aim`` (channels per group) in every searched group
    (each at its nearest allowed count), at the smallest share whose cost is within the goal; None when even the
    whole way misses it. Aiming at every group's size gives the even allocation (the same fraction everywhere)."""

    def removal(share: float) -> dict[int, int]:
        out = dict(fixed)
        for g in searched:
            out[g.id] = g.size - _nearest(allowed[g.id], g.size, g.size - share * aim.get(g.id, 0))
        return out

    if cost(removal(1.0)) > goal:
        return None
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (low, middle) if cost(removal(middle)) <= goal else (middle, high)
    return removal(high)


def _global_way(searched: list[ChannelGroup], allowed: dict[int, list[int]], cost, goal: float,
                fixed: dict[int, int], scores: dict[int, np.ndarray]) -> dict[int, int] | None:
    """Removals as ``--scope global`` chooses them, at a cost goal instead of a channel ratio: one ranking of every
    channel's score over its group's mean score, lowest first, each group stopping at its lowest allowed count; the
    shortest prefix of that ranking whose cost (each group at its nearest allowed count) is within the goal, found
    by bisection; None when even the whole ranking misses it. Scores normalised per group are what made global
    scope strong on the digits CNN (0.34 of the MACs at 97.2% held-out, against layer scope's 95.1% at 0.25)."""
    limit = {g.id: g.size - min(allowed[g.id], default=g.size) for g in searched}
    ranked: list[int] = []  # group ids, one per channel, in the order the ranking removes them
    room = dict(limit)
    for _, gid in sorted((float(s) / (float(np.mean(scores[gid])) or 1.0), gid) for gid in limit
                         for s in scores[gid]):
        if room[gid] > 0:
            room[gid] -= 1
            ranked.append(gid)

    def removal(n: int) -> dict[int, int]:
        taken = dict.fromkeys(limit, 0)
        for gid in ranked[:n]:
            taken[gid] += 1
        return {**fixed, **{g.id: g.size - _nearest(allowed[g.id], g.size, g.size - taken[g.id]) for g in searched}}

    if cost(removal(len(ranked))) > goal:
        return None
    low, high = 0, len(ranked)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if cost(removal(middle)) <= goal else (middle + 1, high)
    return removal(high)


def _hand_back(searched: list[ChannelGroup], allowed: dict[int, list[int]], cost, goal: float,
               removed: dict[int, int], scores: dict[int, np.ndarray], order: dict[int, np.ndarray]) -> dict[int, int]:
    """``removed`` with channels returned, one allowed step of one group at a time, while the cost stays within the
    goal: the steps that way overshot it (every group moves to its nearest allowed count, all by the same share).
    The step returned first is the one whose channels score highest over their group's mean score."""
    removed = dict(removed)
    while True:
        best = None
        for g in searched:
            now = removed.get(g.id, 0)
            if not now:
                continue
            back = g.size - min([k for k in allowed[g.id] if k > g.size - now] or [g.size])
            trial = {**removed, g.id: back}
            if cost(trial) <= goal:
                value = float(np.mean(scores[g.id][order[g.id][back:now]])) / (float(np.mean(scores[g.id])) or 1.0)
                if best is None or value > best[0]:
                    best = (value, trial)
        if best is None:
            return removed
        removed = best[1]


def _nearest(allowed: list[int], size: int, target: float) -> int:
    """The allowed kept count (or the whole group) nearest ``target``; ties: the smaller one."""
    return min([*allowed, size], key=lambda k: (abs(k - target), k))


def _level_counts(size: int, allowed: list[int]) -> list[int]:
    """Channels to remove at each offered level: every allowed kept count down to the deepest fraction of
    :data:`LEVELS` when there are at most :data:`MAX_LEVELS` of them (small groups: the hand-back can then stop
    close to the goal), else the allowed kept count nearest each fraction."""
    deepest = size * (1 - max(LEVELS))
    fine = [k for k in allowed if k >= deepest - 0.5]
    if len(fine) <= MAX_LEVELS:
        return sorted(size - k for k in fine)
    keeps = {min(allowed, key=lambda k: (abs(k - size * (1 - f)), k)) for f in LEVELS}
    return sorted(size - k for k in keeps)


def _outputs(model: onnx.ModelProto, batches: list[Feed]) -> list[list[np.ndarray]]:
    session = _session(model.SerializeToString(), 0)
    return [session.run(None, feed) for feed in batches]


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    return create_session(model, "CPUExecutionProvider", threads)[0]


_PREPARED: dict[str, tuple[onnx.ModelProto, GroupSet]] = {}  # per process: the round's model and groups, by token


def _prepared(shared: _LossInputs) -> tuple[onnx.ModelProto, GroupSet]:
    """The round's model with an index for its groups, built once per process and round."""
    if shared.token not in _PREPARED:
        _PREPARED.clear()
        proto = onnx.ModelProto.FromString(shared.model)
        index = _index(proto, shared.input_shapes)
        _PREPARED[shared.token] = (proto, GroupSet(index, shared.groups, shared.dim_sizes))
    return _PREPARED[shared.token]


def _index(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> GraphIndex:
    model = LoadedModel(proto)
    return GraphIndex(model, static_input_shapes(model, input_shapes))


def _loss(shared: _LossInputs, task: tuple[int, np.ndarray]) -> float:
    """Relative squared error of the outputs with one group's channels replaced by their means, on ``--calib``."""
    proto, groups = _prepared(shared)
    gid, channels = task
    session = _session(_mean_replaced(proto, groups, gid, channels, shared.means).SerializeToString(),
                       worker_threads())
    num = den = 0.0
    for feed, reference in zip(shared.batches, shared.reference):
        for out, ref in zip(session.run(None, feed), reference):
            num += float(np.sum((out.astype(np.float64) - ref) ** 2))
            den += float(np.sum(np.asarray(ref, np.float64) ** 2))
    if not math.isfinite(num):
        raise OnnxPruneError(f"internal error: non-finite outputs with channels of group {gid} masked")
    return num / den if den > 0 else num


def _mean_replaced(proto: onnx.ModelProto, groups: GroupSet, gid: int, channels: np.ndarray,
                   means: dict[Dim, np.ndarray]) -> onnx.ModelProto:
    """``proto`` with the given channels of group ``gid`` replaced by their calibration means: ``x * keep + mean *
    (1 - keep)`` after every float activation of the group (one axis per tensor; a second one gets no mean)."""
    index, group = groups.index, groups.groups[gid]
    edits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for dim in group.dims:
        dtype = index.dtypes.get(dim.tensor)
        if index.is_constant(dim.tensor) or dtype not in FLOAT_TYPES:
            continue
        shape = [1] * index.rank(dim.tensor)
        shape[dim.axis] = groups.dim_sizes[dim]
        gone = np.zeros(groups.dim_sizes[dim], dtype=bool)
        gone[group.indices_of(dim, channels)] = True
        keep, fill = (~gone).reshape(shape), np.where(gone, means.get(dim, 0.0), 0.0).reshape(shape)
        if dim.tensor in edits:  # a second axis of the same tensor: masked too, its mean not added
            keep, fill = edits[dim.tensor][0] * keep, edits[dim.tensor][1] * keep
        np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        edits[dim.tensor] = (keep.astype(np_type), fill.astype(np_type))
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    nodes = []
    for original in proto.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        nodes.append(node)
        for k, out in enumerate(original.output):
            if out in edits:  # groups never run along a graph input (it cannot shrink), so a node produces it
                keep, fill = edits[out]
                node.output[k] = out + "__raw"
                graph.initializer.extend([onnx.numpy_helper.from_array(keep, out + "__keep"),
                                          onnx.numpy_helper.from_array(fill, out + "__mean")])
                nodes += [onnx.helper.make_node("Mul", [out + "__raw", out + "__keep"], [out + "__kept"]),
                          onnx.helper.make_node("Add", [out + "__kept", out + "__mean"], [out])]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model


def _pruned_copies(model: onnx.ModelProto, groups: GroupSet, removals: list[tuple[int, np.ndarray]],
                   input_shapes: dict[str, list[int]]) -> Iterator[bytes]:
    """The model with one group's channels removed, for each (group id, channels), one at a time."""
    for gid, channels in removals:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        index = _index(proto, input_shapes)
        apply_plan(GroupSet(index, groups.groups, groups.dim_sizes), ChannelPlan({gid: np.sort(channels)}))
        yield proto.SerializeToString()
