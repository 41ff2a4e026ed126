"""The prune job end to end: load, remove channels, zero weights, save atomically, measure before and after.

The CLI's ``prune`` command only turns options into :class:`PruneOptions` and renders the :class:`PruneReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxprune.data.probe import collect_moments
from onnxprune.channels import Dim
from onnxprune.channels.groups import GroupSet, build_groups
from onnxprune.errors import ConfigError, OutputError
from onnxprune.graph.check import check_input_model
from onnxprune.graph.fold import fold_constant_subgraphs
from onnxprune.graph.index import GraphIndex, attr, is_weighted
from onnxprune.graph.io import INLINE_LIMIT_BYTES, LoadedModel, default_output_path, load_model, save_model
from onnxprune.prune.structured import ChannelPlan, apply_plan, cpu_block, plan_channels
from onnxprune.prune.verify import feed_shapes, in_memory, masked_model, random_values, relative_difference, run
from onnxprune.prune.unstructured import UnstructuredResult, find_weights, prune_unstructured, to_sparse_storage
from onnxprune.importance.recon import recon_scores
from onnxprune.recovery.recover import RecoveryResult, Reselect, output_error, recover
from onnxprune.graph.stats import ModelStats, check_input_shapes, model_stats, static_input_shapes


@dataclass
class PruneOptions:
    """Everything a prune run can be asked to do; defaults match the CLI's."""

    channels: float | None = None
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    scope: str = "layer"
    criterion: str = "auto"  # auto: l1, or with calibration data recon (channels) and obs (weights; wanda without lsq)
    reduction: str = "mean"
    round_to: int | None = None  # None: the CPU's NCHWc block (16 with AVX-512, else 8)
    exclude: tuple[str, ...] = ()
    layer_channels: tuple[tuple[str, float], ...] = ()
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    min_params: int = 0
    max_group_ratio: float | None = None
    sparse_storage: bool = False
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: str | None = None  # .npz or image folder, as for validation data
    calib_limit: int | None = 256
    calib_batch: int = 32
    recover: str | None = None  # None: "lsq" with calibration data, else "none"
    verify: bool = False  # prove the channel removal against the masked original on random inputs
    steps: int = 1  # remove the channels in this many rounds, recovering after each (with --calib)


@dataclass
class GroupRow:
    """One channel group in the report."""

    id: int
    name: str
    producers: list[str]
    members: list[str]
    before: int
    after: int
    blocked: list[str]
    note: str | None


@dataclass
class PruneReport:
    input: str
    output: str
    before: ModelStats
    after: ModelStats
    output_size: int
    groups: list[GroupRow] = field(default_factory=list)
    unstructured: UnstructuredResult | None = None
    notes: list[str] = field(default_factory=list)
    round_to: int | None = None
    recovery: RecoveryResult | None = None
    structure_changed: bool = False  # False: only weight values changed, so the saved graph needs no re-check


def find_groups(model: LoadedModel, input_shapes: dict[str, list[int]] | None = None) -> GroupSet:
    """Every group of coupled channels of ``model`` (the Python API for listing and explicit removal)."""
    return build_groups(GraphIndex(model, static_input_shapes(model, input_shapes)))


def prune_channels(model: LoadedModel, options: PruneOptions, batches: list | None = None,
                   index: GraphIndex | None = None) -> tuple[GroupSet, ChannelPlan, int, dict[Dim, np.ndarray]]:
    """Plan and apply structured removal in place; returns (groups, the plan applied, round_to, kept indices)."""
    groups = build_groups(index) if index is not None else find_groups(model, options.input_shapes)
    round_to = options.round_to if options.round_to is not None else cpu_block()
    criterion = options.criterion
    if criterion == "auto":
        criterion = "recon" if batches else "l1"
    activation = None
    if criterion == "act" and batches:
        dims = [d for g in groups.prunable() for d in g.dims if not groups.index.is_constant(d.tensor)]
        moments = collect_moments(model.proto, dims, batches, base_dir=model.base_dir)
        activation = {d: m.mean_abs for d, m in moments.items()}
    given = None
    if criterion == "recon":
        if not batches:
            raise ConfigError("--criterion recon needs calibration data (--calib)")
        given = recon_scores(groups, groups.prunable(), model.proto, batches, model.base_dir)
    plan = plan_channels(groups, options.channels or 0.0, options.scope, criterion, options.reduction,
                         round_to, options.exclude, options.layer_channels, options.max_group_ratio, activation,
                         given)
    kept = apply_plan(groups, plan)
    return groups, plan, round_to, kept


