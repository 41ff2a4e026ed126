"""Validation of a pruned model against its original: accuracy, agreement, latency, size, mobile readiness.

Public API (used by ``onnxprune validate``, ``onnxprune MODEL --validate`` and library callers):

* :func:`validate_options` — click decorator adding every validation option (not ``--json``/``--input-shape``/
  ``--debug``, which the commands own);
* :func:`run_validation` — runs everything and returns a :class:`ValidationReport`;
* building blocks for recovery/search: :func:`load_dataset`, :func:`evaluate_pair`, :func:`evaluate_model`.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from onnxprune.cli.options import RatioType
from onnxprune.errors import ConfigError, DataError
from onnxprune.graph.check import check_input_model
from onnxprune.graph.io import LoadedModel, load_model
from onnxprune.graph.stats import check_input_shapes
from onnxprune.data import sources as data_mod
from onnxprune.validate import providers as prov
from onnxprune.validate.accuracy import PairResult, TopK, evaluate_pair, run_batch
from onnxprune.data.sources import Dataset, Preprocess
from onnxprune.validate.latency import MEMORY_METHOD, measure_pair
from onnxprune.validate.mobile import check_mobile, export_ort
from onnxprune.validate.report import SCHEMA, ValidationReport

__all__ = ["ValidationReport", "ValidateOptions", "validate_options", "run_validation", "load_dataset",
           "evaluate_pair", "evaluate_model", "PairResult", "Dataset", "SCHEMA"]

PROGRESS_MIN_BATCHES = 20  # shorter evaluations finish before a bar is worth drawing


@dataclass
class ValidateOptions:
    """The kwargs :func:`validate_options` produces, with the same defaults (library callers may omit any)."""

    data: str | None = None
    labels: str = "labels"
    batch_size: int | None = None
    limit: int | None = None
    seed: int = 0
    providers: str = "cpu"
    threads: int = 0
    warmup: int = 5
    runs: int = 50
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    mobile: bool = True
    export_ort: str | None = None
    resize: int | None = None
    center_crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None


class FloatListType(click.ParamType):
    """``0.485,0.456,0.406`` -> tuple of floats."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of numbers", param, ctx)


FRACTION = RatioType(closed=True, hint=" (fractions: 0.01 = one percentage point)")

_OPTIONS = [
    click.option("--data", type=click.Path(exists=True), help="Validation data: an .npz with one array per model "
                 "input name (first axis = samples), or a folder with one subfolder of images per class. Default: "
                 "random inputs generated from the model's input specs (no accuracy then)."),
    click.option("--labels", default="labels", show_default=True, metavar="KEY",
                 help="Name of the labels array (integer class per sample) in the .npz."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Samples per run, for evaluation and latency "
                 "[default: the model's fixed batch dim, else 1]."),
    click.option("--limit", type=click.IntRange(min=1), help="Use at most this many samples (generated data: the "
                 f"number of samples, default {data_mod.GENERATED_SAMPLES})."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
    click.option("--providers", default="cpu", show_default=True,
                 help="Execution providers to time, comma-separated: cpu, cuda, tensorrt, xnnpack, coreml, nnapi, "
                      "openvino, dml, qnn, ... or 'auto' (all installed). The first one also computes accuracy."),
    click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Intra-op threads per session (0 = onnxruntime's default)."),
    click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
                 help="Untimed runs per model before timing."),
    click.option("--runs", type=click.IntRange(min=0), default=50, show_default=True,
                 help="Timed runs per model (interleaved); 0 skips latency."),
    click.option("--max-accuracy-drop", type=FRACTION, help="Fail (exit 5) when top-1 accuracy drops by more than "
                 "this fraction (0.01 = one percentage point). Needs labels."),
    click.option("--min-agreement", type=FRACTION, help="Fail (exit 5) when top-1 agreement between original and "
                 "pruned falls below this fraction on any classification output."),
    click.option("--min-cosine", type=click.FloatRange(-1, 1), help="Fail (exit 5) when the mean cosine "
                 "similarity of any output falls below this."),
    click.option("--mobile/--no-mobile", default=True, show_default=True,
                 help="Run onnxruntime's NNAPI/CoreML usability check on both models."),
    click.option("--export-ort", type=click.Path(file_okay=False), metavar="DIR",
                 help="Also write the pruned model in ORT format with its required-operators config into DIR."),
    click.option("--resize", type=click.IntRange(min=1), help="Images: resize the shorter side to this before the "
                 "center crop [default: resize straight to the model's size]."),
    click.option("--center-crop", type=click.IntRange(min=1), help="Images: square crop size (needed when the "
                 "model's height/width are dynamic; must match them when fixed)."),
    click.option("--mean", type=FloatListType(), default="0", show_default=True,
                 help="Images: per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406."),
    click.option("--std", type=FloatListType(), default="1", show_default=True,
                 help="Images: per-channel std divided by after the mean, e.g. 0.229,0.224,0.225."),
    click.option("--scale", type=float, default=1 / 255, show_default="1/255",
                 help="Images: multiply 0..255 pixel values by this first."),
    click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                 help="Images: tensor layout [default: guessed from the input shape]."),
]


