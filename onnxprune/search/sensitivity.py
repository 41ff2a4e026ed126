"""Sensitivity: what pruning each group of coupled channels ALONE costs, at a few ratios, with and without recovery.

Why measured and per group: one ratio for every group is far from the best allocation, and a user cannot guess which
groups are fragile. Each (group, ratio, recovery) is one independent task: the pipeline prunes that group only (every
other prunable group is excluded by a name only it carries), then the pruned model is compared with the original on
the calibration data (selection) and, when given, on held-out data (judgement only), and timed against the original
on each provider. Tasks run through :func:`onnxprune.search.executor.run_tasks`: locally or on Ray, same results.
"""

from __future__ import annotations

import fnmatch
import glob
import time
from dataclasses import dataclass, field, replace

import onnx

from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.data import sources
from onnxprune.data.loader import DataOptions, Feed, load_data
from onnxprune.data.sources import Dataset
from onnxprune.errors import ConfigError, DataError, InputModelError, OnnxPruneError
from onnxprune.graph.check import check_input_model
from onnxprune.graph.io import LoadedModel, from_proto, load_model
from onnxprune.graph.stats import check_input_shapes
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.recovery import registry as recovery_methods
from onnxprune.search.executor import run_tasks, worker_threads
from onnxprune.search.cost import CostModel, cost_model
from onnxprune.validate import providers as prov
from onnxprune.validate.accuracy import PairResult, evaluate_pair
from onnxprune.validate.latency import measure_pair

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
NO_RECOVERY = "none"


@dataclass(frozen=True)
class SensitivityOptions:
    """What to measure. ``prune`` carries the pruning choices every task shares (criterion, rounding, calibration
    file and limit, image preprocessing, input shapes); its ``channels``, ``exclude`` and ``recover`` are set per
    task."""

    prune: PruneOptions
    data: DataOptions | None = None  # held-out data: judged on, never used to select
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    only: tuple[str, ...] = ()  # globs: measure only the groups with a matching node or tensor name (default: all)
    recover: str | None = None  # the recovery compared with none (None: the default with calibration data, lsq)
    providers: str = "cpu"
    warmup: int = 3
    runs: int = 20  # timed runs per model and provider; 0: no latency
    workers: int = 1
    ray: str | None = None
    threads: int = 1  # onnxruntime intra-op threads per worker session


@dataclass(frozen=True)
class Task:
    """One evaluation: group ``group`` alone at ``ratio``, recovered with ``recover``."""

    group: int
    ratio: float
    recover: str
    exclude: tuple[str, ...]  # one name per other prunable group: only that group carries it
    timed: bool  # latency is a property of the structure, which recovery does not change: timed once


@dataclass
class Score:
    """How close the pruned model stays to the original on one data set. ``loss`` is what selection ranks by: the
    top-1 drop with labels, else 1 - top-1 agreement (classification output), else 1 - mean cosine."""

    loss: float
    metric: str  # "top1_drop" | "disagreement" | "1-cosine"
    agreement: float | None
    cosine: float
    top1: float | None  # pruned top-1 accuracy (labels only)
    top1_original: float | None


@dataclass
class Row:
    group: int
    ratio: float
    recover: str
    removed: int  # channels removed (rounding may remove fewer than asked, or none)
    macs_kept: float | None  # whole model's MACs after / before (None: unknown, dynamic shapes)
    params_kept: float
    selection: Score  # on --calib
    judged: Score | None  # on --data
    speedup: dict[str, float] | None  # per provider: original median / pruned median
    seconds: float  # the task's wall time in its worker: prune_s + compare_s + latency_s + loading
    prune_s: float  # selecting (the criterion) and removing the channels, and recovery
    compare_s: float  # running both models over --calib and --data
    latency_s: float  # timing both models on every provider


@dataclass
class GroupInfo:
    id: int
    name: str
    channels: int
    macs_share: float | None  # share of the model's MACs that shrinks with this group's channels (None: unknown)
    key: str | None  # the name that addresses this group alone (None: no such name: not measured)


@dataclass
class SensitivityResult:
    model: str
    groups: list[GroupInfo]
    rows: list[Row]
    frozen: list[tuple[str, str]]  # (group, why it cannot be pruned)
    macs: CostModel | None = None  # MACs of any combination of removals (the frontier's estimate)
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


@dataclass
class _Shared:
    """Shipped once per worker: the model's bytes and every array the tasks read."""

    model: bytes
    base: PruneOptions
    selection: Dataset
    judge: Dataset | None
    batch_size: int
    providers: list[str]
    warmup: int
    runs: int


