"""Importance: how much each channel or weight matters, one criterion per module.

Importing this package registers every criterion (registration order is the order of the ``--criterion``
choices); :mod:`onnxprune.importance.registry` is how the rest of the tool finds them.
"""

from onnxprune.importance import magnitude, bn_scale, act, recon, wanda, obs  # noqa: F401  (registers them)
from onnxprune.importance.registry import (AUTO, FALLBACK, ChannelScorer, Criterion, Target, auto_choice,
                                           channel_scorer, choices, get, help_text, names, register, require_data)

__all__ = ["AUTO", "FALLBACK", "ChannelScorer", "Criterion", "Target", "auto_choice", "channel_scorer", "choices",
           "get", "help_text", "names", "register", "require_data"]
