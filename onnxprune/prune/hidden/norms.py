"""The normalisations over the hidden axis: one op (LayerNormalization, SimplifiedLayerNormalization,
RMSNormalization), or the same maths decomposed into elementwise ops, as exporters write it below opset 17 and for
RMSNorm:

    LayerNorm: d = x - ReduceMean(x); y = d / Sqrt(ReduceMean(d^2) + eps) [* g] [+ b]
    RMSNorm:   y = x / Sqrt(ReduceMean(x^2) + eps) [* g] [+ b]

(``d^2`` as ``Pow(d, 2)`` or ``Mul(d, d)``; every ReduceMean over the last axis only, keeping it). A chain is only
taken as a norm when its inner tensors feed nothing else, so slicing or replacing it changes nothing outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr, node_label

# (domain, op) -> whether it is an RMSNorm (no mean subtraction); LayerNormalization subtracts the mean
NORM_OPS = {("", "LayerNormalization"): False, ("", "SimplifiedLayerNormalization"): True,
            ("com.microsoft", "SimplifiedLayerNormalization"): True, ("", "RMSNormalization"): True}


class Refused(Exception):
    """The stream contains something the rewrite cannot handle; the message is the reason (for the report)."""


@dataclass
class Norm:
    """A normalisation of ``x`` over its last axis into ``y``: one op, or a decomposed chain (``nodes`` in order).
    ``scale``/``bias``: the (node, input slot) holding g and b; None when the norm has none (g = 1, b = 0)."""

    nodes: list[onnx.NodeProto]
    x: str
    y: str
    rms: bool
    epsilon: float
    scale: tuple[onnx.NodeProto, int] | None
    bias: tuple[onnx.NodeProto, int] | None
    inner: list[str] = field(default_factory=list)  # a chain's own tensors that have the hidden width

    @property
    def label(self) -> str:
        return node_label(self.nodes[0]) + (f" (+{len(self.nodes) - 1} nodes)" if len(self.nodes) > 1 else "")

    def gamma(self, index: GraphIndex, width: int) -> np.ndarray:
        return np.ones(width) if self.scale is None else _vector(index, self.scale)

    def beta(self, index: GraphIndex) -> np.ndarray | None:
        return None if self.bias is None else _vector(index, self.bias)


def _vector(index: GraphIndex, at: tuple[onnx.NodeProto, int]) -> np.ndarray:
    node, slot = at
    return index.const_value(node.input[slot]).astype(np.float64).reshape(-1)


def find_norms(index: GraphIndex) -> list[Norm]:
    """Every normalisation over the last axis, in graph order.

    Raises:
        Refused: a norm op over other axes, with its statistics outputs used, or with computed parameters.
    """
    norms = [n for n in (_norm_op(index, node) for node in index.graph.node) if n is not None]
    taken = {id(node) for n in norms for node in n.nodes}
    for chain in (_layer_chain, _rms_chain):
        for node in index.graph.node:
            if id(node) in taken:
                continue
            found = chain(index, node)
            if found is not None:
                norms.append(found)
                taken |= {id(n) for n in found.nodes}
    position = {id(node): k for k, node in enumerate(index.graph.node)}
    return sorted(norms, key=lambda n: position[id(n.nodes[0])])


def _norm_op(index: GraphIndex, node: onnx.NodeProto) -> Norm | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    rms = NORM_OPS.get((domain, node.op_type))
    if rms is None:
        return None
    label = node_label(node)
    rank = index.rank(node.input[0])
    axis = int(attr(node, "axis", -1))
    if axis != -1 and (rank is None or axis % rank != rank - 1):
        raise Refused(f"{label} normalises over more than the last axis (or its rank is unknown)")
    if any(o and (index.consumers_of(o) or o in index.graph_outputs) for o in node.output[1:]):
        raise Refused(f"{label}: its statistics outputs are used")
    bias = 2 if len(node.input) > 2 and node.input[2] else None
    for slot in (1, bias):
        if slot is not None and not _float_constant(index, node.input[slot]):
            raise Refused(f"{label}: scale and bias must be float32 constants")
    return Norm([node], node.input[0], node.output[0], rms, float(attr(node, "epsilon", 1e-5)), (node, 1),
                None if bias is None else (node, bias))


def _float_constant(index: GraphIndex, name: str) -> bool:
    return index.is_constant(name) and index.const_value(name).dtype == np.float32


def _sole(index: GraphIndex, t: str, op: str | tuple[str, ...]) -> onnx.NodeProto | None:
    """The one node reading ``t`` if it is an ``op`` (and ``t`` is no graph output), else None."""
    uses = index.consumers_of(t)
    ops = (op,) if isinstance(op, str) else op
    if len(uses) != 1 or t in index.graph_outputs or uses[0].node.op_type not in ops:
        return None
    return uses[0].node


def _last_axis_mean(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type != "ReduceMean" or not int(attr(node, "keepdims", 1)):
        return False
    axes = attr(node, "axes", None)
    if len(node.input) > 1 and node.input[1]:
        axes = index.const_value(node.input[1]) if index.is_constant(node.input[1]) else None
    rank = index.rank(node.input[0])
    return axes is not None and rank is not None and [int(a) % rank for a in np.ravel(axes)] == [rank - 1]


def _squares(index: GraphIndex, node: onnx.NodeProto, of: str) -> bool:
    if node.op_type == "Mul":
        return list(node.input) == [of, of]
    if node.op_type != "Pow" or node.input[0] != of or not index.is_constant(node.input[1]):
        return False
    exponent = index.const_value(node.input[1])
    return exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0


def _root_mean_square(index: GraphIndex, square: onnx.NodeProto, of: str):
    """From ``square`` (of ``of``): ReduceMean -> Add eps -> Sqrt -> Div(of, .); (nodes, epsilon, the Div) or None."""
    mean = _sole(index, square.output[0], "ReduceMean")
    if mean is None or not _last_axis_mean(index, mean):
        return None
    add = _sole(index, mean.output[0], "Add")
    if add is None:
        return None
    eps = [n for n in add.input if n != mean.output[0]]
    if len(eps) != 1 or not index.is_constant(eps[0]) or index.const_value(eps[0]).size != 1:
        return None
    sqrt = _sole(index, add.output[0], "Sqrt")
    div = None if sqrt is None else _sole(index, sqrt.output[0], "Div")
    if div is None or list(div.input) != [of, sqrt.output[0]]:
        return None
    return [square, mean, add, sqrt, div], float(index.const_value(eps[0]).reshape(-1)[0]), div


def _affine(index: GraphIndex, nodes: list[onnx.NodeProto], inner: list[str], out: str):
    """The per-channel Mul (g) and Add (b) of constant vectors that may follow; (scale, bias, y)."""
    found: dict[str, tuple[onnx.NodeProto, int]] = {}
    width = index.size(out, -1)
    for op in ("Mul", "Add"):
        node = _sole(index, out, op)
        if node is None:
            continue
        slot = 1 if node.input[0] == out else 0
        name = node.input[slot]
        if not _float_constant(index, name) or index.const_value(name).size != width or width is None:
            continue
        found[op] = (node, slot)
        nodes.append(node)
        inner.append(out)
        out = node.output[0]
    return found.get("Mul"), found.get("Add"), out


def _layer_chain(index: GraphIndex, first: onnx.NodeProto) -> Norm | None:
    if not _last_axis_mean(index, first):
        return None
    x = first.input[0]
    sub = _sole(index, first.output[0], "Sub")
    if sub is None or list(sub.input) != [x, first.output[0]]:
        return None
    d = sub.output[0]
    uses = index.consumers_of(d)
    square = next((u.node for u in uses if _squares(index, u.node, d)), None)
    if len(uses) != 2 + (square is not None and square.op_type == "Mul") or square is None or d in index.graph_outputs:
        return None
    rms = _root_mean_square(index, square, d)
    if rms is None:
        return None
    chain, epsilon, div = rms
    nodes, inner = [first, sub, *chain], [d, square.output[0]]
    scale, bias, y = _affine(index, nodes, inner, div.output[0])
    return Norm(nodes, x, y, False, epsilon, scale, bias, inner)


def _rms_chain(index: GraphIndex, square: onnx.NodeProto) -> Norm | None:
    if square.op_type not in ("Pow", "Mul") or not _squares(index, square, square.input[0]):
        return None
    x = square.input[0]
    rms = _root_mean_square(index, square, x)
    if rms is None:
        return None
    chain, epsilon, div = rms
    nodes, inner = list(chain), [square.output[0]]
    scale, bias, y = _affine(index, nodes, inner, div.output[0])
    return Norm(nodes, x, y, True, epsilon, scale, bias, inner)
