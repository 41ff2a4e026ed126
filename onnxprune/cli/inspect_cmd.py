"""`onnxprune inspect MODEL`: prunable layers, parameters, MACs and sparsity."""

from __future__ import annotations

import click

from onnxprune.cli.options import MODEL_PATH, debug_option, input_shape_option, json_option
from onnxprune.graph.check import check_input_model
from onnxprune.graph.io import load_model
from onnxprune.channels.attention import attention_blocks, feed_forwards
from onnxprune.pipeline import find_groups
from onnxprune.report import check_json_target, render_inspect, render_transformer, stats_dict, write_json
from onnxprune.graph.stats import model_stats


@click.command(name="inspect")
@click.argument("model", type=MODEL_PATH)
@input_shape_option
@json_option
@debug_option
def inspect_command(model: str, input_shapes, json_path: str | None, debug: bool) -> None:
    """Show one row per prunable layer: weight shape, parameters, MACs (static shapes), sparsity; for transformers
    also every attention block (heads, head dim, removable units) and feed-forward width."""
    if json_path:
        check_json_target(json_path, [model])
    loaded = load_model(model)
    check_input_model(loaded)
    stats = model_stats(loaded, dict(input_shapes))
    groups = find_groups(loaded, dict(input_shapes))
    blocks, ffns = attention_blocks(groups), feed_forwards(groups)
    click.echo(render_inspect(stats, model))
    if blocks:
        click.echo(render_transformer(blocks, ffns))
    if json_path:
        write_json({"model": model, **stats_dict(stats), "attention": [vars(b) for b in blocks],
                    "feed_forward": [vars(f) for f in ffns] if blocks else []}, json_path, [model])
