"""Unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights: values change, the graph does not.

Exact counts: a tensor pruned to ratio r has exactly round(r * n) of its smallest-magnitude entries zeroed (ties are
broken by position). The global ranking selects its threshold with a two-pass radix select over the float32 bit
patterns of |w| (monotone for non-negative floats), so it never holds all weights in memory at once: tensors are
read one at a time (memory-mapped for external data) and written straight back. A NaN or inf score is an error
naming the weight (its bits would rank above every finite score, so it would never be pruned, silently).
"""

from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import ConfigError, DataError, InputModelError
from onnxprune.finite import require_finite
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.layers import Weight, find_weights
from onnxprune.importance import Target, registry

NONFINITE_BITS = 0x7F800000  # float32 bit patterns of |x| at or above this are inf or NaN


@dataclass
class WeightInfo(Weight):
    """One prunable weight tensor (found by graph.layers.find_weights) and what happened to it."""

    zeros_before: int = 0
    zeros_after: int = 0
    skipped: str | None = None

    @classmethod
    def of(cls, w: Weight) -> WeightInfo:
        return cls(w.name, w.node, w.op, w.shape, w.reduction_axis, slot=w.slot)


@dataclass
class UnstructuredResult:
    weights: list[WeightInfo] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(w.params for w in self.weights)

    @property
    def zeros_before(self) -> int:
        return sum(w.zeros_before for w in self.weights)

    @property
    def zeros_after(self) -> int:
        return sum(w.zeros_after for w in self.weights)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights along the reduction axis."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern must be N:M with integers, e.g. 2:4 (got '{text}')")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ConfigError(f"pattern N:M needs 0 < N < M (got '{text}')")
    return n, m


def _scores(values: np.ndarray, axis: int, scale: np.ndarray | None) -> np.ndarray:
    """Score bits (uint32, ordered like the scores) of |w|, times the input feature norm along the reduction axis
    when given (Wanda: |W| x ||X||). For float32 |w| this is one pass: clear the sign bit."""
    values = np.asarray(values)
    if scale is None and values.dtype == np.float32:
        return np.bitwise_and(values.reshape(-1).view(np.uint32), np.uint32(0x7FFFFFFF)).reshape(values.shape)
    magnitude = np.abs(values.astype(np.float32))
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float32)
        if scale.ndim != values.ndim:  # one norm per index of the reduction axis (else already broadcastable)
            shape = [1] * values.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        magnitude = magnitude * scale
    return magnitude.view(np.uint32)


def _zero_smallest(values: np.ndarray, count: int, scores: np.ndarray) -> np.ndarray:
    """Copy of ``values`` with exactly its ``count`` lowest-scoring entries zeroed (ties by position); ``scores``
    are score bits from :func:`_scores`."""
    flat = np.asarray(values).reshape(-1)
    if count <= 0:
        return flat.copy().reshape(values.shape)
    bits = scores.reshape(-1)
    threshold = np.partition(bits, count - 1)[count - 1]
    keep = bits >= threshold
    out = np.multiply(flat, keep, dtype=flat.dtype)  # fastest masking; zeroed entries are small, never NaN/inf
    ties = count - (keep.size - int(np.count_nonzero(keep)))
    if ties:
        out[np.flatnonzero(bits == threshold)[:ties]] = 0
    return out.reshape(values.shape)


def _zero_n_m(values: np.ndarray, axis: int, n: int, m: int, scores: np.ndarray) -> np.ndarray:
    moved = np.moveaxis(np.array(values), axis, -1)
    shape = moved.shape
    groups = moved.reshape(-1, m)
    order = np.argsort(np.moveaxis(scores, axis, -1).reshape(-1, m), axis=1, kind="stable")
    np.put_along_axis(groups, order[:, : m - n], 0, axis=1)
    return np.moveaxis(groups.reshape(shape), -1, axis)


