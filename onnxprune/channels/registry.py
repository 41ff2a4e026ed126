"""The channel-rule registry: one entry per op type, each a small handler that says how an op couples channels.

A *dim* is one axis of one tensor. Given a dim that touches a node (as an input or an output), a rule returns the
links that couple it to other dims of the same node, index by index, or a :class:`Block` saying why channels
cannot be removed through this node. An op without a rule is never guessed at: the dependency builder blocks it.
A rule may also have a ``fix`` step that updates attributes and shape constants once kept indices are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex


@dataclass(frozen=True)
class Dim:
    """Axis ``axis`` (non-negative) of tensor ``tensor``."""

    tensor: str
    axis: int


@dataclass
class Link:
    """Couples element ``a_idx[i]`` of dim ``a`` with element ``b_idx[i]`` of dim ``b`` (None: 0..n-1)."""

    a: Dim
    b: Dim
    a_idx: np.ndarray | None = None
    b_idx: np.ndarray | None = None


@dataclass
class Block:
    """Channels of this dim cannot pass through this node; ``reason`` goes into the report."""

    reason: str


class RuleContext(Protocol):
    index: GraphIndex
    head_dims: bool  # a split channel axis ([H*D] -> [H, D]) is removed by its last axis (D) instead of H

    def tracked(self, dim: Dim) -> bool: ...


Kept = Callable[[Dim], "np.ndarray | None"]
CoupleFn = Callable[[onnx.NodeProto, Dim, RuleContext], "list[Link] | Block"]
FixFn = Callable[[onnx.NodeProto, GraphIndex, Kept, "ConstantEditor"], None]


class ConstantEditor(Protocol):
    """Rewrites a node's constant input (copy-on-write when other nodes share it)."""

    def set_input_value(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None: ...


@dataclass
class OpRule:
    couple: CoupleFn
    fix: FixFn | None = None
    ops: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[tuple[str, str], OpRule] = {}


def register(*op_types: str, domain: str = "") -> Callable[[CoupleFn], CoupleFn]:
    """Register ``couple`` as the channel rule of ``op_types`` in ``domain`` (default: the ONNX domain)."""

    def decorate(fn: CoupleFn) -> CoupleFn:
        for op in op_types:
            _REGISTRY[(domain, op)] = OpRule(couple=fn, ops=op_types)
        return fn

    return decorate


def register_fix(*op_types: str, domain: str = "") -> Callable[[FixFn], FixFn]:
    """Attach a fix step (attribute and shape-constant updates) to already registered ``op_types``."""

    def decorate(fn: FixFn) -> FixFn:
        for op in op_types:
            _REGISTRY[(domain, op)].fix = fn
        return fn

    return decorate


def lookup(node: onnx.NodeProto) -> OpRule | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return _REGISTRY.get((domain, node.op_type))


def registered_ops() -> list[str]:
    return sorted(op for _, op in _REGISTRY)


# -- small helpers shared by the rule files -------------------------------------------------------------------------

def in_dim(node: onnx.NodeProto, index: int, axis: int) -> Dim:
    return Dim(node.input[index], axis)


def out_dim(node: onnx.NodeProto, index: int, axis: int) -> Dim:
    return Dim(node.output[index], axis)


def slot_of(node: onnx.NodeProto, dim: Dim) -> tuple[str, int]:
    """Whether ``dim.tensor`` is an input ("in") or output ("out") of ``node``, and at which position."""
    for i, name in enumerate(node.output):
        if name == dim.tensor:
            return "out", i
    for i, name in enumerate(node.input):
        if name == dim.tensor:
            return "in", i
    raise KeyError(f"{dim.tensor} is not used by {node.name}")


def normalise_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