def _calibration(model: LoadedModel, options: PruneOptions) -> list[dict[str, np.ndarray]] | None:
    if not options.calib:
        if options.recover not in (None, "none"):
            raise ConfigError(f"--recover {options.recover} needs calibration data (--calib)")
        return None
    from onnxprune.validate import ValidateOptions, load_dataset

    data = load_dataset(model, ValidateOptions(data=options.calib, limit=options.calib_limit),
                        options.input_shapes, options.calib_batch)
    return [feed for feed, _ in data.batches(options.calib_batch)]


def _prune_in_steps(model: LoadedModel, options: PruneOptions) -> PruneReport:
    """Remove channels in ``options.steps`` equal rounds (each keeps the same fraction), recovering after each, so
    every round re-fits to a model that is still close to the last one. Weight sparsity is applied in the last."""

    def per_step(ratio: float) -> float:
        return 1.0 - (1.0 - ratio) ** (1.0 / options.steps)

    original = None
    if options.calib and model.runnable():
        original = onnx.ModelProto()
        original.CopyFrom(model.proto)
    reports = []
    for step in range(options.steps):
        last = step == options.steps - 1
        reports.append(prune_model(model, replace(
            options, steps=1, channels=per_step(options.channels),
            layer_channels=tuple((glob, per_step(r)) for glob, r in options.layer_channels),
            sparsity=options.sparsity if last else None, pattern=options.pattern if last else None)))
    first, final = reports[0], reports[-1]
    final.before = first.before
    final.input = first.input
    initial = {g.name: g.before for g in first.groups}
    for g in final.groups:
        g.before = initial.get(g.name, g.before)
    final.structure_changed = any(r.structure_changed for r in reports)
    final.notes = [f"step {k + 1}/{options.steps}: {n}" for k, r in enumerate(reports) for n in r.notes]
    rounds = [r.recovery for r in reports if r.recovery is not None]
    if rounds and original is not None and model.runnable():
        merged = replace(rounds[-1], layers=[x for r in rounds for x in r.layers], notes=[],
                         seconds=sum(r.seconds for r in rounds), kept=all(r.kept for r in rounds),
                         steps=[(r.output_error_before, r.output_error_after) for r in rounds])
        merged.output_error_before = rounds[0].output_error_before
        merged.output_error_after = output_error(original, model, _calibration(model, options))
        final.recovery = merged
    return final


VERIFY_TOLERANCE = 1e-3
VERIFY_BATCH = 2


def _verify_feeds(model: LoadedModel, options: PruneOptions) -> dict[str, np.ndarray]:
    """The random inputs ``--verify`` will use, drawn before any work: a run that cannot be verified fails at once
    with the reason and the fix, instead of after pruning or (worse) passing without a check.

    Raises:
        ConfigError: no channel removal was asked for, so there is nothing to prove; a bad ``--input-shape``.
        OutputError: the oracle cannot run: the model is too big to hold in memory, or an input has dynamic dims
            other than the batch and no ``--input-shape``.
    """
    if not options.channels:
        raise ConfigError("--verify proves a channel removal: give --channels above 0 (weight sparsity alone "
                          "changes no structure to check)")
    if model.file_size > INLINE_LIMIT_BYTES:
        raise OutputError(f"--verify cannot run: the model is {model.file_size / 1e9:.1f} GB and the oracle runs it "
                          f"in onnxruntime from memory, which protobuf limits to {INLINE_LIMIT_BYTES / 1e9:.1f} GB; "
                          "prune without --verify. Nothing was written.")
    check_input_shapes(model, options.input_shapes)  # prune_file checks them too; library callers may not
    shapes, dynamic = feed_shapes(model.proto, VERIFY_BATCH, options.input_shapes)
    if dynamic:
        first = dynamic[0]
        raise OutputError(f"--verify cannot run: input '{first.name}' [{', '.join(map(str, first.dims))}] has "
                          f"dynamic dims ({', '.join(first.unknown)}) other than the batch, so the oracle cannot "
                          f"choose its shape; give --input-shape {first.name}:{first.example()} with each N set to "
                          "the size the model runs at. Nothing was written.")
    return random_values(model.proto, shapes)


