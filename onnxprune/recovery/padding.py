"""Padding positions of token models: rows that recovery neither fits nor scores.

Why: a BERT-style encoder sees sequences right-padded to one length, and its activations at padding positions
(``attention_mask == 0``) are never used downstream (the mask keeps every real token from attending to them) and are
discarded by whoever reads the output. Fitting a layer on them spends the least-squares budget on values nobody
reads; scoring the output error on them can undo a fit that made every real token better. Activations laid out
[batch, seq, ...] whose first two axes match the mask lose their padding rows; anything else is used whole.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.data.tokens import token_rules


def mask_input(proto: onnx.ModelProto) -> str | None:
    """The attention-mask input of ``proto`` (data/tokens.py decides what is a mask), or None."""
    return next((rule.name for rule in token_rules(proto).values() if rule.mask), None)


def real_rows(feed: dict[str, np.ndarray], mask: str | None, values: np.ndarray) -> np.ndarray | None:
    """For ``values`` [batch, seq, ...] fed by ``feed``: which of its batch*seq rows are real tokens (bool), or None
    when there is no mask or ``values`` is not laid out that way."""
    if mask is None or mask not in feed or values.ndim < 3 or values.shape[:2] != feed[mask].shape:
        return None
    return feed[mask].reshape(-1) != 0


def drop_padding(values: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``values`` [batch, seq, ...] as rows [real tokens, ...] (unchanged when ``keep`` is None)."""
    return values if keep is None else values.reshape(-1, *values.shape[2:])[keep]
