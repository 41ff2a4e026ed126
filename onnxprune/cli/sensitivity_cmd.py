"""`onnxprune sensitivity MODEL --calib C [--data V]`: what pruning each group alone costs, as a table, JSON and plots.

Thin by design: options are parsed here, everything else is :func:`onnxprune.search.sensitivity.run_sensitivity`.
It takes the validation options for its data and timing (``--data``, ``--providers``, ``--runs``, ...); the ones that
only make sense when comparing two files (thresholds, mobile check, ORT export) are refused when given.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from onnxprune import importance
from onnxprune.cli.options import (FloatListType, MODEL_PATH, debug_option, input_shape_option, json_option,
                                   validate_options)
from onnxprune.cli.prune_cmd import RoundToType
from onnxprune.errors import ConfigError
from onnxprune.pipeline import PruneOptions
from onnxprune.recovery import registry as recovery_methods
from onnxprune.report import check_json_target, write_json
from onnxprune.search import report as sensitivity_report
from onnxprune.search.sensitivity import DEFAULT_RATIOS, SensitivityOptions, run_sensitivity
from onnxprune.validate import ValidateOptions

NOT_HERE = ("max_accuracy_drop", "min_agreement", "min_cosine", "mobile", "export_ort", "seed", "batch_size")


@click.command(name="sensitivity")
@click.argument("model", type=MODEL_PATH)
@click.option("--calib", required=True, type=click.Path(exists=False),
              help="Calibration data (.npz or image folder): the pruning criterion, recovery and the selection "
                   "loss are computed on it.")
@click.option("--calib-limit", type=click.IntRange(min=1), default=256, show_default=True,
              help="Use at most this many calibration samples.")
@click.option("--ratios", type=FloatListType(), default=",".join(map(str, DEFAULT_RATIOS)), show_default=True,
              help="Fractions of each group's channels to remove, comma-separated, each in (0, 1).")
@click.option("--only", multiple=True, metavar="GLOB", help="Measure only the groups with a node or tensor name "
              "matching GLOB (repeatable) [default: every prunable group].")
@click.option("--recover", "recover_method", type=click.Choice(recovery_methods.names()),
              help="The recovery measured beside none [default: lsq].")
@click.option("--criterion", type=click.Choice(importance.choices()), default=importance.AUTO, show_default=True,
              help="Channel importance, as for prune.")
@click.option("--round-to", type=RoundToType(), default="auto", show_default=True,
              help="Round kept channel counts to a multiple of N, as for prune (1 = exact).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes (1: in this process).")
@click.option("--ray", metavar="auto|ADDRESS", help="Run the tasks on Ray: 'auto' starts a local instance (or joins "
              "RAY_ADDRESS), else a cluster address (ray://head:10001). Needs onnxprune[ray].")
@click.option("--plot", "plot_dir", type=click.Path(readable=False),  # checked by check_plot_target: exit 4
              help="Write sensitivity_loss.png and sensitivity_frontier.png into this folder (needs onnxprune[plots]).")
@validate_options
@input_shape_option
@json_option
@debug_option
def sensitivity_command(model: str, calib: str, calib_limit: int, ratios: tuple[float, ...],
                        only: tuple[str, ...], recover_method: str | None, criterion: str, round_to: int | None, workers: int,
                        ray: str | None, plot_dir: str | None, validation: ValidateOptions, input_shapes,
                        json_path: str | None, debug: bool) -> None:
    """For every prunable group of MODEL: the loss after pruning that group alone at each of --ratios, without and
    with recovery (on --calib; judged on --data when given), its share of MACs, and its latency effect on
    --providers (--runs 0 skips timing).
    """
    ctx = click.get_current_context()
    given = [name for name in NOT_HERE if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is not a sensitivity option")
    if ray is not None and workers > 1:
        raise ConfigError("--workers is for local processes; with --ray the cluster decides")
    if json_path:
        check_json_target(json_path, [model])  # before the (long) run
    if plot_dir:
        from onnxprune.search.plots import check_plot_target

        check_plot_target(plot_dir)
    threads = validation.threads if ctx.get_parameter_source("threads") == ParameterSource.COMMANDLINE else 1
    prune = PruneOptions(criterion=criterion, round_to=round_to, input_shapes=dict(input_shapes), calib=calib,
                         calib_limit=calib_limit, preprocess=validation.data.preprocess)
    options = SensitivityOptions(prune=prune, data=validation.data if validation.data.path else None,
                                 ratios=tuple(ratios), only=only, recover=recover_method, providers=validation.providers,
                                 warmup=validation.warmup, runs=validation.runs, workers=workers, ray=ray,
                                 threads=threads)
    result = run_sensitivity(model, options)
    click.echo(sensitivity_report.render(result))
    if json_path:
        write_json(sensitivity_report.to_dict(result), json_path, [model])
    if plot_dir:
        from onnxprune.search.plots import write_plots

        for path in write_plots(result, plot_dir):
            click.echo(f"plot: {path}")


HELP_HERE = {
    "data": "Held-out data (.npz or image folder) the results are judged on; never used to select. Default: none "
            "(selection data only).",
    "threads": "onnxruntime intra-op threads per worker [default here: 1].",
    "limit": "Use at most this many --data samples.",
}
for _param in sensitivity_command.params:  # the shared validation options, as they apply here
    if _param.name in NOT_HERE:
        _param.hidden = True
    elif _param.name in HELP_HERE:
        _param.help = HELP_HERE[_param.name]
        _param.show_default = False
