"""Validation of a pruned model against its original: accuracy, agreement, latency, size, mobile readiness.

Public API (used by ``onnxprune validate``, ``onnxprune MODEL --validate`` and library callers):

* :func:`run_validation` with a :class:`ValidateOptions` (its ``data`` a :class:`~onnxprune.data.loader.DataOptions`)
  runs everything and returns a :class:`ValidationReport`;
* building blocks for recovery/search: :func:`evaluate_pair`, :func:`evaluate_model` (data comes from
  :func:`onnxprune.data.loader.load_data`, as for calibration).

The command-line options that build :class:`ValidateOptions` live in :mod:`onnxprune.cli.options`.
"""

from __future__ import annotations

from onnxprune.validate.accuracy import PairResult, evaluate_model, evaluate_pair
from onnxprune.validate.options import ValidateOptions
from onnxprune.validate.report import SCHEMA, ValidationReport
from onnxprune.validate.run import run_validation

__all__ = ["ValidationReport", "ValidateOptions", "run_validation", "evaluate_pair", "evaluate_model", "PairResult",
           "SCHEMA"]
