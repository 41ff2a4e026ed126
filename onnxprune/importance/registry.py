"""The importance-criterion registry: every ``--criterion`` is one registered class, and the CLI's choices and help
text, what each criterion needs and how ``auto`` chooses all come from here.

A criterion declares what it scores (:class:`Target`: channels, single weights or both) and whether it needs
calibration data, and implements the scoring it declares:

- channels: :meth:`Criterion.score_channels` gives every group a score per channel (higher = keep) and an optional
  note for the report (a fall-back, say);
- weights: :meth:`Criterion.weight_scales` gives, per weight, what |w| is multiplied by before ranking (Wanda's input
  feature norms; any array that broadcasts against the weight), or None to rank by |w| alone. Unstructured pruning
  keeps its exact selection over score bits, so a weight criterion only says what multiplies |w|.

Adding a criterion is one module under ``importance/`` with a class decorated by :func:`register`, imported in
``importance/__init__.py``: the pipeline, ``plan_channels``, unstructured pruning and the CLI find it here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import ConfigError, DataError, InputModelError
from onnxprune.finite import require_finite
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.layers import Weight
from onnxprune.importance.scoring import check_reduction

AUTO = "auto"
FALLBACK = "l1"  # what auto picks without data, and what other criteria fall back to

Batches = list[dict[str, np.ndarray]]
ChannelScores = dict[int, tuple[np.ndarray, str | None]]  # group id -> (score per channel, note or None)
ChannelScorer = Callable[[list[ChannelGroup]], ChannelScores]  # what plan_channels calls on the groups it may prune


class Target(enum.Flag):
    """What a criterion scores."""

    CHANNELS = enum.auto()
    WEIGHTS = enum.auto()


class Criterion:
    """One importance criterion. Subclasses set the class attributes and override the scoring their target names."""

    name: ClassVar[str]
    help: ClassVar[str]  # a phrase for ``--help``; the target and needs are added from the attributes
    target: ClassVar[Target]
    needs_data: ClassVar[bool] = False  # scores from calibration activations (``--calib``)
    counts_by: ClassVar[str | None] = None
    """Weights: the criterion whose ranking sets how many weights each tensor loses when lsq recovery then chooses
    which ones (obs); None when this criterion's own ranking chooses them."""

    @property
    def recovery_chooses(self) -> bool:
        return self.counts_by is not None

    def ranking(self) -> Criterion:
        """The criterion whose scores rank single weights (``counts_by`` when set)."""
        return get(self.counts_by, Target.WEIGHTS) if self.counts_by else self

    def score_channels(self, groups: GroupSet, chosen: list[ChannelGroup], reduction: str,
                       batches: Batches | None) -> ChannelScores:
        """Per group of ``chosen``: a score per channel and a note (None when nothing needs saying).

        Args:
            reduction: how members' scores combine ("mean", "sum" or "max"; see ``scoring.magnitude_scores``).
            batches: calibration feeds; never None for a criterion that ``needs_data``.
        """
        raise NotImplementedError(f"criterion {self.name} does not score channels")

    def weight_scales(self, index: GraphIndex, weights: list[Weight],
                      batches: Batches | None) -> dict[str, np.ndarray] | None:
        """Per weight name: the array |w| is multiplied by (per index of the reduction axis, or broadcastable
        against the weight); None to rank by |w| alone."""
        return None


CRITERIA: dict[str, Criterion] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make ``cls`` a ``--criterion`` choice under ``cls.name`` (names are unique)."""
    if cls.name in CRITERIA or cls.name == AUTO:
        raise ValueError(f"criterion '{cls.name}' is registered twice")
    if not cls.target:
        raise ValueError(f"criterion '{cls.name}' scores nothing: give it a target")
    CRITERIA[cls.name] = cls()
    return cls


def names(target: Target | None = None) -> list[str]:
    """Registered criteria (those scoring ``target`` when given), in registration order."""
    return [n for n, c in CRITERIA.items() if target is None or target in c.target]


def get(name: str, target: Target | None = None) -> Criterion:
    """The criterion called ``name`` (one that scores ``target`` when given).

    Raises:
        ConfigError: no such criterion, naming the choices.
    """
    criterion = CRITERIA.get(name)
    if criterion is None or (target is not None and target not in criterion.target):
        raise ConfigError(f"unknown criterion '{name}' (choose from {', '.join(names(target))})")
    return criterion


def auto_choice(target: Target, has_data: bool, zeros_chosen: bool) -> str:
    """What ``--criterion auto`` means: l1 without calibration data; with it recon for channels and, for weights,
    obs when recovery will choose the zeros (lsq) or wanda when it will not (another ``--recover``, or a model too
    big to hold in memory, whose recovery is skipped)."""
    if not has_data:
        return FALLBACK
    if target is Target.CHANNELS:
        return "recon"
    return "obs" if zeros_chosen else "wanda"


def require_data(criterion: Criterion, batches: Batches | None) -> None:
    if criterion.needs_data and not batches:
        raise ConfigError(f"--criterion {criterion.name} needs calibration data (--calib)")


def channel_scorer(name: str, groups: GroupSet, reduction: str = "mean",
                   batches: Batches | None = None) -> ChannelScorer:
    """The channel scores of criterion ``name`` (``auto`` resolved) for ``plan_channels``: a callable that scores
    the groups it is given. Checks the choice, the reduction and the data at once, before anything is scored.

    Every score must be finite: a NaN compares neither higher nor lower, so channels would be chosen by position.
    The error is a DataError for criteria that read calibration data, else the model's (InputModelError).
    """
    if name == AUTO:
        name = auto_choice(Target.CHANNELS, bool(batches), zeros_chosen=False)
    criterion = get(name, Target.CHANNELS)
    check_reduction(reduction)
    require_data(criterion, batches)
    error = DataError if criterion.needs_data else InputModelError

    def score(chosen: list[ChannelGroup]) -> ChannelScores:
        scored = criterion.score_channels(groups, chosen, reduction, batches)
        for group in chosen:
            require_finite(scored[group.id][0], f"group '{group.name}': {criterion.name} score", error, "channel")
        return scored

    return score


def choices() -> list[str]:
    """``--criterion`` choices: auto, then every registered criterion."""
    return [AUTO, *names()]


def help_text() -> str:
    """``--criterion`` help, built from the registry (auto's line from :func:`auto_choice` itself)."""
    weights = Target.WEIGHTS
    auto = (f"{auto_choice(weights, False, True)}, or with --calib {auto_choice(Target.CHANNELS, True, True)} "
            f"(channels) and {auto_choice(weights, True, True)} (weights; {auto_choice(weights, True, False)} "
            "without lsq)")
    lines = [f"auto = {auto}"]
    for criterion in CRITERIA.values():
        what = " and ".join(t.name.lower() for t in Target if t in criterion.target)
        needs = ", needs --calib" if criterion.needs_data else ""
        needs += " and lsq" if criterion.recovery_chooses else ""
        lines.append(f"{criterion.name} = {criterion.help} ({what}{needs})")
    return f"Importance: {'; '.join(lines)}."
