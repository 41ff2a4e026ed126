"""Which criterion ranks single weights: the choice depends on the calibration data, the recovery method (only one
that chooses zeros can serve ``obs``) and whether the model is small enough to recover, so it is settled here, where
importance and recovery meet, rather than in either."""

from __future__ import annotations

from onnxprune.errors import ConfigError
from onnxprune.graph import io
from onnxprune.importance import Criterion, Target
from onnxprune.importance import registry as criteria
from onnxprune.passes.state import PruneOptions, PruneReport
from onnxprune.recovery import registry as recovery_methods


def weight_criterion(options: PruneOptions, batches: list | None, report: PruneReport,
                      too_big: bool) -> Criterion:
    """The criterion for single weights: channel-only criteria fall back to l1; one whose zeros recovery chooses
    (obs) needs data and a recovery method that chooses zeros (lsq), and ranks on its own when the model is too big
    for recovery."""
    zeros_chosen = recovery_methods.chosen_method(options.recover, calibrated=True).chooses_zeros
    if options.criterion == criteria.AUTO:  # a model too big to hold skips recovery
        return criteria.get(criteria.auto_choice(Target.WEIGHTS, bool(batches), zeros_chosen and not too_big))
    criterion = criteria.get(options.criterion)
    if criterion.recovery_chooses and batches and too_big:
        report.notes.append(f"criterion {criterion.name} chooses weights during recovery, which models over "
                            f"{io.INLINE_LIMIT_BYTES / 1e9:.1f} GB skip: weights ranked by {criterion.counts_by}")
        return criterion.ranking()
    if Target.WEIGHTS not in criterion.target:
        report.notes.append(f"criterion {criterion.name} applies to channels; weights ranked by "
                            f"{criteria.FALLBACK}")
        return criteria.get(criteria.FALLBACK)
    criteria.require_data(criterion, batches)
    if criterion.recovery_chooses and not zeros_chosen:
        able = " or ".join(m.name for m in recovery_methods.methods() if m.chooses_zeros)
        raise ConfigError(f"--criterion {criterion.name} chooses the zeros while re-fitting each layer: it needs "
                          f"--recover {able}")
    return criterion
