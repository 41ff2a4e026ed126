"""`onnxprune [prune] MODEL --channels R | --sparsity R | --pattern N:M`: the main job."""

from __future__ import annotations

import click

from pathlib import Path

from onnxprune.cli.options import (BUDGET, GLOB_RATIO, MODEL_PATH, PATTERN, RATIO, debug_option,
                                   input_shape_option, json_option, validate_options)
from onnxprune import importance
from onnxprune.errors import ConfigError
from onnxprune.graph.io import default_output_path
from onnxprune.passes.channels import ATTENTION_UNITS
from onnxprune.pipeline import PruneOptions, prune_file
from onnxprune.quantize import kinds as quant_kinds
from onnxprune.quantize.run import DEFAULT_QUANT_RECOVERY, QUANT_RECOVERY
from onnxprune.recovery import registry as recovery_methods
from onnxprune.search.budget import DEFAULT_ROUNDS, prune_to_budget
from onnxprune.report import check_json_target, prune_dict, render_prune, write_json
from onnxprune.validate import ValidateOptions, run_validation
from onnxprune.validate.mobile import ship_for_mobile
from onnxprune.validate.report import render_shipped


class RoundToType(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or str(value) == "auto":
            return None
        try:
            number = int(value)
        except ValueError:
            self.fail(f"'{value}' is not a positive integer or 'auto'", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive integer", param, ctx)
        return number


@click.command(name="prune")
@click.argument("model", type=MODEL_PATH)
@click.option("-o", "--output", type=click.Path(readable=False),
              help="Output file (default: <stem>.pruned.onnx beside the input).")
@click.option("--channels", type=RATIO, help="Remove this fraction of channels from every group (structured).")
@click.option("--hidden", type=RATIO, help="Remove this fraction of a transformer's hidden (residual-stream) width: "
              "exact PCA rotation then slicing for pre-LN models, scored channels and lsq repair for post-LN; "
              "needs --calib.")
@click.option("--sparsity", type=RATIO, help="Zero this fraction of weights (unstructured; after --channels).")
@click.option("--pattern", type=PATTERN,
              help="N:M sparsity, e.g. 2:4: keep N of every M weights along the reduction axis.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="layer: each group/tensor loses the ratio; global: one ranking across all of them.")
@click.option("--criterion", type=click.Choice(importance.choices()), default=importance.AUTO, show_default=True,
              help=importance.help_text())
@click.option("--group-reduction", "reduction", type=click.Choice(["mean", "sum", "max"]), default="mean",
              show_default=True, help="How a channel's scores over its group members are combined.")
@click.option("--round-to", type=RoundToType(), default="auto", show_default=True,
              help="Round kept channel counts to a multiple of N (auto: 16 on AVX-512 CPUs, else 8; 1 = exact).")
@click.option("--attention-units", type=click.Choice(ATTENTION_UNITS), default="heads", show_default=True,
              help="What --channels removes from attention: whole heads (q, k, v and output-projection slices), or "
                   "head dims: the same dims of every head (q/k dims together, v/output dims together).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave layers/tensors matching GLOB alone (repeatable).")
@click.option("--layer-channels", type=GLOB_RATIO, multiple=True, help="Per-layer channel ratio GLOB=RATIO.")
@click.option("--layer-sparsity", type=GLOB_RATIO, multiple=True, help="Per-layer sparsity GLOB=RATIO.")
@click.option("--min-params", type=click.IntRange(min=0), default=0, show_default=True,
              help="Do not zero weights of tensors smaller than this.")
@click.option("--max-group-ratio", type=RATIO, help="Global channel scope: cap on the fraction any group loses "
                                                     "(default min(0.9, 2 x --channels)).")
@click.option("--sparse-storage", is_flag=True, help="Store zeroed weights as sparse initializers when smaller.")
@click.option("--calib", type=click.Path(exists=False), help="Calibration data (.npz with one array per input, or "
              "an image folder) for act/wanda scoring and recovery. An image folder is prepared with the same "
              "--resize/--center-crop/--mean/--std/--scale/--layout as --data.")
@click.option("--calib-limit", type=click.IntRange(min=1), default=256, show_default=True,
              help="Use at most this many calibration samples.")
@click.option("--recover", "recover_method", type=click.Choice(recovery_methods.names()),
              help=recovery_methods.cli_help())
@click.option("--steps", type=click.IntRange(min=1), show_default=f"1; with a --target-*: {DEFAULT_ROUNDS}",
              help="Remove the channels in N equal rounds, recovering after each (with --calib); with a --target-*, "
                   "the search's planned rounds.")
@click.option("--target-macs", type=BUDGET, help="Budget instead of ratios: keep at most this fraction of the MACs; "
              "every group's ratio is searched by its measured loss on --calib.")
@click.option("--target-params", type=BUDGET, help="Budget: keep at most this fraction of the parameters.")
@click.option("--target-latency", type=BUDGET, help="Budget: at most this fraction of the original's median "
              "latency on the first --providers entry (--threads), as measured after pruning.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With a --target-*: local processes for the search's loss evaluations.")
@click.option("--ray", metavar="auto|ADDRESS", help="With a --target-*: run the search's loss evaluations on Ray "
              "('auto': a local instance or RAY_ADDRESS; else a cluster address).")
@click.option("--quantize", "quantize_kind", type=click.Choice(quant_kinds.names()), help=quant_kinds.help_text())
@click.option("--quant-method", type=click.Choice(list(quant_kinds.METHODS)), default="minmax", show_default=True,
              help="How --quantize int8 calibrates activation ranges on --calib.")
@click.option("--quant-recover", type=click.Choice(list(QUANT_RECOVERY)),
              help=f"[default: {DEFAULT_QUANT_RECOVERY}] How --quantize int8 compensates its error on --calib: gptq "
              "rounds the weights "
              "to the int8 grid GPTQ's way before quantizing, bias folds the remaining per-channel output shift into "
              "the biases after it (kept only where it helps), gptq+bias does both.")
@click.option("--verify", is_flag=True, help="Prove the channel removal: compare the result with the original "
              "whose removed channels are masked to zero, on random inputs; a mismatch is an error.")
@click.option("--validate", "do_validate", is_flag=True, help="Validate the result against the input afterwards.")
@input_shape_option
@json_option
@validate_options
@debug_option
def prune_command(model: str, output: str | None, channels: float | None, hidden: float | None, sparsity: float | None,
                  pattern: tuple[int, int] | None, scope: str, criterion: str, reduction: str,
                  round_to: int | None, attention_units: str, exclude: tuple[str, ...], layer_channels, layer_sparsity, min_params: int,
                  max_group_ratio: float | None, sparse_storage: bool, calib: str | None, calib_limit: int,
                  recover_method: str | None, steps: int | None, target_macs: float | None,
                  target_params: float | None, target_latency: float | None, workers: int, ray: str | None,
                  quantize_kind: str | None, quant_method: str, quant_recover: str | None,
                  verify: bool, do_validate: bool, input_shapes,
                  json_path: str | None, debug: bool, validation: ValidateOptions) -> None:
    """Prune MODEL and write the result (the input file is never modified)."""
    budget = target_macs is not None or target_params is not None or target_latency is not None
    if channels is None and hidden is None and sparsity is None and pattern is None and not budget:
        raise ConfigError("nothing to do: give --channels, --hidden, --sparsity, --pattern or a --target-*")
    if budget and validation.max_accuracy_drop is not None:  # the budget's accuracy limit, judged on held-out data
        if not validation.data.path:
            raise ConfigError("--max-accuracy-drop with a --target-* is judged on held-out data: give --data")
        do_validate = True
    if pattern and sparsity is not None:
        raise ConfigError("--pattern sets the sparsity itself; do not combine it with --sparsity")
    if steps is None:
        steps = DEFAULT_ROUNDS if budget else 1
    out = Path(output) if output else default_output_path(Path(model))
    protected = (model, out, out.with_name(out.name + ".data"))
    if json_path:
        check_json_target(json_path, protected)  # before the model is written
    options = PruneOptions(channels=channels, sparsity=sparsity, pattern=pattern,
                           scope=scope, criterion=criterion, reduction=reduction, round_to=round_to,
                           attention_units=attention_units, exclude=exclude, layer_channels=layer_channels, layer_sparsity=layer_sparsity,
                           min_params=min_params, max_group_ratio=max_group_ratio, sparse_storage=sparse_storage,
                           input_shapes=dict(input_shapes), calib=calib, calib_limit=calib_limit,
                           recover=recover_method, verify=verify, steps=steps, quantize=quantize_kind,
                           quant_method=quant_method, quant_recover=quant_recover, hidden=hidden,
                           target_macs=target_macs, target_params=target_params,
                           target_latency=target_latency, latency_provider=validation.providers.split(",")[0],
                           latency_threads=validation.threads, workers=workers, ray=ray,
                           preprocess=validation.data.preprocess)
    report = prune_to_budget(model, output, options) if budget else prune_file(model, output, options)
    click.echo(render_prune(report))
    data = prune_dict(report)
    validation_report = None
    if do_validate:
        validation_report = run_validation(model, report.output, validation, dict(input_shapes))
        click.echo(validation_report.render())
        data["validation"] = validation_report.to_dict()
    elif validation.export_ort:  # the final model's ORT file and its mobile verdict, without a validation run
        data["mobile_export"] = shipped = ship_for_mobile(report.output, validation.export_ort, validation.mobile)
        click.echo(render_shipped(shipped))
    if json_path:
        write_json(data, json_path, protected)
    if validation_report is not None:
        validation_report.check_thresholds()
