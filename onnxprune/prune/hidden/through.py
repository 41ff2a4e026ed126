"""How the hidden axis passes through ops that move data only along the other axes: a class token concatenated to
the patch embeddings (Concat on the sequence axis, its token made by Expand or Tile), Unsqueeze/Squeeze, Slice and
Gather of tokens, Transpose, Reshape of the other axes, ReduceMean over the sequence.

Such an op commutes with a rotation or slicing applied on the hidden axis (it copies, selects or averages whole
hidden vectors), so the stream runs through it: on the writer side each data input is a writer in turn, on the reader
side its output is read in turn. Axes are negative (counted from the end): a tensor of unknown rank can still have
its hidden axis last (-1), and broadcasting, which aligns trailing axes, keeps the number. ``into`` maps the output's
hidden axis to the data inputs' (the writer side, walked backwards), ``out_of`` a data input's to the output's (the
reader side). Both return a Passage or the reason the op does not pass the stream through. A constant shape vector
that spells the width (a Reshape target, an Expand shape) comes back as ``sized``, to be set to the new width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph.index import GraphIndex, attr, node_label

OPS = ("Concat", "Expand", "Tile", "Unsqueeze", "Squeeze", "Slice", "Gather", "Transpose", "Reshape", "ReduceMean")


@dataclass
class Sized:
    """Entry ``position`` of the constant vector ``node.input[slot]`` is the hidden width."""

    node: onnx.NodeProto
    slot: int
    position: int


@dataclass
class Passage:
    slots: list[int]  # the op's inputs that carry the stream
    axis: int  # the hidden axis on the other side of the op (negative)
    sized: Sized | None = None


Dims = Callable[[str], "list | None"]


class Through:
    """Maps the hidden axis across one op of ``index``; ``dims`` gives a tensor's shape (inferred or stood in)."""

    def __init__(self, index: GraphIndex, width: int, dims: Dims) -> None:
        self.index, self.width, self.dims = index, width, dims

    def rank(self, t: str) -> int | None:
        if self.index.is_constant(t):
            return self.index.const_value(t).ndim
        shape = self.dims(t)
        return None if shape is None else len(shape)

    def const(self, name: str) -> np.ndarray | None:
        if not name or not self.index.is_constant(name):
            return None
        return np.asarray(self.index.const_value(name)).reshape(-1).astype(np.int64)

    def into(self, op: onnx.NodeProto, axis: int) -> Passage | str:
        """The hidden axis of ``op``'s data inputs, given its output's."""
        return self._map(op, axis, backward=True)

    def out_of(self, op: onnx.NodeProto, slot: int, axis: int) -> Passage | str:
        """The hidden axis of ``op``'s output, given its input ``slot``'s."""
        if op.op_type == "Concat":
            return f"{node_label(op)} joins the normalised stream with other tensors"
        if slot != 0:
            return f"{node_label(op)} takes the stream as input {slot}, not as its data"
        return self._map(op, axis, backward=False)

    def _map(self, op: onnx.NodeProto, axis: int, backward: bool) -> Passage | str:
        label = node_label(op)
        found = getattr(self, "_" + op.op_type.lower())(op, axis, backward) if op.op_type in OPS else None
        if found is None:
            return f"{label} does not keep the hidden axis whole (or its shapes or constants are unknown)"
        return found if isinstance(found, Passage) else f"{label} {found}"

    # -- one method per op: (op, axis on the known side, backward) -> Passage, a reason fragment, or None ----------

    def _concat(self, op, axis, backward):
        joined = int(attr(op, "axis", 0))
        rank = self.rank(op.output[0])
        if joined >= 0:
            if rank is None:
                return None
            joined -= rank
        if joined == axis:
            return "concatenates along the hidden axis"
        return Passage(list(range(len(op.input))), axis)

    def _expand(self, op, axis, backward):
        shape, rank_in = self.const(op.input[1]), self.rank(op.input[0])
        if rank_in is None or -axis > rank_in:
            return "broadcasts the stream to a new hidden axis" if rank_in is not None else None
        sized = None
        if shape is not None and -axis <= len(shape):
            entry = int(shape[axis])
            if entry == self.width:
                sized = Sized(op, 1, len(shape) + axis)
            elif entry != 1:
                return "expands the hidden axis"
        return Passage([0], axis, sized)

    def _tile(self, op, axis, backward):
        repeats = self.entries(op.input[1])
        if repeats is None or -axis > len(repeats) or repeats[axis] != 1:
            return "repeats along the hidden axis (or by repeats it cannot read)"
        return Passage([0], axis)

    def _listed_axes(self, op: onnx.NodeProto, slot: int) -> list[int] | None:
        if len(op.input) > slot and op.input[slot]:
            values = self.const(op.input[slot])
            return None if values is None else [int(a) for a in values]
        found = attr(op, "axes", None)
        return None if found is None else [int(a) for a in found]

    def _unsqueeze(self, op, axis, backward):
        return self._squeezing(op, axis, backward, inserts=True)

    def _squeeze(self, op, axis, backward):
        return self._squeezing(op, axis, backward, inserts=False)

    def _squeezing(self, op, axis, backward, inserts: bool):
        """Unsqueeze inserts ``axes`` (numbered in the output), Squeeze removes them (numbered in the input)."""
        axes, rank_in = self._listed_axes(op, 1), self.rank(op.input[0])
        if axes is None or rank_in is None:
            return None
        wide = rank_in + len(axes) if inserts else rank_in
        marked = {a % wide for a in axes}
        others = [p for p in range(wide) if p not in marked]  # the positions of the narrow tensor's axes
        narrow = len(others)
        wide_side = backward == inserts  # whether the known axis is numbered in the wide tensor
        if wide_side:
            position = wide + axis
            if position in marked:
                return "has the hidden axis among its axes"
            return Passage([0], others.index(position) - narrow)
        return Passage([0], others[narrow + axis] - wide)

    def _slice(self, op, axis, backward):
        rank = self.rank(op.input[0])
        axes = self._listed_axes(op, 3) if len(op.input) > 3 and op.input[3] else None
        if axes is None:
            if len(op.input) > 3 and op.input[3]:
                return None
            starts = self.const(op.input[1])
            axes = None if starts is None else list(range(len(starts)))
        if axes is None or (rank is None and any(a >= 0 for a in axes)):
            return None
        if any((a - rank if a >= 0 else a) == axis for a in axes):
            return "slices the hidden axis"
        return Passage([0], axis)

    def _gather(self, op, axis, backward):
        rank_data, rank_idx = self.rank(op.input[0]), self.rank(op.input[1])
        if rank_data is None or rank_idx is None:
            return None
        picked = int(attr(op, "axis", 0)) % rank_data
        rank_out = rank_data + rank_idx - 1
        if backward:
            position = rank_out + axis
            if picked <= position < picked + rank_idx:
                return "has the hidden axis among its index axes"
            return Passage([0], (position if position < picked else position - rank_idx + 1) - rank_data)
        position = rank_data + axis
        if position == picked:
            return "gathers along the hidden axis"
        return Passage([0], (position if position < picked else position + rank_idx - 1) - rank_out)

    def _transpose(self, op, axis, backward):
        rank = self.rank(op.input[0])
        perm = attr(op, "perm", None)
        if perm is None:
            if rank is None:
                return None
            perm = list(range(rank))[::-1]
        perm = [int(p) for p in perm]
        rank = len(perm)
        if backward:
            return Passage([0], perm[rank + axis] - rank)
        return Passage([0], perm.index(rank + axis) - rank)

    def _reducemean(self, op, axis, backward):
        rank_in = self.rank(op.input[0])
        axes = self._listed_axes(op, 1)
        if axes is None or rank_in is None:
            return None  # over every axis, or unknown
        reduced = sorted(a % rank_in for a in axes)
        if int(attr(op, "keepdims", 1)):
            return "averages over the hidden axis" if rank_in + axis in reduced else Passage([0], axis)
        kept = [p for p in range(rank_in) if p not in reduced]
        if backward:
            return Passage([0], kept[len(kept) + axis] - rank_in)
        if rank_in + axis in reduced:
            return "averages over the hidden axis"
        return Passage([0], kept.index(rank_in + axis) - len(kept))

    def _reshape(self, op, axis, backward):
        """The hidden axis stays whole when it keeps its width and the axes after it hold as many elements on both
        sides (then those before it do too): merging or splitting only the other axes. Without static shapes, a
        target whose entries up to the hidden axis copy the input's (0, or the input's own Shape entries, as torch
        writes ``x.flatten(2)``) keeps it in place."""
        source, target = self.dims(op.input[0]), self.dims(op.output[0])
        found = None if source is None or target is None else self._reshape_static(source, target, axis, backward)
        if found is None:
            found = self._reshape_copied(op, source, target, axis, backward)
        if found is None:
            return None
        p_in, p_out, rank_other = found
        passage = Passage([0], (p_in if backward else p_out) - rank_other)
        entries = self.const(op.input[1])
        if entries is not None:
            entry = int(entries[p_out])
            if entry == self.width:
                passage.sized = Sized(op, 1, p_out)
            elif not (entry == -1 or (entry == 0 and p_in == p_out and not attr(op, "allowzero", 0))):
                return None
        return passage

    def _reshape_static(self, source: list, target: list, axis: int, backward: bool):
        known, other = (target, source) if backward else (source, target)
        position = len(known) + axis
        after = _product(known[position + 1:])
        if known[position] != self.width or after is None:
            return None
        match = next((p for p in range(len(other)) if other[p] == self.width and _product(other[p + 1:]) == after),
                     None)
        if match is None:
            return None
        return ((match, position) if backward else (position, match)) + (len(other),)

    def _reshape_copied(self, op: onnx.NodeProto, source: list | None, target: list | None, axis: int,
                        backward: bool):
        items = self.entries(op.input[1])
        if items is None:
            return None
        rank_known = len(items) if backward else (None if source is None else len(source))
        if rank_known is None:
            return None
        position = rank_known + axis
        if position >= len(items) or (source is not None and position >= len(source)):
            return None
        copied = all(item == 0 or item == (op.input[0], q) for q, item in enumerate(items[:position + 1]))
        if not copied or attr(op, "allowzero", 0) or (source is not None and source[position] not in (None, self.width)):
            return None
        if backward:
            return (position, position, len(source)) if source is not None else None
        return position, position, len(items)

    def entries(self, name: str) -> list | None:
        """A shape vector's entries as ints or (tensor, axis) run-time dims, as GraphIndex.shape_items, which this
        extends by a Slice of a Shape with constant bounds (torch's ``x.shape[:2]``) inside a Concat."""
        producer = self.index.producer.get(name)
        node = None if producer is None else producer.node
        if node is not None and node.op_type == "Concat":
            parts = [self.entries(piece) for piece in node.input]
            return None if any(p is None for p in parts) else [e for p in parts for e in p]
        if node is not None and node.op_type == "Slice" and len(node.input) in (3, 4):
            source = self.index.producer.get(node.input[0])
            bounds = [self.const(n) for n in node.input[1:]]
            rank = None if source is None or source.node.op_type != "Shape" else self.rank(source.node.input[0])
            if rank is None or any(b is None for b in bounds) or attr(source.node, "start", None) is not None \
                    or (len(bounds) == 3 and list(bounds[2]) != [0]):
                return None
            return [(source.node.input[0], q) for q in range(rank)[int(bounds[0][0]):int(bounds[1][0])]]
        return self.index.shape_items(name)


def _product(dims: list) -> int | None:
    if any(d is None or not isinstance(d, (int, np.integer)) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))
