"""Recovery without training: re-fitting what pruning changed on calibration data."""
