"""What a prune job is asked to do (:class:`PruneOptions`), what it reports (:class:`PruneReport`) and what its
passes share while it runs (:class:`PruneState`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.channels import Dim
from onnxprune.channels.groups import GroupSet
from onnxprune.data.loader import Feed
from onnxprune.data.sources import Preprocess
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.stats import ModelStats
from onnxprune.prune.structured import ChannelPlan
from onnxprune.prune.unstructured import UnstructuredResult
from onnxprune.quantize import QuantizationResult
from onnxprune.recovery.recover import RecoveryResult, Reselect


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
    attention_units: str = "heads"  # "head-dims": a unit is one dim of every head instead of one whole head
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
    preprocess: Preprocess = field(default_factory=Preprocess)  # an image-folder --calib, as for --data
    recover: str | None = None  # None: "lsq" with calibration data, else "none"
    verify: bool = False  # prove the channel removal against the masked original on random inputs
    steps: int = 1  # remove the channels in this many rounds, recovering after each (with --calib)
    quantize: str | None = None  # after recovery: a key of quantize.KINDS (int8 needs --calib)
    quant_method: str = "minmax"  # static int8's activation calibration: a key of quantize.METHODS
    quant_recover: str | None = None  # static int8's error compensation, a key of quantize.run.QUANT_RECOVERY (None:
    # DEFAULT_QUANT_RECOVERY); given without --quantize int8 it is refused by preflight
    hidden: float | None = None  # fraction of a transformer's hidden (residual-stream) width to remove (--calib)
    # budgets instead of ratios (search/budget.py): keep at most this fraction of the original's MACs, parameters or
    # median latency on latency_provider; the search chooses every group's ratio
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    latency_provider: str = "cpu"  # --providers' first entry: where --target-latency is measured
    latency_threads: int = 0  # --threads for those sessions (0: onnxruntime's default)
    workers: int = 1  # local processes for the search's loss evaluations
    ray: str | None = None  # or a Ray cluster for them ("auto" or an address)

    @property
    def prunes_weights(self) -> bool:
        return bool(self.sparsity or self.pattern)

    @property
    def budgets(self) -> dict[str, float]:
        """The budgets asked for, by kind ("macs", "params", "latency"); Preflight allows at most one."""
        asked = {"macs": self.target_macs, "params": self.target_params, "latency": self.target_latency}
        return {kind: value for kind, value in asked.items() if value is not None}

    @property
    def prunes_channels(self) -> bool:
        """Channels are removed: by ratio (--channels) or by a budget search."""
        return bool(self.channels) or bool(self.budgets)


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
class HiddenRow:
    """What ``--hidden`` did: the treatment the architecture got, widths, the stream's parts, and how closely the
    rewrite without slicing reproduced the original (the exactness check on the first calibration batch)."""

    layout: str  # "pre-LN" or "post-LN"
    treatment: str
    before: int
    after: int
    norms: int
    writers: int
    readers: int
    variance_kept: float | None  # pre-LN: share of the normalised stream's variance in the kept directions
    reference_difference: float


@dataclass
class BudgetRound:
    """One round of a budget search: what it aimed at, what its plan predicted and what was measured after it
    (fractions of the original model's cost)."""

    goal: float
    predicted: float
    reached: float
    removed: int  # channels removed in this round
    loss: float  # summed calibration loss of the chosen removals, each measured alone before recovery
    output_error: float | None = None  # after this round's recovery, against the model it started from
    choice: str = "greedy"  # the aim taken: greedy, even or global, whichever recovered best at the target
    errors: dict[str, float] = field(default_factory=dict)  # each distinct aim's output error on --calib after
    # recovery at the target, when there was more than one to compare


@dataclass
class BudgetReport:
    """What a budget search asked for, reached, and how (the search path, one row per round)."""

    kind: str  # "macs", "params" or "latency"
    target: float
    reached: float | None = None
    rounds: list[BudgetRound] = field(default_factory=list)
    evaluations: int = 0  # loss evaluations (a group at a kept count, on the calibration data)
    timings: int = 0  # latency table entries measured
    recoveries: int = 0  # allocations recovered on a copy to compare them
    method: str = ""  # how the cost is known: analytic, or the provider latency was measured on


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
    quantization: QuantizationResult | None = None
    hidden: HiddenRow | None = None
    budget: BudgetReport | None = None
    structure_changed: bool = False  # False: only weight values changed, so the saved graph needs no re-check


@dataclass
class PruneState:
    """The one model under edit and what the passes learn about it; each field says which pass fills it."""

    model: LoadedModel
    options: PruneOptions
    batches: list[Feed] | None = None  # Calibrate (once per run, shared by every round of --steps)
    calibrated: bool = False  # Calibrate ran (batches may still be None: no --calib)
    verify_feeds: dict[str, np.ndarray] | None = None  # Prepare, with --verify
    too_big: bool = False  # Prepare: external data too large to hold, so its changes stream out and recovery skips
    index: GraphIndex | None = None  # Prepare: the live graph every later pass edits through
    report: PruneReport | None = None  # Prepare
    original: onnx.ModelProto | None = None  # Calibrate: the model before this round's changes (recovery's target)
    groups: GroupSet | None = None  # BuildGroups
    plan: ChannelPlan | None = None  # SelectChannels
    kept: dict[Dim, np.ndarray] = field(default_factory=dict)  # RemoveChannels: kept indices per tensor axis
    proof: str | None = None  # RemoveChannels with --verify: what was proved
    changed: set[str] = field(default_factory=set)  # RemoveChannels, ZeroWeights: constants whose values changed
    reselect: dict[str, Reselect] = field(default_factory=dict)  # ZeroWeights: zeros recovery chooses (obs)
    planner: Callable[[PruneState], ChannelPlan] | None = None  # a budget search's round: plans instead of ratios

    def rebuild_index(self) -> None:
        """Index the model afresh, after a step that replaced the whole proto (a snapshot restored by recovery or a
        sparse-storage fallback, onnxruntime's quantizer): no index can follow such a change edit by edit."""
        from onnxprune.graph.stats import static_input_shapes

        self.index = GraphIndex(self.model, static_input_shapes(self.model, self.options.input_shapes))
