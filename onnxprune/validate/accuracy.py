"""Accuracy against labels and agreement between the original and the pruned model's outputs.

Why streaming accumulators: data sets can be large, so per-batch statistics are summed instead of keeping every
output of both models in memory. The functions here are also what recovery and search call to score a candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from onnxprune.errors import DataError
from onnxprune.data.sources import Dataset


def is_classification(shape: tuple[int, ...]) -> bool:
    """``[N, C]`` with C >= 2: scores per class, so argmax is the prediction."""
    return len(shape) == 2 and shape[1] >= 2


@dataclass
class TopK:
    """Running top-1/top-5 counts of one model."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    classes: int = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= self.classes):
            raise DataError(f"labels range over [{labels.min()}, {labels.max()}] but the output has "
                            f"{self.classes} classes")
        self.n += len(labels)
        self.top1 += int(np.count_nonzero(scores.argmax(axis=1) == labels))
        if self.classes >= 5:
            top = np.argpartition(-scores, 4, axis=1)[:, :5]
            self.top5 += int(np.count_nonzero((top == labels[:, None]).any(axis=1)))

    def result(self) -> dict[str, float | None]:
        return {"top1": self.top1 / self.n if self.n else None,
                "top5": self.top5 / self.n if self.n and self.classes >= 5 else None}


@dataclass
class Agreement:
    """Running comparison of one output: reference (original) against candidate (pruned)."""

    n: int = 0
    elements: int = 0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    top1_same: int = 0
    classification: bool = False
    shape: list[int] = field(default_factory=list)

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        if ref.shape != out.shape:
            raise DataError(f"original output shape {list(ref.shape)} differs from pruned {list(out.shape)}")
        self.shape = [int(d) for d in ref.shape[1:]]
        n = ref.shape[0] if ref.ndim else 1
        a = ref.reshape(n, -1).astype(np.float64)
        b = out.reshape(n, -1).astype(np.float64)
        diff = a - b
        norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dot = np.einsum("ij,ij->i", a, b)
        same = (diff == 0).all(axis=1) if a.shape[1] else np.ones(n, dtype=bool)
        # identical rows are exactly 1 (no rounding), so are two all-zero rows; zero against non-zero is 0
        cos = np.where(same, 1.0, np.where(norm > 0, dot / np.where(norm > 0, norm, 1), 0.0))
        self.n += n
        self.elements += a.size
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min())) if n else self.cos_min
        if a.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.abs_sum += float(np.abs(diff).sum())
        self.signal += float(np.square(a).sum())
        self.noise += float(np.square(diff).sum())
        self.classification = is_classification(ref.shape)
        if self.classification:
            self.top1_same += int(np.count_nonzero(ref.argmax(axis=1) == out.argmax(axis=1)))

    def result(self) -> dict:
        # JSON has no infinity: null when the SNR is undefined (identical outputs, or an all-zero reference)
        snr = None if self.noise == 0 or self.signal == 0 else 10 * math.log10(self.signal / self.noise)
        return {
            "shape": self.shape,
            "classification": self.classification,
            "top1_agreement": self.top1_same / self.n if self.classification and self.n else None,
            "cosine_mean": self.cos_sum / self.n if self.n else None,
            "cosine_min": self.cos_min if self.n else None,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / self.elements if self.elements else 0.0,
            "snr_db": snr,
            "identical": self.noise == 0,
        }


def run_batch(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, feed)
    except Exception as exc:  # onnxruntime's own exception types; a shape/type mismatch is a data problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"onnxruntime rejected the data: {first}") from None


@dataclass
class PairResult:
    num_samples: int
    outputs: dict[str, dict]
    accuracy: dict | None  # None without labels


def evaluate_pair(original: ort.InferenceSession, pruned: ort.InferenceSession, data: Dataset, batch_size: int,
                  on_batch: Callable[[int], None] | None = None, label_output: str | None = None) -> PairResult:
    """Run both models over ``data`` batch by batch; agreement per output and, with labels, top-1/top-5.

    ``label_output`` picks the output scored against the labels (default: the first classification-shaped one).
    """
    names = [o.name for o in original.get_outputs()]
    pruned_names = [o.name for o in pruned.get_outputs()]
    if names != pruned_names:
        raise DataError(f"the models have different outputs: original {names}, pruned {pruned_names}")
    agree = {name: Agreement() for name in names}
    top = {"original": TopK(), "pruned": TopK()}
    scored: str | None = label_output
    for feed, labels in data.batches(batch_size):
        ref = run_batch(original, feed)
        out = run_batch(pruned, feed)
        for name, a, b in zip(names, ref, out):
            agree[name].update(np.asarray(a), np.asarray(b))
        if labels is not None:
            if scored is None:
                scored = next((n for n, a in zip(names, ref) if is_classification(np.shape(a))), None)
                if scored is None:
                    raise DataError(f"labels given but no output is [N, classes] shaped: "
                                    f"{', '.join(f'{n} {list(np.shape(a))}' for n, a in zip(names, ref))}")
            i = names.index(scored)
            top["original"].update(np.asarray(ref[i]), labels)
            top["pruned"].update(np.asarray(out[i]), labels)
        if on_batch:
            on_batch(len(next(iter(feed.values()))))
    accuracy = None
    if data.labels is not None and scored is not None:
        before, after = top["original"].result(), top["pruned"].result()
        accuracy = {
            "output": scored, "samples": top["original"].n, "classes": top["original"].classes,
            "original": before, "pruned": after,
            "top1_drop": before["top1"] - after["top1"],
            "top5_drop": None if before["top5"] is None else before["top5"] - after["top5"],
        }
    return PairResult(data.num_samples, {name: agree[name].result() for name in names}, accuracy)


def evaluate_model(session: ort.InferenceSession, data: Dataset, batch_size: int) -> dict:
    """Top-1/top-5 of one model on labelled data (the first [N, classes] output): for recovery and search."""
    if data.labels is None:
        raise DataError(f"{data.source}: no labels; accuracy needs labels")
    top = TopK()
    for feed, labels in data.batches(batch_size):
        outs = run_batch(session, feed)
        scores = next((o for o in outs if o.ndim == 2 and o.shape[1] >= 2), None)
        if scores is None:
            raise DataError("no output is [N, classes] shaped")
        top.update(scores, labels)
    return {"samples": top.n, "classes": top.classes, **top.result()}