def validate_options(fn):
    """Add every validation option to a click command (dest names = :class:`ValidateOptions` fields)."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def load_dataset(model: LoadedModel, opts: ValidateOptions, input_shapes: dict[str, list[int]] | None,
                 batch_size: int) -> Dataset:
    """The validation data for ``model`` (npz, image folder or generated), checked against its inputs."""
    specs = data_mod.resolve_specs(data_mod.input_specs(model.proto), input_shapes)
    if not opts.data:
        return data_mod.generate(specs, batch_size, opts.limit, opts.seed)
    path = Path(opts.data)
    if path.is_dir():
        pre = Preprocess(resize=opts.resize, center_crop=opts.center_crop, mean=tuple(opts.mean),
                         std=tuple(opts.std), scale=opts.scale, layout=opts.layout.upper() if opts.layout else None)
        return data_mod.load_image_folder(path, specs, pre, opts.limit)
    if path.suffix.lower() == ".npz":
        return data_mod.load_npz(path, specs, opts.labels, opts.limit)
    raise ConfigError(f"--data {path}: expected an .npz file or a folder of class subfolders with images")


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


def _batch_size(specs: list[data_mod.InputSpec], requested: int | None) -> int:
    fixed = data_mod.batch_dim(specs)
    if fixed is None:
        return requested or 1
    if requested is not None and requested != fixed:
        raise ConfigError(f"--batch-size {requested}: the model's batch dim is fixed to {fixed}")
    return fixed


def _size(model: LoadedModel, input_shapes: dict[str, list[int]] | None) -> dict:
    """Params, MACs per sample (batch 1) and file size. MACs need the lead's stats module; params fall back to
    counting float initializers."""
    try:
        from onnxprune.graph.stats import model_stats
    except ImportError:
        model_stats = None
    if model_stats is not None:
        try:
            stats = model_stats(model, input_shapes)
            return {"params": int(stats.params), "macs": stats.macs, "file_size": model.file_size}
        except Exception:  # size is informative only; never fail validation on it
            pass
    floats = (1, 10, 11, 16)  # float, float16, double, bfloat16
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.proto.graph.initializer if t.data_type in floats)
    return {"params": params, "macs": None, "file_size": model.file_size}


def _progress(enabled: bool, total: int, label: str):
    """A stderr progress bar when it helps (a terminal and a long evaluation), else a no-op."""
    if not enabled or not sys.stderr.isatty():
        return None
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)


def run_validation(original: str | Path, pruned: str | Path, input_shapes: dict[str, list[int]] | None = None,
                   progress: bool = True, **options) -> ValidationReport:
    """Compare ``pruned`` against ``original``; ``options`` are the kwargs of :func:`validate_options`.

    Raises the OnnxPruneError subclasses with their exit codes: ConfigError (2), InputModelError (3),
    OutputError (4, --export-ort), ProviderUnavailable (6), DataError (7). Thresholds are not checked here: call
    :meth:`ValidationReport.check_thresholds` after printing/saving the report.
    """
    known = {f.name for f in fields(ValidateOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"run_validation() got unknown option(s): {', '.join(unknown)}")
    opts = ValidateOptions(**options)
    started = time.perf_counter()
    input_shapes = dict(input_shapes or {})
    providers = prov.resolve(opts.providers)  # fail fast (exit 6) before any data work
    if not providers:
        raise ConfigError("--providers auto found no usable execution provider")
    orig_model, pruned_model = load_model(original), load_model(pruned)
    for model in (orig_model, pruned_model):
        check_input_model(model)
    check_input_shapes(orig_model, input_shapes)  # exit 2 before any data work
    orig_specs = data_mod.input_specs(orig_model.proto)
    pruned_specs = data_mod.input_specs(pruned_model.proto)
    if [(s.name, s.dtype) for s in orig_specs] != [(s.name, s.dtype) for s in pruned_specs]:
        raise DataError("the models take different inputs: original "
                        f"{'; '.join(s.describe() for s in orig_specs)}, pruned "
                        f"{'; '.join(s.describe() for s in pruned_specs)}")
    batch_size = _batch_size(orig_specs, opts.batch_size)
    dataset = load_dataset(orig_model, opts, input_shapes, batch_size)
    if dataset.num_samples == 0:
        raise DataError(f"{dataset.source}: no samples")
    fixed = data_mod.batch_dim(orig_specs)
    if fixed is not None and dataset.num_samples % fixed:
        keep = dataset.num_samples - dataset.num_samples % fixed
        if keep == 0:
            raise DataError(f"{dataset.source}: {dataset.num_samples} samples, fewer than the fixed batch {fixed}")
        dataset.inputs = {k: v[:keep] for k, v in dataset.inputs.items()}
        dataset.labels = None if dataset.labels is None else dataset.labels[:keep]
        dataset.notes.append(f"dropped the last samples to fill whole batches of {fixed}")
    if opts.max_accuracy_drop is not None and dataset.labels is None:
        raise ConfigError("--max-accuracy-drop needs labelled data (--data FILE.npz with a labels array, or an "
                          "image folder); use --min-agreement/--min-cosine without labels")

    # accuracy and agreement on the first provider
    orig_sess, _ = prov.create_session(original, providers[0], opts.threads)
    pruned_sess, _ = prov.create_session(pruned, providers[0], opts.threads)
    n_batches = -(-dataset.num_samples // batch_size)
    bar = _progress(progress and n_batches >= PROGRESS_MIN_BATCHES, dataset.num_samples, "evaluating")
    if bar is not None:
        with bar:
            pair = evaluate_pair(orig_sess, pruned_sess, dataset, batch_size, on_batch=bar.update)
    else:
        pair = evaluate_pair(orig_sess, pruned_sess, dataset, batch_size)
    del orig_sess, pruned_sess
    if opts.min_agreement is not None and not any(r["classification"] for r in pair.outputs.values()):
        shapes = ", ".join(f"{name} {res['shape']}" for name, res in pair.outputs.items())
        raise ConfigError("--min-agreement needs a classification-shaped output [N, classes]; this model has "
                          f"{shapes}; use --min-cosine")

    latency = []
    if opts.runs > 0:
        feed = next(dataset.batches(batch_size))[0]
        for provider in providers:
            if progress and sys.stderr.isatty():
                click.echo(f"timing on {prov.short_name(provider)} ...", err=True)
            latency.append(measure_pair(original, pruned, provider, feed, opts.threads, opts.warmup, opts.runs))

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


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count()
