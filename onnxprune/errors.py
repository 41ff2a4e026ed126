"""One exception hierarchy; the CLI maps each class to a one-line message and a documented exit code."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: anything onnxprune reports to a user as a clear, expected failure."""

    exit_code = 1


class ConfigError(OnnxPruneError):
    """An option or argument is malformed or out of range (same code click uses for usage errors)."""

    exit_code = 2


class InputModelError(OnnxPruneError):
    """The input model cannot be read: missing, not a file, empty, not ONNX, truncated, missing external data."""

    exit_code = 3


class OutputError(OnnxPruneError):
    """The output cannot be written (unwritable folder, would overwrite the input, disk full)."""

    exit_code = 4


class ValidationFailed(OnnxPruneError):
    """Validation ran and a user-given threshold (accuracy drop, agreement) was exceeded."""

    exit_code = 5


class ProviderUnavailable(OnnxPruneError):
    """A requested onnxruntime execution provider is not in the installed build."""

    exit_code = 6


class DataError(OnnxPruneError):
    """Calibration or validation data does not match the model's inputs or is unusable (NaN/inf, no samples, 0-d), or
    what was computed from it is not finite."""

    exit_code = 7


class Terminated(BaseException):
    """SIGTERM or SIGINT (Ctrl-C) arrived. A BaseException, like KeyboardInterrupt, so that ``except Exception``
    handlers do not swallow it while ``finally`` and ``except BaseException`` cleanup still runs; the CLI exits
    128 + the signal number (143, 130) with one line. Not KeyboardInterrupt itself: click would catch that and print
    an extra empty line."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
