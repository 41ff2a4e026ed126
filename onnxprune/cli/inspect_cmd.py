"""`onnxprune inspect MODEL`: prunable layers, parameters, MACs and sparsity."""

from __future__ import annotations

import click

from onnxprune.cli.options import MODEL_PATH, debug_option, input_shape_option, json_option
from onnxprune.graph.check import check_input_model
from onnxprune.graph.io import load_model
from onnxprune.report import check_json_target, render_inspect, stats_dict, write_json
from onnxprune.graph.stats import model_stats


@click.command(name="inspect")
@click.argument("model", type=MODEL_PATH)
@input_shape_option
@json_option
@debug_option
def inspect_command(model: str, input_shapes, json_path: str | None, debug: bool) -> None:
    """Show one row per prunable layer: weight shape, parameters, MACs (static shapes), sparsity."""
    if json_path:
        check_json_target(json_path, [model])
    loaded = load_model(model)
    check_input_model(loaded)
    stats = model_stats(loaded, dict(input_shapes))
    click.echo(render_inspect(stats, model))
    if json_path:
        write_json({"model": model, **stats_dict(stats)}, json_path, [model])