def _verify(reference: onnx.ModelProto, model: LoadedModel, groups: GroupSet, plan: ChannelPlan,
            feeds: dict[str, np.ndarray]) -> str:
    """The postcondition of channel removal: the structurally pruned model must give the outputs of ``reference``
    (the model just before removal, held in memory) with the removed channels masked to zero.

    Returns what was proved, for the report. ``reference`` is consumed (masked in place) to spare a copy.

    Raises:
        OutputError: a mismatch, or onnxruntime cannot run one of the two models; nothing is written.
    """
    if not plan.remove:
        return "--verify: no channel was removed (see the groups), so the structure is unchanged and there was no " \
               "removal to prove"
    expected = _run_for_verify(masked_model(reference, groups, plan.remove, in_place=True), feeds,
                               "--verify cannot run: onnxruntime cannot run the original model with the removed "
                               "channels masked")
    actual = _run_for_verify(in_memory(model, copy=False), feeds,
                             "internal error: onnxruntime cannot run the pruned model")
    difference = relative_difference(expected, actual)
    if not difference <= VERIFY_TOLERANCE:
        raise OutputError(f"internal error: --verify found the pruned model differs from the original with the "
                          f"removed channels masked (max relative difference {difference:.3g} on random inputs); "
                          "nothing was written. Please report this with the model.")
    shapes = ", ".join(f"{name} {'x'.join(map(str, v.shape))}" for name, v in feeds.items())
    removed = sum(len(ids) for ids in plan.remove.values())
    return (f"verified the channel removal: on random inputs ({shapes}) the model with {removed} channel(s) removed "
            f"gives the outputs of the model before removal with those channels masked to zero (max relative "
            f"difference {difference:.2g})")


