"""onnxprune: framework-neutral pruning for ONNX models.

Typical library use::

    import onnxprune
    report = onnxprune.prune_file("model.onnx", "model.pruned.onnx", onnxprune.PruneOptions(channels=0.3))

    model = onnxprune.load_model("model.onnx")          # explicit channel sets
    groups = onnxprune.find_groups(model)
    plan = onnxprune.ChannelPlan({g.id: [0, 3] for g in groups.prunable()})
    onnxprune.apply_plan(groups, plan)
    onnxprune.save_model(model, "model.pruned.onnx")
"""

from onnxprune.channels.groups import ChannelGroup, GroupSet
from onnxprune.errors import (ConfigError, DataError, InputModelError, OnnxPruneError, OutputError,
                              ProviderUnavailable, ValidationFailed)
from onnxprune.graph.io import LoadedModel, from_proto, load_model, save_model
from onnxprune.pipeline import PruneOptions, PruneReport, find_groups, prune_file, prune_model
from onnxprune.prune.structured import ChannelPlan, apply_plan, plan_channels
from onnxprune.graph.stats import model_stats

__all__ = [
    "ChannelGroup", "ChannelPlan", "ConfigError", "DataError", "GroupSet", "InputModelError", "LoadedModel",
    "OnnxPruneError", "OutputError", "ProviderUnavailable", "PruneOptions", "PruneReport", "ValidationFailed",
    "apply_plan", "find_groups", "from_proto", "load_model", "model_stats", "plan_channels", "prune_file",
    "prune_model", "save_model",
]
