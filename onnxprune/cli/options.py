"""Option types and option groups shared by several subcommands (defined once)."""

from __future__ import annotations

import re

import click

from onnxprune.errors import ConfigError
from onnxprune.prune.unstructured import parse_pattern


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


RATIO = RatioType()
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
