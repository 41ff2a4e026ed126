"""Integer token inputs (``input_ids``, ``attention_mask``, ``token_type_ids``): what the model says they may hold.

Why: token data is fed as given (no float conversion, no normalisation), so nothing downstream notices bad values
until onnxruntime fails in the middle of a run ("indices element out of data bounds") or, worse, silently computes
something: ONNX Gather reads a negative index from the end of the table, so id -1 embeds the last word, and a mask of
2 or a mask shorter than its ids changes the attention. The model itself says what is valid: an integer input used as
the indices of a Gather over a constant table (an embedding) must lie in [0, rows); an attention mask (the input
named so, or in a fused op's mask slot) holds 0/1 with at least one 1 per sample; inputs sharing a symbolic dim
("seq") must agree on it. The same facts let generated data (no ``--data``) be valid token data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import DataError

# fused onnxruntime ops (com.microsoft) and which input slot holds which kind of integer data
_FUSED_TABLES = {"EmbedLayerNormalization": {0: 2, 1: 4, 8: 3}}  # ids slot: its embedding table's slot
_FUSED_MASKS = {"EmbedLayerNormalization": (7,), "Attention": (3,), "MultiHeadAttention": (4,)}


@dataclass(frozen=True)
class TokenRule:
    """What one integer input may hold: ids below ``rows`` (an embedding's row count), or a 0/1 ``mask``."""

    name: str
    rows: int | None = None
    mask: bool = False


def _table_rows(graph: onnx.GraphProto, name: str) -> int | None:
    """Row count of a constant (initializer or Constant node) called ``name``."""
    for init in graph.initializer:
        if init.name == name:
            return int(init.dims[0]) if init.dims else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return int(numpy_helper.to_array(value).shape[0]) if value is not None and value.dims else None
    return None


def token_rules(proto: onnx.ModelProto) -> dict[str, TokenRule]:
    """The integer graph inputs that are token ids (read by an embedding Gather, directly or through a Cast) or
    attention masks, with what each may hold."""
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    ints = {v.name for v in graph.input if v.name not in inits
            and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).kind in "iu"}
    source = {name: name for name in ints}  # tensor -> the graph input it is a cast of
    rules: dict[str, TokenRule] = {}
    for node in graph.node:
        if node.op_type == "Cast" and node.input and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in source:
            if int(next((a.i for a in node.attribute if a.name == "axis"), 0)) == 0:
                rows = _table_rows(graph, node.input[0])
                if rows is not None:
                    name = source[node.input[1]]
                    rules[name] = TokenRule(name, min(rows, rules[name].rows or rows) if name in rules else rows)
        for slot, table in _FUSED_TABLES.get(node.op_type, {}).items():
            if slot < len(node.input) and node.input[slot] in source and table < len(node.input):
                rows = _table_rows(graph, node.input[table])
                if rows is not None:
                    rules[source[node.input[slot]]] = TokenRule(source[node.input[slot]], rows)
        for slot in _FUSED_MASKS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot] in source:
                rules[source[node.input[slot]]] = TokenRule(source[node.input[slot]], mask=True)
    for name in ints:
        if name not in rules and "mask" in name.lower():
            rules[name] = TokenRule(name, mask=True)
    return rules


def check_tokens(inputs: dict[str, np.ndarray], proto: onnx.ModelProto, source: str) -> None:
    """Refuse token data the model cannot mean: ids out of their table, masks that are not 0/1 or mask out a whole
    sample, and inputs that disagree on a shared symbolic dim (a mask shorter than its ids).

    Raises:
        DataError: naming the array, the sample and the value.
    """
    _check_shared_dims(inputs, proto, source)
    for rule in token_rules(proto).values():
        arr = inputs.get(rule.name)
        if arr is None or arr.size == 0:
            continue
        if rule.rows is not None:
            bad = (arr < 0) | (arr >= rule.rows)
            if bad.any():
                sample = int(np.argmax(bad.reshape(len(arr), -1).any(1)))
                value = int(arr.reshape(len(arr), -1)[sample][bad.reshape(len(arr), -1)[sample]][0])
                raise DataError(f"{source}: array '{rule.name}' has token id {value} at sample {sample}; the model's "
                                f"embedding takes ids 0..{rule.rows - 1}")
        if rule.mask:
            bad = (arr != 0) & (arr != 1)
            if bad.any():
                sample = int(np.argmax(bad.reshape(len(arr), -1).any(1)))
                raise DataError(f"{source}: array '{rule.name}' is an attention mask but has values other than 0 "
                                f"and 1 (sample {sample})")
            empty = ~arr.reshape(len(arr), -1).any(1)
            if empty.any():
                raise DataError(f"{source}: array '{rule.name}' masks out every position of sample "
                                f"{int(np.argmax(empty))}; a sample needs at least one token")


def _check_shared_dims(inputs: dict[str, np.ndarray], proto: onnx.ModelProto, source: str) -> None:
    """Inputs whose dims share a symbolic name (e.g. "seq") must have the same size there."""
    seen: dict[str, tuple[str, int]] = {}
    for value in proto.graph.input:
        arr = inputs.get(value.name)
        if arr is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis == 0 or not dim.dim_param or axis >= arr.ndim:
                continue  # the first axis is the sample axis, compared by the loader
            first = seen.setdefault(dim.dim_param, (value.name, int(arr.shape[axis])))
            if first[1] != arr.shape[axis]:
                raise DataError(f"{source}: array '{value.name}' has {arr.shape[axis]} at axis {axis} ('{dim.dim_param}') "
                                f"but '{first[0]}' has {first[1]}; the model needs them equal")


def valid_tokens(rules: dict[str, TokenRule], inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Generated integer inputs made valid token data: ids drawn below their table's rows, masks all ones."""
    rng = np.random.default_rng(seed)
    out = dict(inputs)
    for rule in rules.values():
        arr = inputs.get(rule.name)
        if arr is None:
            continue
        if rule.mask:
            out[rule.name] = np.ones_like(arr)
        elif rule.rows is not None:
            out[rule.name] = rng.integers(0, rule.rows, arr.shape).astype(arr.dtype)
    return out