def _run_for_verify(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], failure: str) -> list[np.ndarray]:
    try:
        return run(proto, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise OutputError(f"{failure} ({first}); nothing was written") from None


def _changed_after_removal(report: PruneReport) -> str:
    """What later steps did to the weights the verified model had, for the end of the ``--verify`` note."""
    steps = []
    if report.unstructured is not None and any(w.zeros_after != w.zeros_before for w in report.unstructured.weights):
        steps.append("weight sparsity zeroed weights")
    if report.recovery is not None and report.recovery.kept and any(f.accepted for f in report.recovery.layers):
        steps.append(f"recovery ({report.recovery.method}) re-fitted weights")
    if not steps:
        return ""
    return (f"; after that, {' and '.join(steps)} on purpose, so the saved model is not expected to equal the "
            "masked original")


def _feature_norms(index: GraphIndex, batches: list) -> dict[str, np.ndarray]:
    """Per weight: L2 norm over the calibration data of each input feature the weight multiplies (for Wanda).

    A grouped conv's weight [O, C/g, ...] has column i of output o reading input channel (o // (O/g)) * C/g + i,
    so its norms come back as an [O, C/g, 1, ...] array that broadcasts against the weight."""
    wanted: dict[str, Dim] = {}
    grouped: dict[str, tuple[int, tuple[int, ...]]] = {}
    for w in find_weights(index):
        node = next(u.node for u in index.consumers_of(w.name) if is_weighted(u.node))
        if node.input[0] == w.name:
            continue
        rank = index.rank(node.input[0])
        if rank is None:
            continue
        axis = rank - 1 if node.op_type == "MatMul" else (0 if int(attr(node, "transA", 0)) else 1)
        wanted[w.name] = Dim(node.input[0], axis)
        groups = int(attr(node, "group", 1)) if node.op_type == "Conv" else 1
        if groups > 1 and len(w.shape) >= 2:
            grouped[w.name] = (groups, w.shape)
    moments = collect_moments(index.model.proto, list(set(wanted.values())), batches,
                              base_dir=index.model.base_dir)
    norms = {name: np.sqrt(moments[d].s2) for name, d in wanted.items()}
    for name, (groups, shape) in grouped.items():
        out, per = shape[0], shape[1]
        table = norms[name].reshape(groups, per)[np.arange(out) // (out // groups)]
        norms[name] = table.reshape((out, per) + (1,) * (len(shape) - 2))
    return norms


def _weight_criterion(options: PruneOptions, batches: list | None, report: PruneReport, too_big: bool) -> str:
    """The criterion for single weights: channel-only criteria fall back to l1; obs needs data and lsq."""
    criterion = options.criterion
    lsq = (options.recover or "lsq") == "lsq" and not too_big  # models too big to hold skip recovery
    if criterion == "auto":
        return ("obs" if lsq else "wanda") if batches else "l1"
    if criterion == "obs" and batches and too_big:
        report.notes.append("criterion obs chooses weights during recovery, which models over "
                            f"{INLINE_LIMIT_BYTES / 1e9:.1f} GB skip: weights ranked by wanda")
        return "wanda"
    if criterion not in ("l1", "l2", "wanda", "obs"):
        report.notes.append(f"criterion {criterion} applies to channels; weights ranked by l1")
        return "l1"
    if criterion in ("wanda", "obs") and not batches:
        raise ConfigError(f"--criterion {criterion} needs calibration data (--calib)")
    if criterion == "obs" and (options.recover or "lsq") != "lsq":
        raise ConfigError("--criterion obs chooses the zeros while re-fitting each layer: it needs --recover lsq")
    return criterion


def prune_model(model: LoadedModel, options: PruneOptions) -> PruneReport:
    """Prune ``model`` in place according to ``options``; the report's output fields are filled by the caller."""
    if options.steps > 1 and options.channels:
        return _prune_in_steps(model, options)
    verify_feeds = _verify_feeds(model, options) if options.verify else None
    if options.calib and options.recover != "none" and model.external and model.file_size <= INLINE_LIMIT_BYTES:
        model.hold_changes = True  # recovery runs the changed model in onnxruntime
    too_big = model.external and not model.hold_changes  # its changes are streamed out: no recovery
    shapes = static_input_shapes(model, options.input_shapes)
    index = GraphIndex(model, shapes)
    prunes_weights = bool(options.sparsity or options.pattern) and not options.channels
    # weights that unstructured pruning reads anyway are counted there, not read an extra time here
    before = model_stats(model, index=index, zeros={} if not prunes_weights else
                         {w.name: 0 for w in find_weights(index)})
    folded = fold_constant_subgraphs(index)  # after "before": the stats describe the input as it is
    if folded:
        index = GraphIndex(model, shapes)
    report = PruneReport(str(model.path or ""), "", before, before, 0)
    report.structure_changed = bool(folded or options.channels or options.sparse_storage)
    if folded:
        report.notes.append(f"folded {folded} node(s) computed from constants into initializers "
                            "(weights behind Identity/Cast/Reshape and the like)")
    batches = _calibration(model, options)
    if options.criterion == "auto" and batches:
        chosen = ["recon for channels"] if options.channels else []
        if options.sparsity or options.pattern:
            chosen.append(f"{_weight_criterion(options, batches, report, too_big)} for weights")
        report.notes.append(f"criterion auto with calibration data: {', '.join(chosen)}")
    original = None
    if batches:
        original = onnx.ModelProto()
        original.CopyFrom(model.proto)
    changed: set[str] = set()
    kept: dict[Dim, np.ndarray] = {}
    proof = None  # what --verify proved, reported once the later steps are known
    if options.channels:
        # the model just before removal, in memory (external data loaded: pruning may stream its changes to the
        # output's unfinished data file, which onnxruntime cannot read)
        reference = in_memory(model) if verify_feeds is not None else None
        groups, plan, report.round_to, kept = prune_channels(model, options, batches, index)
        if reference is not None:
            proof = _verify(reference, model, groups, plan, verify_feeds)
            del reference  # masked in place; free it before sparsity and recovery
        changed |= {d.tensor for d in kept if groups.index.is_constant(d.tensor)}
        report.groups = _group_rows(groups, plan.remove, plan.notes)
        if not groups.prunable():
            report.notes.append("no channel group can be pruned (see the reasons above); channels are unchanged")
    reselect: dict[str, Reselect] = {}
    if options.sparsity or options.pattern:
        criterion = _weight_criterion(options, batches, report, too_big)
        index = GraphIndex(model, shapes) if options.channels else index
        norms = _feature_norms(index, batches) if criterion in ("wanda", "obs") else None
        report.unstructured = prune_unstructured(index, options.sparsity, options.scope,
                                                 "wanda" if criterion == "obs" else criterion, options.exclude,
                                                 options.layer_sparsity, options.min_params, options.pattern, norms)
        changed |= {w.name for w in report.unstructured.weights if w.zeros_after != w.zeros_before}
        if criterion == "obs":  # wanda set how many zeros each tensor gets; lsq chooses which, by OBS
            reselect = {w.name: Reselect(None if options.pattern else w.zeros_after, options.pattern)
                        for w in report.unstructured.weights if not w.skipped and w.name in changed}
        if not report.unstructured.weights:
            report.notes.append("no prunable weights (constant float weights of Conv, ConvTranspose, Gemm or "
                                "MatMul): weights are unchanged")
        if options.sparse_storage:
            _sparse_storage(model, index, report)
    if batches:
        method = options.recover or "lsq"
        report.recovery = recover(original, model, kept, batches, method, changed, reselect=reselect)
        report.notes += report.recovery.notes
    known = None
    if report.unstructured is not None:
        known = {w.name: w.zeros_after for w in report.unstructured.weights}
    if prunes_weights:
        before_zeros = {w.name: w.zeros_before for w in report.unstructured.weights}
        for layer in report.before.layers:
            if layer.weight in before_zeros and layer.params:
                layer.zeros = before_zeros[layer.weight]
    if proof is not None:
        report.notes.append(proof + _changed_after_removal(report))
    report.after = model_stats(model, options.input_shapes, zeros=known)
    report.after.file_size = 0  # known once saved
    return report


def _sparse_storage(model: LoadedModel, index: GraphIndex, report: PruneReport) -> None:
    if model.external:
        report.notes.append("--sparse-storage skipped: external-data models keep dense weights")
        return
    backup = onnx.ModelProto()
    backup.CopyFrom(model.proto)
    names = [w.name for w in report.unstructured.weights if not w.skipped]
    moved = to_sparse_storage(index, names)
    if not moved:
        report.notes.append("--sparse-storage: no tensor is sparse enough for COO storage to be smaller")
        return
    try:
        import onnxruntime as ort

        model.proto.ir_version = min(model.proto.ir_version, 10)
        ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        report.notes.append(f"--sparse-storage: {len(moved)} tensors stored as sparse initializers")
    except Exception as exc:  # onnxruntime refuses some sparse layouts: keep the dense model instead
        model.proto.CopyFrom(backup)
        report.notes.append(f"--sparse-storage fell back to dense storage: onnxruntime could not load it ({exc})")


def _group_rows(groups: GroupSet, removed: dict[int, np.ndarray], plan_notes: dict[int, str]) -> list[GroupRow]:
    rows = []
    for g in groups.groups:
        gone = len(removed.get(g.id, ()))
        members = [f"{d.tensor}[{d.axis}]" for d in g.dims]
        rows.append(GroupRow(g.id, g.name, g.producers, members, g.size, g.size - gone, g.blocked,
                             plan_notes.get(g.id)))
    return rows


def prune_file(input_path: str | Path, output_path: str | Path | None, options: PruneOptions) -> PruneReport:
    """Load, prune, save atomically (never over the input) and report."""
    model = load_model(input_path)
    check_input_model(model)  # exit 3 for an invalid input, before the output is touched
    check_input_shapes(model, options.input_shapes)
    out = Path(output_path) if output_path else default_output_path(Path(input_path))
    model.open_output(out)
    try:
        report = prune_model(model, options)
        report.output_size = save_model(model, out, check=report.structure_changed)
    except BaseException:
        model.discard_output()  # an error, Ctrl-C or SIGTERM before the commit leaves no data file behind
        raise
    report.output = str(out)
    report.after.file_size = report.output_size
    return report
