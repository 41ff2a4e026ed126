"""`onnxprune inspect MODEL`: prunable layers, parameters, MACs and sparsity."""

from __future__ import annotations

import click

from onnxprune.cli.options import debug_option, input_shape_option, json_option
from onnxprune.graph.io import load_model
from onnxprune.report import render_inspect, stats_dict, write_json
from onnxprune.stats import model_stats


@click.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=True))
@input_shape_option
@json_option
@debug_option
def inspect_command(model: str, input_shapes, json_path: str | None, debug: bool) -> None:
    """Show one row per prunable layer: weight shape, parameters, MACs (static shapes), sparsity."""
    loaded = load_model(model)
    stats = model_stats(loaded, dict(input_shapes))
    click.echo(render_inspect(stats, model))
    if json_path:
        write_json({"model": model, **stats_dict(stats)}, json_path)
