"""Option types and option groups shared by several subcommands (defined once)."""

from __future__ import annotations

import functools
import re

import click

from onnxprune.data.loader import DataOptions
from onnxprune.data.sources import GENERATED_SAMPLES, Preprocess
from onnxprune.errors import ConfigError
from onnxprune.prune.unstructured import parse_pattern
from onnxprune.validate import ValidateOptions


class RatioType(click.ParamType):
    """A fraction in [0, 1) (pruning ratios: 1 would remove everything), or in [0, 1] with ``closed``."""

    name = "ratio"

    def __init__(self, closed: bool = False, hint: str = "") -> None:
        self.closed = closed
        self.hint = hint

    def convert(self, value, param, ctx):
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a number", param, ctx)
        if not (0 <= ratio <= 1 if self.closed else 0 <= ratio < 1):
            self.fail(f"{ratio} is outside [0, 1{']' if self.closed else ')'}{self.hint}", param, ctx)
        return ratio


class GlobRatioType(click.ParamType):
    """``GLOB=RATIO`` overrides, e.g. ``'*layer4*=0.5'``."""

    name = "glob=ratio"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        pattern, sep, ratio = str(value).rpartition("=")
        if not sep or not pattern:
            self.fail(f"'{value}' is not GLOB=RATIO", param, ctx)
        return pattern, RatioType().convert(ratio, param, ctx)


class ShapeType(click.ParamType):
    """``NAME:1x3x224x224`` static input shapes (ASCII digits: ``int()`` would also take '٣'; range and rank are
    checked against the model by :func:`onnxprune.graph.stats.check_input_shapes`)."""

    name = "name:dims"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, dims = str(value).rpartition(":")
        if not sep or not name or not re.fullmatch(r"[0-9]+(x[0-9]+)*", dims):
            self.fail(f"'{value}' is not NAME:DIMS (e.g. input:1x3x224x224)", param, ctx)
        return name, [int(d) for d in dims.split("x")]


class PatternType(click.ParamType):
    """``N:M`` semi-structured sparsity, e.g. ``2:4``; ASCII digits only (``int('²')`` raises, '٣' would parse)."""

    name = "N:M"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if not re.fullmatch(r"[0-9]{1,6}:[0-9]{1,6}", str(value)):
            self.fail(f"'{value}' is not N:M (whole numbers of up to 6 ASCII digits, N < M, e.g. 2:4)", param, ctx)
        try:
            return parse_pattern(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


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


class BudgetType(click.ParamType):
    """A budget: the fraction of the original to keep, strictly between 0 and 1 (0 keeps nothing, 1 prunes
    nothing)."""

    name = "fraction"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a number", param, ctx)
        if not 0 < fraction < 1:
            self.fail(f"{fraction} is outside (0, 1): the fraction of the original to keep", param, ctx)
        return fraction


RATIO = RatioType()
BUDGET = BudgetType()
FRACTION = RatioType(closed=True, hint=" (fractions: 0.01 = one percentage point)")
GLOB_RATIO = GlobRatioType()
SHAPE = ShapeType()
PATTERN = PatternType()
# No checks by click: load_model reports a missing, unreadable or folder path as an unreadable model (exit 3), where
# click.Path would say exit 2 (its default readable=True fails an unreadable file as a usage error).
MODEL_PATH = click.Path(readable=False)


def debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(fn)


def _no_repeated_names(ctx: click.Context, param: click.Parameter, value: tuple) -> tuple:
    names = [name for name, _ in value]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise click.BadParameter(f"input {', '.join(repeated)} given more than once", ctx, param)
    return value


def input_shape_option(fn):
    return click.option("--input-shape", "input_shapes", type=SHAPE, multiple=True, callback=_no_repeated_names,
                        help="Static shape for a dynamic input, NAME:1x3x224x224 (repeatable); used for MACs and "
                             "shape-dependent rules.")(fn)


def json_option(fn):
    # no click checks: onnxprune.report.check_json_target refuses a folder or unwritable target as an output error (4)
    return click.option("--json", "json_path", type=click.Path(readable=False),
                        help="Also write the report as JSON to this file.")(fn)


_IMAGES = "Image folders (--data, and --calib when pruning)"
_VALIDATE_OPTIONS = [
    click.option("--data", type=click.Path(exists=True), help="Validation data: an .npz with one array per model "
                 "input name (first axis = samples), or a folder with one subfolder of images per class. Default: "
                 "random inputs generated from the model's input specs (no accuracy then)."),
    click.option("--labels", default="labels", show_default=True, metavar="KEY",
                 help="Name of the labels array (integer class per sample) in the .npz."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Samples per run, for evaluation and latency "
                 "[default: the model's fixed batch dim, else 1]."),
    click.option("--limit", type=click.IntRange(min=1), help="Use at most this many samples (generated data: the "
                 f"number of samples, default {GENERATED_SAMPLES})."),
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
    click.option("--resize", type=click.IntRange(min=1), help=f"{_IMAGES}: resize the shorter side to this before "
                 "the center crop [default: resize straight to the model's size]."),
    click.option("--center-crop", type=click.IntRange(min=1), help=f"{_IMAGES}: square crop size (needed when the "
                 "model's height/width are dynamic; must match them when fixed)."),
    click.option("--mean", type=FloatListType(), default="0", show_default=True,
                 help=f"{_IMAGES}: per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406."),
    click.option("--std", type=FloatListType(), default="1", show_default=True,
                 help=f"{_IMAGES}: per-channel std divided by after the mean, e.g. 0.229,0.224,0.225."),
    click.option("--scale", type=float, default=1 / 255, show_default="1/255",
                 help=f"{_IMAGES}: multiply 0..255 pixel values by this first."),
    click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                 help=f"{_IMAGES}: tensor layout [default: guessed from the input shape]."),
]


def _pop_validation(params: dict) -> ValidateOptions:
    """Take the values of :data:`_VALIDATE_OPTIONS` out of a command's parameters, as one typed object."""
    layout = params.pop("layout")
    preprocess = Preprocess(resize=params.pop("resize"), center_crop=params.pop("center_crop"),
                            mean=tuple(params.pop("mean")), std=tuple(params.pop("std")), scale=params.pop("scale"),
                            layout=layout.upper() if layout else None)
    data = DataOptions(path=params.pop("data"), labels=params.pop("labels"), limit=params.pop("limit"),
                       batch_size=params.pop("batch_size"), seed=params.pop("seed"), preprocess=preprocess)
    return ValidateOptions(data=data, providers=params.pop("providers"), threads=params.pop("threads"),
                           warmup=params.pop("warmup"), runs=params.pop("runs"),
                           max_accuracy_drop=params.pop("max_accuracy_drop"),
                           min_agreement=params.pop("min_agreement"), min_cosine=params.pop("min_cosine"),
                           mobile=params.pop("mobile"), export_ort=params.pop("export_ort"))


def validate_options(fn):
    """Add every validation option (not ``--json``/``--input-shape``/``--debug``, which the commands own); the
    command receives them as one ``validation: ValidateOptions`` argument."""

    @functools.wraps(fn)
    def command(*args, **params):
        validation = _pop_validation(params)
        return fn(*args, validation=validation, **params)

    for option in reversed(_VALIDATE_OPTIONS):
        command = option(command)
    return command
