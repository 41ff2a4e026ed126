"""``--verify``: the postcondition of channel removal, the exactness oracle of prune/verify.py run on the user's
model. Its inputs are drawn before any work (a run that cannot be verified stops at once), and its note says what
was proved and which later steps changed weights on purpose."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels.groups import GroupSet
from onnxprune.errors import ConfigError, OutputError
from onnxprune.graph import io
from onnxprune.graph.check import short_message
from onnxprune.graph.io import LoadedModel
from onnxprune.graph.stats import check_input_shapes
from onnxprune.passes.state import PruneOptions, PruneReport
from onnxprune.prune.structured import ChannelPlan
from onnxprune.prune.verify import feed_shapes, in_memory, masked_model, random_values, relative_difference, run

VERIFY_TOLERANCE = 1e-3
VERIFY_BATCH = 2


def verify_feeds(model: LoadedModel, options: PruneOptions) -> dict[str, np.ndarray]:
    """The random inputs ``--verify`` will use, drawn before any work: a run that cannot be verified fails at once
    with the reason and the fix, instead of after pruning or (worse) passing without a check.

    Raises:
        ConfigError: no channel removal was asked for, so there is nothing to prove; a bad ``--input-shape``.
        OutputError: the oracle cannot run: the model is too big to hold in memory, or an input has dynamic dims
            other than the batch and no ``--input-shape``.
    """
    if not options.prunes_channels:
        raise ConfigError("--verify proves a channel removal: give --channels above 0 or a --target-* (weight "
                          "sparsity alone changes no structure to check)")
    if not model.fits_in_memory:
        raise OutputError(f"--verify cannot run: the model is {model.file_size / 1e9:.1f} GB and the oracle runs it "
                          f"in onnxruntime from memory, which protobuf limits to {io.INLINE_LIMIT_BYTES / 1e9:.1f} GB; "
                          "prune without --verify. Nothing was written.")
    check_input_shapes(model, options.input_shapes)  # prune_file checks them too; library callers may not
    shapes, dynamic = feed_shapes(model.proto, VERIFY_BATCH, options.input_shapes)
    if dynamic:
        first = dynamic[0]
        raise OutputError(f"--verify cannot run: input '{first.name}' [{', '.join(map(str, first.dims))}] has "
                          f"dynamic dims ({', '.join(first.unknown)}) other than the batch, so the oracle cannot "
                          f"choose its shape; give --input-shape {first.name}:{first.example()} with each N set to "
                          "the size the model runs at. Nothing was written.")
    return random_values(model.proto, shapes)


def verify(reference: onnx.ModelProto, model: LoadedModel, groups: GroupSet, plan: ChannelPlan,
            feeds: dict[str, np.ndarray]) -> str:
    """The postcondition of channel removal: the structurally pruned model must give the outputs of ``reference``
    (the model just before removal, held in memory) with the removed channels masked to zero.

    Returns what was proved, for the report. ``reference`` is consumed (masked in place) to spare a copy.

    Raises:
        OutputError: a mismatch, or onnxruntime cannot run one of the two models; nothing is written.
    """
    if not plan.remove:
        return "--verify: no channel was removed (see the groups), so the structure is unchanged and there was no " \
               "removal to prove"
    expected = _run_for_verify(masked_model(reference, groups, plan.remove, in_place=True), feeds,
                               "--verify cannot run: onnxruntime cannot run the original model with the removed "
                               "channels masked")
    actual = _run_for_verify(in_memory(model, copy=False), feeds,
                             "internal error: onnxruntime cannot run the pruned model")
    difference = relative_difference(expected, actual)
    if not difference <= VERIFY_TOLERANCE:
        raise OutputError(f"internal error: --verify found the pruned model differs from the original with the "
                          f"removed channels masked (max relative difference {difference:.3g} on random inputs); "
                          "nothing was written. Please report this with the model.")
    shapes = ", ".join(f"{name} {'x'.join(map(str, v.shape))}" for name, v in feeds.items())
    removed = sum(len(ids) for ids in plan.remove.values())
    return (f"verified the channel removal: on random inputs ({shapes}) the model with {removed} channel(s) removed "
            f"gives the outputs of the model before removal with those channels masked to zero (max relative "
            f"difference {difference:.2g})")


def _run_for_verify(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], failure: str) -> list[np.ndarray]:
    try:
        return run(proto, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OutputError(f"{failure} ({short_message(exc)}); nothing was written") from None


def changed_after_removal(report: PruneReport) -> str:
    """What later steps did to the weights the verified model had, for the end of the ``--verify`` note."""
    steps = []
    if report.unstructured is not None and any(w.zeros_after != w.zeros_before for w in report.unstructured.weights):
        steps.append("weight sparsity zeroed weights")
    if report.recovery is not None and report.recovery.kept and any(f.accepted for f in report.recovery.layers):
        steps.append(f"recovery ({report.recovery.method}) re-fitted weights")
    if not steps:
        return ""
    return (f"; after that, {' and '.join(steps)} on purpose, so the saved model is not expected to equal the "
            "masked original")
