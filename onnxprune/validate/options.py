"""What a validation run is asked to do: the library's typed options (the CLI builds them from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.data.loader import DataOptions


@dataclass(frozen=True)
class ValidateOptions:
    """Options of :func:`onnxprune.validate.run_validation`; the defaults are the CLI's.

    Attributes:
        data: the samples both models run on; ``data.batch_size`` None means the model's fixed batch dim, else 1.
        providers: execution providers to time, comma-separated short names, or ``auto``; the first also computes
            accuracy and agreement.
        threads: intra-op threads per session (0: onnxruntime's default).
        warmup, runs: untimed and timed runs per model; ``runs`` 0 skips latency.
        max_accuracy_drop, min_agreement, min_cosine: thresholds, checked by
            :meth:`ValidationReport.check_thresholds` (None: not checked).
        mobile: run onnxruntime's NNAPI/CoreML usability check on both models.
        export_ort: also write the pruned model in ORT format into this folder.
    """

    data: DataOptions = field(default_factory=DataOptions)
    providers: str = "cpu"
    threads: int = 0
    warmup: int = 5
    runs: int = 50
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    mobile: bool = True
    export_ort: str | None = None
