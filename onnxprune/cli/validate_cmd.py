"""`onnxprune validate ORIGINAL PRUNED`: accuracy, agreement, latency, size and mobile readiness in one report.

Thin by design: options are parsed here, everything else is :func:`onnxprune.validate.run_validation`, which
``onnxprune MODEL --validate`` calls too.
"""

from __future__ import annotations

import click

from onnxprune.cli.options import MODEL_PATH, debug_option, input_shape_option, json_option, validate_options
from onnxprune.report import check_json_target, write_json
from onnxprune.validate import ValidateOptions, run_validation


@click.command(name="validate")
@click.argument("original", type=MODEL_PATH)
@click.argument("pruned", type=MODEL_PATH)
@validate_options
@input_shape_option
@json_option
@debug_option
def validate_command(original: str, pruned: str, validation: ValidateOptions, input_shapes,
                     json_path: str | None, debug: bool) -> None:
    """Compare PRUNED against ORIGINAL on the same data: accuracy (with labels), output agreement, interleaved
    latency per execution provider, parameters/MACs/file size and onnxruntime's mobile usability check.

    Exits 5 when --max-accuracy-drop, --min-agreement or --min-cosine is exceeded (the report and --json are
    written first), 6 when a requested provider is not installed, 7 when the data does not match the model.
    """
    if json_path:
        check_json_target(json_path, [original, pruned])  # before the (long) validation run
    report = run_validation(original, pruned, validation, dict(input_shapes))
    click.echo(report.render())
    if json_path:
        write_json(report.to_dict(), json_path, [original, pruned])
    report.check_thresholds()
