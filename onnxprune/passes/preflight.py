"""Preflight: refuse option combinations that cannot work before any work is done (the rounds of ``--steps`` see
only their own share of the options, so these checks run once, on the whole request)."""

from __future__ import annotations

from onnxprune.errors import ConfigError
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneOptions, PruneState
from onnxprune.quantize.run import check_request
from onnxprune.recovery import registry as recovery_methods


def check_budget(options: PruneOptions, calibrated: bool) -> None:
    """A budget replaces the ratios: one budget, a fraction strictly between 0 and 1, no --channels, and
    calibration data (each group's loss is measured on it)."""
    budgets = options.budgets
    if not budgets:
        return
    names = [f"--target-{kind}" for kind in budgets]
    if len(budgets) > 1:
        raise ConfigError(f"give one budget, not {' and '.join(names)}")
    (kind, value), = budgets.items()
    if not 0 < value < 1:
        raise ConfigError(f"--target-{kind} {value}: a budget is the fraction of the original to keep, strictly "
                          "between 0 and 1")
    if options.channels is not None:
        raise ConfigError(f"--channels and --target-{kind} both set how much to remove: give one of them")
    if not calibrated:
        raise ConfigError(f"--target-{kind} chooses groups by their measured loss on calibration data: give --calib")
    if options.prunes_weights or options.quantize is not None:
        raise ConfigError(f"--target-{kind} cannot be combined with --sparsity, --pattern or --quantize yet")
    if options.hidden:
        raise ConfigError(f"--target-{kind} cannot be combined with --hidden yet (give --hidden with --channels)")
    if options.scope != "layer":
        raise ConfigError(f"--target-{kind} allocates channels across groups itself; --scope global has nothing "
                          "to rank")


class Preflight(Pass[PruneState]):
    name = "preflight"

    def run(self, state: PruneState) -> None:
        options = state.options
        calibrated = bool(options.calib) or bool(state.batches)
        if not calibrated and recovery_methods.chosen_method(options.recover, calibrated=False).needs_calibration:
            raise ConfigError(f"--recover {options.recover} needs calibration data (--calib)")
        if options.hidden:
            _check_hidden(options.steps, calibrated, state.model.external)
        check_budget(options, calibrated)
        if options.quant_recover is not None and options.quantize != "int8":
            raise ConfigError("--quant-recover compensates static int8's error: it needs --quantize int8")
        if options.quantize is not None:
            check_request(options.quantize, calibrated, state.model.external, state.model.proto)
            if options.sparse_storage:
                raise ConfigError("--sparse-storage cannot be combined with --quantize yet")


def _check_hidden(steps: int, calibrated: bool, external: bool) -> None:
    """``--hidden`` measures the stream on calibration data, rewrites the whole graph at once and keeps both models
    in memory."""
    if not calibrated:
        raise ConfigError("--hidden chooses what to keep from the stream's activations: it needs calibration data "
                          "(--calib)")
    if steps > 1:
        raise ConfigError("--hidden cannot be combined with --steps yet (the hidden width is removed in one go)")
    if external:
        raise ConfigError("--hidden does not support models with external data yet")
