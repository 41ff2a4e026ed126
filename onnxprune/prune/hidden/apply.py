"""Rewrite a model for a basis of its hidden stream: writers map into it, readers out of it, norms over it.

For a [d, k] ``basis`` B (orthonormal columns: the first k principal directions, or k columns of the identity):

* every writer constant W (hidden axis last) becomes ``(W - mean(W)) B`` (``centre``: LayerNorm models, so that the
  stream has zero mean and LayerNorm equals RMSNorm) or ``W B``;
* ``fold`` (pre-LN): each norm becomes an RMSNorm over k channels (``x / sqrt(mean(x^2) + eps d/k) * sqrt(d/k)``,
  which equals the d-channel RMSNorm of the same vector), its scale g and shift b move into the readers
  (``W -> B^T diag(g) W``, bias ``+= b W``);
* without ``fold`` (post-LN): each norm keeps its op, with ``g B`` and ``b B``, and readers get ``B^T W``;
* a graph output on the normalised stream is projected back to d channels (``B^T`` with g and b);
* Shape nodes whose width entry sizes something other than the stream keep reporting the full width (shapes.py);
  constant Reshape targets and Expand shapes on the stream get the new width.

With B = Q square (no slicing) the result computes what the model computes, up to float rounding: the exactness
oracle in tests/test_hidden.py, and the reference the pass gives recovery. Edits write new initializers and rewire
node inputs, so the original constants (which other nodes may share) are never changed; unused ones are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.check import sort_nodes
from onnxprune.graph.index import GraphIndex, subgraph_reads
from onnxprune.prune.hidden.stream import Norm, Reader, Stream


def slice_stream(index: GraphIndex, stream: Stream, basis: np.ndarray, fold: bool, centre: bool) -> set[str]:
    """Rewrite ``index``'s model in place for ``basis`` (see the module docstring); returns the names of the new
    constants. The index is stale afterwards: the caller rebuilds it."""
    edit = _Edit(index)
    width, kept = basis.shape
    for w in stream.writers:
        value = np.moveaxis(edit.value(w.node.input[w.slot]), w.axis, -1)
        if centre:
            value = value - value.mean(axis=-1, keepdims=True)
        edit.set(w.node, w.slot, np.moveaxis(value @ basis, -1, w.axis))
    outputs = [r for r in stream.readers if r.node is None]
    for r in stream.readers:
        if r.node is not None:
            _reader(edit, r, basis, fold)
    for n in stream.norms:
        if fold:
            _to_rms(edit, n, width, kept)
        else:
            for at in (n.scale, n.bias):
                if at is not None:
                    shape = edit.index.const_value(at[0].input[at[1]]).shape
                    edit.set(*at, (edit.value(at[0].input[at[1]]).reshape(-1) @ basis).reshape(*shape[:-1], kept))
    for r in outputs:
        _project_back(edit, r, basis, fold)
    for shape in stream.shapes:
        _full_width(edit, shape, width, stream.axes[shape.input[0]])
    for sized in stream.sized:  # a constant shape vector that spells the width
        target = edit.index.const_value(sized.node.input[sized.slot]).copy()
        target.reshape(-1)[sized.position] = kept
        edit.set(sized.node, sized.slot, target)
    stale = set(stream.tensors)
    graph = index.graph
    for k in reversed([k for k, vi in enumerate(graph.value_info) if vi.name in stale]):
        del graph.value_info[k]
    sort_nodes(graph)
    edit.drop_unused()
    return edit.created


def _reader(edit: "_Edit", r: Reader, basis: np.ndarray, fold: bool) -> None:
    weight = np.moveaxis(edit.value(r.node.input[r.slot]), r.axis, 0)  # [d, outputs]
    shift = None
    if fold:
        beta = r.norm.beta(edit.index)
        if beta is not None:
            shift = beta @ weight * r.shift_scale
        weight = r.norm.gamma(edit.index, len(weight))[:, None] * weight
    edit.set(r.node, r.slot, np.moveaxis(basis.T @ weight, 0, r.axis))
    if shift is None or not np.any(shift):
        return
    if r.bias is not None:
        node, slot = r.bias
        if slot < len(node.input) and node.input[slot]:
            current = edit.value(node.input[slot])
            edit.set(node, slot, current + shift.reshape(current.shape) if current.size == shift.size
                     else current + shift)
        else:
            while len(node.input) <= slot:
                node.input.append("")
            edit.set(node, slot, shift)
        return
    out = r.node.output[0]
    raw = edit.fresh(f"{out}_unbiased")
    r.node.output[0] = raw
    edit.node("Add", [raw, edit.constant(shift, f"{out}_bias")], [out])


def _to_rms(edit: "_Edit", n: Norm, width: int, kept: int) -> None:
    """Replace the norm by an RMSNorm over ``kept`` channels equal to the ``width``-channel one (decomposed, the
    pattern onnxruntime fuses into SimplifiedLayerNormalization); its scale and shift were folded into readers."""
    x, y, base = n.x, n.y, n.nodes[0].name or n.y
    square = edit.node("Pow", [x, edit.constant(np.array(2.0), f"{base}_two")], [edit.fresh(f"{base}_square")])
    mean_out = edit.fresh(f"{base}_mean_square")
    if edit.index.opset >= 18:
        edit.node("ReduceMean", [square, edit.constant(np.array([-1], np.int64), f"{base}_axes")], [mean_out])
    else:
        edit.node("ReduceMean", [square], [mean_out], axes=[-1])
    eps = edit.constant(np.array(n.epsilon * width / kept), f"{base}_epsilon")
    shifted = edit.node("Add", [mean_out, eps], [edit.fresh(f"{base}_mean_square_eps")])
    root = edit.node("Sqrt", [shifted], [edit.fresh(f"{base}_rms")])
    normed = edit.node("Div", [x, root], [edit.fresh(f"{base}_normalised")])
    edit.node("Mul", [normed, edit.constant(np.full(kept, np.sqrt(width / kept)), f"{base}_scale")], [y])
    for node in n.nodes:
        edit.remove(node)


def _project_back(edit: "_Edit", r: Reader, basis: np.ndarray, fold: bool) -> None:
    """A graph output on the normalised stream keeps its width: a MatMul by B^T (with the norm's g and b when they
    were folded away) brings it back to the original basis."""
    t = r.tensor
    narrow = edit.fresh(f"{t}_hidden")
    for node in edit.index.graph.node:
        for k, name in enumerate(node.output):
            if name == t:
                node.output[k] = narrow
        for k, name in enumerate(node.input):
            if name == t:
                node.input[k] = narrow
    projection = basis.T
    beta = r.norm.beta(edit.index) if fold else None
    if fold:
        projection = projection * r.norm.gamma(edit.index, len(basis))[None, :]
    if beta is not None:
        projected = edit.node("MatMul", [narrow, edit.constant(projection, f"{t}_projection")],
                              [edit.fresh(f"{t}_projected")])
        edit.node("Add", [projected, edit.constant(beta, f"{t}_shift")], [t])
    else:
        edit.node("MatMul", [narrow, edit.constant(projection, f"{t}_projection")], [t])


def _full_width(edit: "_Edit", shape: onnx.NodeProto, width: int, axis: int) -> None:
    """``Shape(x)`` of a sliced tensor -> its shape with the hidden ``axis`` (negative) the original width."""
    out = shape.output[0]
    raw = edit.fresh(f"{out}_sliced")
    shape.output[0] = raw
    zero = edit.constant(np.array([0], np.int64), f"{out}_start")
    before = edit.constant(np.array([axis], np.int64), f"{out}_end")
    parts = [edit.node("Slice", [raw, zero, before], [edit.fresh(f"{out}_head")]),
             edit.constant(np.array([width], np.int64), f"{out}_width")]
    if axis < -1:
        after = edit.constant(np.array([axis + 1], np.int64), f"{out}_rest")
        end = edit.constant(np.array([np.iinfo(np.int64).max], np.int64), f"{out}_stop")
        parts.append(edit.node("Slice", [raw, after, end], [edit.fresh(f"{out}_tail")]))
    edit.node("Concat", parts, [out], axis=0)


class _Edit:
    """New constants and nodes with names nothing in the graph uses; float values are stored as float32."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        graph = index.graph
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | \
            {v.name for v in graph.output} | {v.name for v in graph.value_info} | \
            {n for node in graph.node for n in [*node.input, *node.output]}
        self.created: set[str] = set()

    def value(self, name: str) -> np.ndarray:
        return self.index.const_value(name).astype(np.float64)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def constant(self, value: np.ndarray, base: str) -> str:
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        name = self.fresh(base)
        self.index.graph.initializer.append(numpy_helper.from_array(value, name))
        self.created.add(name)
        return name

    def set(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        node.input[slot] = self.constant(value, f"{node.input[slot] or node.name}_hidden")

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> str:
        self.index.graph.node.append(onnx.helper.make_node(op, inputs, outputs, name=self.fresh(f"hidden/{op}"),
                                                           **attrs))
        return outputs[0]

    def remove(self, node: onnx.NodeProto) -> None:
        nodes = self.index.graph.node
        for k in reversed([k for k, n in enumerate(nodes) if n is node]):
            del nodes[k]

    def drop_unused(self) -> None:
        """Initializers (and Constant nodes) nothing reads any more: the weights the rewrite replaced."""
        graph = self.index.graph
        read = {n for node in graph.node for n in [*node.input, *subgraph_reads(node)]} | \
            {o.name for o in graph.output}
        for k in reversed([k for k, t in enumerate(graph.initializer) if t.name not in read]):
            name = graph.initializer[k].name
            del graph.initializer[k]
            for j in reversed([j for j, v in enumerate(graph.input) if v.name == name]):
                del graph.input[j]
        for k in reversed([k for k, n in enumerate(graph.node)
                           if n.op_type == "Constant" and n.output[0] not in read]):
            del graph.node[k]
