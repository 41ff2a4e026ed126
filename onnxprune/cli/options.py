"""Option types and option groups shared by several subcommands (defined once)."""

from __future__ import annotations

import re

import click


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
    """``NAME:1x3x224x224`` static input shapes."""

    name = "name:dims"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, dims = str(value).rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            self.fail(f"'{value}' is not NAME:DIMS (e.g. input:1x3x224x224)", param, ctx)
        return name, [int(d) for d in dims.split("x")]


RATIO = RatioType()
GLOB_RATIO = GlobRatioType()
SHAPE = ShapeType()


def debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(fn)


def input_shape_option(fn):
    return click.option("--input-shape", "input_shapes", type=SHAPE, multiple=True,
                        help="Static shape for a dynamic input, NAME:1x3x224x224 (repeatable); used for MACs and "
                             "shape-dependent rules.")(fn)


def json_option(fn):
    return click.option("--json", "json_path", type=click.Path(dir_okay=False),
                        help="Also write the report as JSON to this file.")(fn)