def run_sensitivity(path: str, options: SensitivityOptions) -> SensitivityResult:
    """Measure every prunable group alone at every ratio, with no recovery and with ``options.recover``.

    Raises:
        ConfigError (2): no calibration data, bad ratios, an unknown recovery; InputModelError (3): unreadable,
        invalid, or too large to hold as one message; ProviderUnavailable (6); DataError (7): the data does not fit.
    """
    started = time.perf_counter()
    _check(options)
    providers = prov.resolve(options.providers)  # the first also computes the losses, as in validate
    if not providers:
        raise ConfigError("--providers auto found no usable execution provider")
    model = load_model(path)
    check_input_model(model)
    check_input_shapes(model, options.prune.input_shapes)
    if not model.fits_in_memory:
        raise InputModelError(f"{path}: too large for sensitivity analysis (each worker holds the model in memory)")
    shared = _shared(model, options, providers)
    groups = find_groups(model, options.prune.input_shapes)
    infos = _group_infos(groups)
    notes = []
    try:
        macs: CostModel | None = cost_model(groups, "macs")
    except ConfigError:  # dynamic shapes: no MACs without --input-shape
        macs = None
        notes.append("MACs unknown (dynamic shapes): give --input-shape for MACs shares, MACs kept and the frontier")
    for info in infos:  # the share of the model's MACs that shrinks with this group's channels
        info.macs_share = 1 - macs.cost({info.id: info.channels}) / macs.total if macs else None
    recoveries = [NO_RECOVERY] + [m for m in [_recovery(options)] if m != NO_RECOVERY]
    keys = {g.id: g.key for g in infos if g.key is not None}
    measured = [g for g in infos if g.key is not None and _selected(groups, g.id, options.only)]
    if not measured:
        raise ConfigError(f"--only {' '.join(options.only)}: no prunable group matches" if options.only
                          else "no channel group can be pruned alone: nothing to measure")
    tasks = [Task(g.id, ratio, method, tuple(k for gid, k in keys.items() if gid != g.id), method == NO_RECOVERY)
             for g in measured for ratio in options.ratios for method in recoveries]
    rows = run_tasks(evaluate_task, shared, tasks, workers=options.workers, ray=options.ray,
                     progress="sensitivity", threads=options.threads)
    notes += [f"group {g.name}: no node or tensor name belongs to it alone, so it cannot be pruned alone; not measured"
              for g in infos if g.key is None]
    return SensitivityResult(
        model=str(path), groups=measured, rows=rows, macs=macs,
        frozen=[(g.name, "; ".join(g.blocked) or "fewer than 2 channels") for g in groups.groups if not g.prunable],
        notes=notes,
        options={"ratios": list(options.ratios), "recover": recoveries, "criterion": options.prune.criterion,
                 "round_to": options.prune.round_to, "calib": options.prune.calib,
                 "calib_samples": shared.selection.num_samples,
                 "data": options.data.path if options.data else None,
                 "data_samples": shared.judge.num_samples if shared.judge else None,
                 "providers": [prov.short_name(p) for p in providers] if options.runs else [],
                 "runs": options.runs,
                 "workers": options.workers, "ray": options.ray, "threads": options.threads},
        elapsed_s=time.perf_counter() - started)


def _check(options: SensitivityOptions) -> None:
    if not options.prune.calib:
        raise ConfigError("sensitivity needs calibration data (--calib): it selects on it")
    if not options.ratios:
        raise ConfigError("--ratios: give at least one ratio")
    bad = [r for r in options.ratios if not 0 < r < 1]
    if bad:
        raise ConfigError(f"--ratios: every ratio must be in (0, 1), got {', '.join(map(str, bad))}")
    if len(set(options.ratios)) != len(options.ratios):
        raise ConfigError(f"--ratios: {', '.join(map(str, options.ratios))} repeats a ratio")
    _recovery(options)


def _recovery(options: SensitivityOptions) -> str:
    return recovery_methods.chosen_method(options.recover, calibrated=True).name


def _shared(model: LoadedModel, options: SensitivityOptions, providers: list[str]) -> _Shared:
    """Load the data once, in the parent: a data error is reported before any worker starts."""
    fixed = sources.batch_dim(sources.input_specs(model.proto))
    base = options.prune
    calib = DataOptions(path=base.calib, limit=base.calib_limit, batch_size=fixed or base.calib_batch,
                        preprocess=base.preprocess)
    selection = _nonempty(load_data(model, calib, base.input_shapes))
    judge = None
    if options.data is not None and options.data.path:
        judge = _nonempty(load_data(model, replace(options.data, preprocess=base.preprocess), base.input_shapes))
    return _Shared(model.proto.SerializeToString(), base, selection, judge, calib.batch_size, providers,
                   options.warmup, options.runs)