def _global_threshold(score_of, weights: list[WeightInfo], count: int) -> tuple[int, int]:
    """Exact k-th smallest score bits across tensors: (threshold bits, how many entries equal to it are still to be
    zeroed, in tensor order), reading one tensor at a time.

    A strided sample brackets the k-th value; one counting pass then finds how many scores fall below the bracket
    and collects the few inside it, where the exact value is selected. A two-pass radix select (histograms of the
    high and low 16 bits) is the fallback when the bracket misses.
    """
    total = sum(w.params for w in weights)
    stride = max(1, total >> 20)  # about a million samples in all
    # copy each slice at once: a view would keep the whole tensor's scores alive
    sample = np.sort(np.concatenate([score_of(w).reshape(-1)[::stride].copy() for w in weights]))
    q = (count - 0.5) / total
    margin = 0.002 + 4 / np.sqrt(sample.size)
    lo = sample[max(0, int((q - margin) * sample.size))]
    hi = sample[min(sample.size - 1, int((q + margin) * sample.size))]
    below, inside = 0, []
    for w in weights:
        bits = score_of(w).reshape(-1)
        below += int(np.count_nonzero(bits < lo))
        inside.append(bits[(bits >= lo) & (bits <= hi)])
    middle = np.concatenate(inside)
    rank = count - 1 - below
    if 0 <= rank < middle.size:
        threshold = int(np.partition(middle, rank)[rank])
        strictly_below = below + int(np.count_nonzero(middle < threshold))
        return threshold, count - strictly_below
    return _radix_threshold(score_of, weights, count)


