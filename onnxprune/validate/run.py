"""One validation run: load both models and the data, then measure accuracy, agreement, latency, size and mobile
readiness into a :class:`ValidationReport`."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxprune.data import sources
from onnxprune.data.loader import load_data
from onnxprune.data.sources import Dataset, InputSpec
from onnxprune.errors import ConfigError, DataError
from onnxprune.graph.check import check_input_model
from onnxprune.graph.io import LoadedModel, load_model
from onnxprune.graph.layers import FLOAT_TYPES
from onnxprune.graph.stats import check_input_shapes, model_stats
from onnxprune.progress import progress
from onnxprune.validate import providers as prov
from onnxprune.validate.accuracy import evaluate_pair
from onnxprune.validate.latency import MEMORY_METHOD, measure_pair
from onnxprune.validate.mobile import check_mobile, export_ort
from onnxprune.validate.options import ValidateOptions
from onnxprune.validate.report import ValidationReport


def run_validation(original: str | Path, pruned: str | Path, options: ValidateOptions | None = None,
                   input_shapes: dict[str, list[int]] | None = None) -> ValidationReport:
    """Compare ``pruned`` against ``original`` on the same data.

    Args:
        options: what to measure and on which data (default: :class:`ValidateOptions`'s defaults).
        input_shapes: ``--input-shape`` values fixing dynamic dims.

    Returns:
        The report. Thresholds are not checked here: call :meth:`ValidationReport.check_thresholds` after
        printing/saving it.

    Raises:
        The OnnxPruneError subclasses with their exit codes: ConfigError (2), InputModelError (3), OutputError (4,
        ``export_ort``), ProviderUnavailable (6), DataError (7).
    """
    opts = options or ValidateOptions()
    started = time.perf_counter()
    input_shapes = dict(input_shapes or {})
    providers = prov.resolve(opts.providers)  # fail fast (exit 6) before any data work
    if not providers:
        raise ConfigError("--providers auto found no usable execution provider")
    orig_model, pruned_model = load_model(original), load_model(pruned)
    for model in (orig_model, pruned_model):
        check_input_model(model)
    check_input_shapes(orig_model, input_shapes)  # exit 2 before any data work
    orig_specs = sources.input_specs(orig_model.proto)
    pruned_specs = sources.input_specs(pruned_model.proto)
    if [(s.name, s.dtype) for s in orig_specs] != [(s.name, s.dtype) for s in pruned_specs]:
        raise DataError("the models take different inputs: original "
                        f"{'; '.join(s.describe() for s in orig_specs)}, pruned "
                        f"{'; '.join(s.describe() for s in pruned_specs)}")
    batch_size = _batch_size(orig_specs, opts.data.batch_size)
    data = load_data(orig_model, replace(opts.data, batch_size=batch_size), input_shapes)
    dataset = _whole_batches(data, orig_specs)
    if opts.max_accuracy_drop is not None and dataset.labels is None:
        raise ConfigError("--max-accuracy-drop needs labelled data (--data FILE.npz with a labels array, or an "
                          "image folder); use --min-agreement/--min-cosine without labels")

    # accuracy and agreement on the first provider
    orig_sess, _ = prov.create_session(original, providers[0], opts.threads)
    pruned_sess, _ = prov.create_session(pruned, providers[0], opts.threads)
    with progress(dataset.num_samples, "evaluating") as advance:
        pair = evaluate_pair(orig_sess, pruned_sess, dataset, batch_size, on_batch=advance)
    del orig_sess, pruned_sess
    if opts.min_agreement is not None and not any(r["classification"] for r in pair.outputs.values()):
        shapes = ", ".join(f"{name} {res['shape']}" for name, res in pair.outputs.items())
        raise ConfigError("--min-agreement needs a classification-shaped output [N, classes]; this model has "
                          f"{shapes}; use --min-cosine")

    latency = []
    if opts.runs > 0:
        feed = next(dataset.batches(batch_size))[0]
        for provider in providers:
            with progress(opts.runs, f"timing on {prov.short_name(provider)}") as advance:
                latency.append(measure_pair(original, pruned, provider, feed, opts.threads, opts.warmup, opts.runs,
                                            on_run=advance))

    mobile = None
    if opts.mobile:
        mobile = {"original": check_mobile(original), "pruned": check_mobile(pruned)}
    exported = export_ort(pruned, opts.export_ort) if opts.export_ort else None

    size_o, size_p = _size(orig_model, input_shapes), _size(pruned_model, input_shapes)
    ratios = {k: (size_p[k] / size_o[k] if size_o[k] and size_p[k] is not None else None) for k in size_o}
    return ValidationReport(
        original=str(original),
        pruned=str(pruned),
        data={"source": dataset.source, "samples": dataset.num_samples, "labels": dataset.labels is not None,
              "batch_size": batch_size, "provider": prov.short_name(providers[0]), "notes": dataset.notes},
        outputs=pair.outputs,
        accuracy=pair.accuracy,
        latency=latency,
        size={"original": size_o, "pruned": size_p, "ratio": ratios},
        mobile=mobile,
        ort_export=exported,
        thresholds={"max_accuracy_drop": opts.max_accuracy_drop, "min_agreement": opts.min_agreement,
                    "min_cosine": opts.min_cosine},
        environment={"onnxruntime": ort.__version__, "available_providers": prov.available(),
                     "python": platform.python_version(), "machine": platform.machine(),
                     "cpu_count": _cpu_count(), "memory_method": MEMORY_METHOD,
                     "elapsed_s": round(time.perf_counter() - started, 3)},
    )


def _batch_size(specs: list[InputSpec], requested: int | None) -> int:
    fixed = sources.batch_dim(specs)
    if fixed is None:
        return requested or 1
    if requested is not None and requested != fixed:
        raise ConfigError(f"--batch-size {requested}: the model's batch dim is fixed to {fixed}")
    return fixed


def _whole_batches(dataset: Dataset, specs: list[InputSpec]) -> Dataset:
    """A model with a fixed batch dim runs whole batches only: drop the samples that do not fill one."""
    if dataset.num_samples == 0:
        raise DataError(f"{dataset.source}: no samples")
    fixed = sources.batch_dim(specs)
    if fixed is None or dataset.num_samples % fixed == 0:
        return dataset
    keep = dataset.num_samples - dataset.num_samples % fixed
    if keep == 0:
        raise DataError(f"{dataset.source}: {dataset.num_samples} samples, fewer than the fixed batch {fixed}")
    dataset.inputs = {k: v[:keep] for k, v in dataset.inputs.items()}
    dataset.labels = None if dataset.labels is None else dataset.labels[:keep]
    dataset.notes.append(f"dropped the last samples to fill whole batches of {fixed}")
    return dataset


def _size(model: LoadedModel, input_shapes: dict[str, list[int]] | None) -> dict:
    """Params, MACs per sample (batch 1) and file size; a model whose MACs cannot be counted still gets its
    float parameters (size is informative only: it never fails validation)."""
    try:
        stats = model_stats(model, input_shapes)
        return {"params": int(stats.params), "macs": stats.macs, "file_size": model.file_size}
    except Exception:  # informative only, see above
        params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.proto.graph.initializer
                     if t.data_type in FLOAT_TYPES)
        return {"params": params, "macs": None, "file_size": model.file_size}


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count()