def _nonempty(data: Dataset) -> Dataset:
    if data.num_samples == 0:
        raise DataError(f"{data.source}: no samples")
    return data


def _group_infos(groups: GroupSet) -> list[GroupInfo]:
    prunable = groups.prunable()
    return [GroupInfo(g.id, g.name, g.size, 0.0, _own_name(g, prunable)) for g in prunable]


def _selected(groups: GroupSet, group_id: int, only: tuple[str, ...]) -> bool:
    group = next(g for g in groups.groups if g.id == group_id)
    return not only or any(fnmatch.fnmatchcase(n, p) for p in only for n in _names(group))


def _names(group: ChannelGroup) -> list[str]:
    """The names ``--exclude`` matches a group by: its producer nodes and the tensors it runs through."""
    return list(group.producers) + [d.tensor for d in group.dims]


def _own_name(group: ChannelGroup, prunable: list[ChannelGroup]) -> str | None:
    """A glob that matches this group and no other (a tensor can carry two groups on two axes, e.g. a Gemm
    weight), escaped so that names with ``*?[`` match literally."""
    taken = {n for g in prunable if g.id != group.id for n in _names(g)}
    own = next((n for n in _names(group) if n not in taken), None)
    return None if own is None else glob.escape(own)


def evaluate_task(shared: _Shared, task: Task) -> Row:
    """One task (runs in a worker): prune the group alone, compare with the original, time it."""
    started = time.perf_counter()
    model = from_proto(onnx.load_from_string(shared.model))
    feeds: list[Feed] = [feed for feed, _ in shared.selection.batches(shared.batch_size)]
    options = replace(shared.base, channels=task.ratio, exclude=task.exclude, recover=task.recover, calib=None,
                      steps=1, verify=False, quantize=None, sparsity=None, pattern=None)
    report = prune_model(model, options, batches=feeds)
    pruned_at = time.perf_counter()
    changed = [r.id for r in report.groups if r.after != r.before]
    if any(gid != task.group for gid in changed):
        raise OnnxPruneError(f"sensitivity: pruning group {task.group} alone changed groups {changed}")
    removed = next((r.before - r.after for r in report.groups if r.id == task.group), 0)
    pruned = model.proto.SerializeToString()
    threads = worker_threads()
    original_session, _ = prov.create_session(shared.model, shared.providers[0], threads)
    pruned_session, _ = prov.create_session(pruned, shared.providers[0], threads)
    selection = score(evaluate_pair(original_session, pruned_session, shared.selection, shared.batch_size))
    judged = (score(evaluate_pair(original_session, pruned_session, shared.judge, shared.batch_size))
              if shared.judge is not None else None)
    del original_session, pruned_session
    compared_at = time.perf_counter()
    speedup = None
    if task.timed and shared.runs > 0:
        feed = next(shared.selection.batches(shared.batch_size))[0]
        speedup = {prov.short_name(p): measure_pair(shared.model, pruned, p, feed, threads, shared.warmup,
                                                     shared.runs)["speedup"] for p in shared.providers}
    done = time.perf_counter()
    before, after = report.before, report.after
    return Row(
        group=task.group, ratio=task.ratio, recover=task.recover, removed=removed,
        macs_kept=after.macs / before.macs if before.macs and after.macs is not None else None,
        params_kept=after.params / before.params if before.params else 1.0,
        selection=selection, judged=judged, speedup=speedup, seconds=done - started,
        prune_s=pruned_at - started, compare_s=compared_at - pruned_at, latency_s=done - compared_at)


def score(pair: PairResult) -> Score:
    """The loss selection ranks by (see :class:`Score`), from one comparison."""
    accuracy = pair.accuracy
    name = accuracy["output"] if accuracy else next(
        (n for n, r in pair.outputs.items() if r["classification"]), next(iter(pair.outputs)))
    out = pair.outputs[name]
    agreement, cosine = out["top1_agreement"], out["cosine_mean"]
    if accuracy:
        loss, metric = accuracy["top1_drop"], "top1_drop"
    elif agreement is not None:
        loss, metric = 1.0 - agreement, "disagreement"
    else:
        loss, metric = 1.0 - cosine, "1-cosine"
    return Score(loss=loss, metric=metric, agreement=agreement, cosine=cosine,
                 top1=accuracy["pruned"]["top1"] if accuracy else None,
                 top1_original=accuracy["original"]["top1"] if accuracy else None)
