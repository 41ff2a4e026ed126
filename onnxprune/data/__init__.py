"""Data: calibration and validation inputs (npz, image folders, preprocessing) and the activation probe."""
