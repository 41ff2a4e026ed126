"""Preflight: refuse option combinations that cannot work before any work is done (the rounds of ``--steps`` see
only their own share of the options, so these checks run once, on the whole request)."""

from __future__ import annotations

from onnxprune.errors import ConfigError
from onnxprune.passes.base import Pass
from onnxprune.passes.state import PruneState
from onnxprune.quantize.run import check_request
from onnxprune.recovery import registry as recovery_methods


class Preflight(Pass[PruneState]):
    name = "preflight"

    def run(self, state: PruneState) -> None:
        options = state.options
        calibrated = bool(options.calib) or bool(state.batches)
        if not calibrated and recovery_methods.chosen_method(options.recover, calibrated=False).needs_calibration:
            raise ConfigError(f"--recover {options.recover} needs calibration data (--calib)")
        if options.hidden:
            _check_hidden(options.steps, calibrated, state.model.external)
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
