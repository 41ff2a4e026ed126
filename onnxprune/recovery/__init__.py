"""Recovery without training: re-fitting what pruning changed on calibration data.

Importing this package registers every method (registry.py), one module each."""

from onnxprune.recovery import bn, lsq  # noqa: F401