def _radix_threshold(score_of, weights: list[WeightInfo], count: int) -> tuple[int, int]:
    """Two-pass radix select over the high and low 16 bits; exact for any distribution."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    for w in weights:
        hist += np.bincount(score_of(w).reshape(-1) >> 16, minlength=1 << 16)
    cum = np.cumsum(hist)
    high = int(np.searchsorted(cum, count))
    below = int(cum[high - 1]) if high else 0
    hist_low = np.zeros(1 << 16, dtype=np.int64)
    for w in weights:
        bits = score_of(w).reshape(-1)
        hist_low += np.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    cum_low = np.cumsum(hist_low)
    low = int(np.searchsorted(cum_low, count - below))
    below += int(cum_low[low - 1]) if low else 0
    return (high << 16) | low, count - below


def prune_unstructured(index: GraphIndex, sparsity: float | None = None, scope: str = "layer",
                       criterion: str = "l1", exclude: tuple[str, ...] = (),
                       layer_sparsity: tuple[tuple[str, float], ...] = (), min_params: int = 0,
                       pattern: tuple[int, int] | None = None,
                       batches: list[dict[str, np.ndarray]] | None = None) -> UnstructuredResult:
    """Zero the smallest weights in place (values only; no node, shape or name changes).

    Args:
        sparsity: fraction of weights to zero, per tensor (``scope="layer"``) or across all tensors ("global").
        criterion: a registered weight criterion: the weights are ranked by |w| times what it multiplies |w| by
            (nothing for l1 and l2, which therefore select the same weights; the input feature norms for wanda).
            A criterion whose zeros recovery chooses (obs) ranks by its ``counts_by`` criterion here.
        batches: calibration feeds, for criteria that need data.
        exclude: glob patterns matched against node and tensor names.
        layer_sparsity: (glob, ratio) overrides, first match wins; overridden tensors are pruned on their own.
        min_params: tensors with fewer parameters are left alone.
        pattern: (N, M) keeps the N largest of every M consecutive weights along the reduction axis.
    """
    chosen = registry.get(criterion, Target.WEIGHTS)
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got '{scope}'")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    registry.require_data(chosen, batches)
    ranking = chosen.ranking()
    result = UnstructuredResult([WeightInfo.of(w) for w in find_weights(index)])
    norms = ranking.weight_scales(index, result.weights, batches) or {}

    def score_of(w: WeightInfo) -> np.ndarray:
        values = index.const_value(w.name)
        bits = _scores(values, w.reduction_axis, norms.get(w.name))
        if bits.size and int(bits.max()) >= NONFINITE_BITS:  # one reduction; the message is built only then
            require_finite(values, f"input model: weight '{w.name}'", InputModelError, "axis-0 index")
            require_finite(bits.view(np.float32), f"weight '{w.name}': {ranking.name} score",
                           DataError if w.name in norms else InputModelError, "axis-0 index", "overflows float32")
        return bits

    pool: list[WeightInfo] = []
    ratios: dict[str, float] = {}
    for w in result.weights:
        names = (w.name, w.node)
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names):
            w.skipped = "excluded"
        elif w.params < min_params:
            w.skipped = f"fewer than {min_params} parameters"
        elif pattern and w.shape[w.reduction_axis] % pattern[1]:
            w.skipped = f"reduction axis ({w.shape[w.reduction_axis]}) not a multiple of {pattern[1]}"
        else:
            override = next((r for p, r in layer_sparsity if any(fnmatch.fnmatchcase(n, p) for n in names)), None)
            if override is not None or scope == "layer" or pattern:
                ratios[w.name] = override if override is not None else (sparsity or 0.0)
            else:
                pool.append(w)
    threshold = ties = None
    if pool and sparsity:
        total = sum(w.params for w in pool)
        threshold, ties = _global_threshold(score_of, pool, int(round(sparsity * total)))
    tied_left = [ties or 0]

    def prune_one(w: WeightInfo) -> np.ndarray | None:
        """New values of one tensor, or None when it stays as it is (runs in a worker thread)."""
        values = index.const_value(w.name)
        w.zeros_before = w.zeros_after = values.size - int(np.count_nonzero(values))
        if w.skipped or (w.name not in ratios and threshold is None):
            return None
        scores = score_of(w)
        if pattern:
            new = _zero_n_m(values, w.reduction_axis, *pattern, scores)
        elif w.name in ratios:
            new = _zero_smallest(values, int(round(ratios[w.name] * w.params)), scores)
        else:
            keep = scores.reshape(-1) >= threshold
            new = np.multiply(np.asarray(values).reshape(-1), keep, dtype=values.dtype).reshape(values.shape)
        w.zeros_after = new.size - int(np.count_nonzero(new))  # counted here, in the worker thread
        return new

    def finish(w: WeightInfo, new: np.ndarray | None) -> None:
        """Apply one result in tensor order (global ties are taken first-come, in that order)."""
        if new is None:
            return
        if threshold is not None and w.name not in ratios and not pattern and tied_left[0]:
            flat = new.reshape(-1)
            tied = np.flatnonzero(score_of(w).reshape(-1) == threshold)[: tied_left[0]]
            w.zeros_after += int(np.count_nonzero(flat[tied]))
            flat[tied] = 0
            tied_left[0] -= tied.size
        index.set_constant(w.name, new)

    # numpy releases the GIL in the heavy kernels: two tensors are processed at once, and results are applied
    # (and streamed to the output) strictly in order, with at most a few tensors in memory
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: list = []
        for w in result.weights:
            pending.append((w, pool.submit(prune_one, w)))
            if len(pending) >= 3:
                done_w, future = pending.pop(0)
                finish(done_w, future.result())
        for done_w, future in pending:
            finish(done_w, future.result())
    return result


def to_sparse_storage(index: GraphIndex, names: list[str]) -> list[str]:
    """Move the given initializers to ``sparse_initializer`` when that makes them smaller; returns those moved.

    COO storage costs 8 bytes of index per non-zero, so it only pays off for sparse enough tensors.
    """
    moved = []
    graph = index.graph
    for name in names:
        tensor = index.initializers.get(name)
        if tensor is None:
            continue
        values = index.const_value(name)
        flat = values.reshape(-1)
        nz = np.flatnonzero(flat)
        if nz.size * (8 + values.dtype.itemsize) >= flat.size * values.dtype.itemsize:
            continue
        sparse = onnx.helper.make_sparse_tensor(onnx.numpy_helper.from_array(flat[nz], name),
                                                onnx.numpy_helper.from_array(nz.astype(np.int64), name + "_indices"),
                                                list(values.shape))
        graph.sparse_initializer.append(sparse)
        index.remove_initializer(name)
        moved.append(name)
    return moved
