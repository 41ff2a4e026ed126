"""NaN and inf are errors, never results: the one finiteness check for data, activations, scores and fits.

Why one place: a single NaN among 64 calibration samples used to turn every reconstruction score into NaN, after
which channels were removed by position and recovery reported "kept: output error nan" with exit 0. Every producer
of numbers that decide what is pruned or written calls :func:`require_finite`, or :func:`first_nonfinite` where it
falls back (and says so) instead of failing.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import OnnxPruneError


def first_nonfinite(values: np.ndarray) -> tuple[int | None, str] | None:
    """Where the first NaN/inf is: (index along the first axis, or None for a 0-d array; "NaN", "inf" or "-inf").

    None when every entry is finite or the dtype cannot hold NaN (integers, bools). One vectorised pass over the
    array; the search for the index runs only when something is wrong.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return None
    finite = np.isfinite(arr)
    if finite.all():
        return None
    if arr.ndim == 0:
        return None, _kind(arr)
    index = int(np.argmax(~finite.reshape(len(arr), -1).all(axis=1)))
    row, ok = arr[index].reshape(-1), finite[index].reshape(-1)
    return index, _kind(row[int(np.argmax(~ok))])


def _kind(value: np.ndarray) -> str:
    if np.isnan(value):
        return "NaN"
    return "-inf" if np.real(value) < 0 else "inf"


def require_finite(values: np.ndarray, what: str, error: type[OnnxPruneError], unit: str = "index",
                   hint: str = "") -> None:
    """Raise ``error`` naming ``what`` and the first bad ``unit`` (first axis) when ``values`` has NaN or inf.

    Example message: ``models/x.npz: array 'input' has NaN at sample 17``.
    """
    found = first_nonfinite(values)
    if found is None:
        return
    index, kind = found
    where = "" if index is None else f" at {unit} {index}"
    raise error(f"{what} has {kind}{where}{'; ' + hint if hint else ''}")
