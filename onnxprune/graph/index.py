"""The live graph: who produces and consumes each tensor, constant values and shapes, kept true under edits.

Weights may be initializers or ``Constant`` nodes (Paddle, Caffe2 and some TF exporters use the latter); this index
makes the two look alike, so that no rule has to care where a weight lives.

It is built once per run: every change to the graph goes through its edit methods (``set_input``,
``set_constant``, ``set_input_value``, ``add_initializer``, ``remove_initializer``, ``remove_nodes``, ``set_size``,
...), which update the graph proto and the maps together, so no caller rebuilds it or patches its dicts. It stays on
the onnx protobuf instead of onnx-graphsurgeon or onnx-ir: measured with ``tools/bench_graph_libs.py``, both cost
more time and memory per load and save than protobuf, and this tool reads and streams external data lazily through
``graph.io``, which neither would keep.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph.inference import Dims, delete_items, infer_shapes
from onnxprune.graph.io import LoadedModel

HINT_ROUNDS = 16  # onnx re-runs with completed shapes: one per chain of reshapes onnx cannot follow (opset 13)
CACHE_LIMIT_BYTES = 256 * 1024  # larger weights are decoded again when needed: no second copy of a model
SHAPE_PRESERVING = {"GroupNormalization", "InstanceNormalization", "BatchNormalization", "LayerNormalization",
                    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Gelu", "Erf", "Clip",
                    "Identity", "Dropout", "Softmax", "Mish", "Softplus", "PRelu", "Cast"}


@dataclass
class Use:
    """One node slot: ``node.input[index]`` (a consumer) or ``node.output[index]`` (a producer)."""

    node: onnx.NodeProto
    index: int


def __getattr__(name: str):
    """``is_weighted`` and ``WEIGHTED_OPS`` moved to graph/layers.py (the table of weighted-layer kinds); kept
    importable from here, resolved on first use because layers.py imports this module."""
    if name in ("is_weighted", "WEIGHTED_OPS"):
        from onnxprune.graph import layers
        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_node_value(node: onnx.NodeProto, model: LoadedModel) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return model.array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the node's subgraphs (If branches, Loop and Scan bodies) read from the enclosing graph: dependencies
    of the node as real as its inputs."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            names |= _subgraph_outer_names(sub)
    return names


def _subgraph_outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (not defined inside it)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        defined.update(node.output)
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                used |= _subgraph_outer_names(sub)
    return used - defined


class GraphIndex:
    """Producers, consumers, constants and shapes of the main graph of a model, kept true under edits.

    Args:
        model: the loaded model; building the index does not change it, and changes made through the index's edit
            methods keep the index true (changes made around it do not).
        input_shapes: optional static shapes for graph inputs, e.g. ``{"x": [1, 3, 224, 224]}``; dynamic dims
            that are not given stay unknown.
        infer: run shape inference (callers that only need producers and constants skip it).
    """

    def __init__(self, model: LoadedModel, input_shapes: dict[str, list[int]] | None = None,
                 infer: bool = True) -> None:
        self.model = model
        self._input_shapes = input_shapes or {}
        self._infer = infer
        graph = model.proto.graph
        self.graph = graph
        self.opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, Use] = {}
        self.consumers: dict[str, list[Use]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constant_nodes[node.output[0]] = node
            for i, name in enumerate(node.output):
                if name:
                    self.producer[name] = Use(node, i)
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(Use(node, i))
        self.graph_inputs = {i.name for i in graph.input if i.name not in self.initializers}
        self.graph_outputs = {o.name for o in graph.output}
        self.subgraph_users: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in subgraph_reads(node):
                self.subgraph_users.setdefault(name, node)
        self._values: dict[str, np.ndarray] = {}
        self.infer_shapes()

    def infer_shapes(self) -> None:
        """(Re-)infer the shapes of every tensor (skipped when built with ``infer=False``). The constructor runs it;
        after folding, shapes computed from what were run-time constants may become known, so folding runs it too."""
        hints: dict[str, tuple[int, Dims]] = {}
        for _ in range(HINT_ROUNDS):  # shapes completed here go back to onnx, which carries them on to later ops
            inferred = infer_shapes(self.model.proto, self._input_shapes, hints) if self._infer else ({}, {})
            if inferred is None:  # onnx refused the hints: keep the last round
                return
            self.shapes, self.dtypes = inferred
            for name, tensor in self.initializers.items():
                self.shapes[name] = list(tensor.dims)
                self.dtypes[name] = tensor.data_type
            completed = self._complete_shapes()
            if self._infer:
                completed.update(self._resolved_slices())
            new = {name: dims for name, dims in completed.items() if hints.get(name, (0, None))[1] != dims}
            if not new or not self._infer:
                return
            hints.update({name: (self.dtypes.get(name, 0), dims) for name, dims in new.items()})

    def _resolved_slices(self) -> dict[str, Dims]:
        """Slice outputs onnx's inference left partly unknown though their bounds are traceable sizes: onnx does
        not use propagated values for Slice bounds, so ``position_ids[:, :seq]`` (BERT exports) loses the batch and
        sequence dims for the whole model, and with them every MAC count, even at a static ``--input-shape``."""
        found: dict[str, Dims] = {}
        for node in self.graph.node:
            if node.op_type != "Slice" or len(node.input) < 3 or not node.output:
                continue
            shape, source = self.shapes.get(node.output[0]), self.shapes.get(node.input[0])
            if (shape is not None and None not in shape) or source is None:
                continue
            args = [self._static_items(node.input[k]) if len(node.input) > k and node.input[k] else None
                    for k in range(1, 5)]
            starts, ends, axes, steps = args
            if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
                continue
            out = list(source)
            for k, (begin, end) in enumerate(zip(starts, ends)):
                axis = axes[k] if axes is not None else k
                axis = axis + len(out) if axis < 0 else axis
                if not 0 <= axis < len(out) or out[axis] is None:
                    out = None
                    break
                out[axis] = len(range(*slice(begin, end, steps[k] if steps else 1).indices(out[axis])))
            if out is not None and None not in out and (shape is None or len(out) == len(shape)):
                found[node.output[0]] = out
        return found

    def _static_items(self, name: str) -> list[int] | None:
        """A 1-D int tensor's values when every element is a constant or a known size."""
        items = self.shape_items(name)
        if items is None:
            return None
        values = [self.size(*item) if isinstance(item, tuple) else item for item in items]
        return None if None in values else [int(v) for v in values]

    def _complete_shapes(self) -> dict[str, Dims]:
        """Fill in shapes onnx's inference leaves unknown: shape-preserving ops (GroupNormalization has no
        inference function) and Reshape targets built from Shape/Gather/Concat of the input itself (the classic
        ``x.view(x.size(0), -1)`` export, and attention's ``view(b, s, heads, d)`` at opsets whose Unsqueeze onnx
        does not propagate). Returns what it filled in."""
        filled: dict[str, Dims] = {}
        for node in self.graph.node:
            if not node.output or not node.input:
                continue
            known = self.shapes.get(node.output[0])
            if known is not None and None not in known:
                continue
            source = self.shapes.get(node.input[0])
            if source is None:
                continue
            resolved = None
            if node.op_type in SHAPE_PRESERVING and known is None:
                resolved = list(source)
            elif node.op_type == "Reshape":
                resolved = self._reshape_output(node, source)
            if resolved is not None and (known is None or _more_known(resolved, known)):
                self.shapes[node.output[0]] = resolved
                filled[node.output[0]] = resolved
                if not self.dtypes.get(node.output[0]):  # no inference function: no type either
                    to = attr(node, "to") if node.op_type == "Cast" else None
                    self.dtypes[node.output[0]] = to or self.dtypes.get(node.input[0], 0)
        return filled

    def _reshape_output(self, node: onnx.NodeProto, source: Dims) -> Dims | None:
        """Output shape of a Reshape whose target is traceable; dims read from the input itself cancel out, so a
        symbolic batch dim does not stop the -1 from being resolved."""
        items = self.shape_items(node.input[1])
        if items is None:
            return None
        x = node.input[0]
        out: Dims = []
        consumed: set[int] = set()  # input axes reproduced as they are by an output entry
        for pos, item in enumerate(items):
            if isinstance(item, tuple) and item[0] == x:
                consumed.add(item[1])
                out.append(source[item[1]])
            elif isinstance(item, tuple):
                out.append(self.size(*item))
            elif item == 0:
                consumed.add(pos)
                out.append(source[pos] if pos < len(source) else None)
            else:
                out.append(item)
        if out.count(-1) > 1:
            return None
        if -1 in out:
            remaining = [source[a] for a in range(len(source)) if a not in consumed]
            others = [d for i, d in enumerate(out) if d != -1 and not (
                (isinstance(items[i], tuple) and items[i][0] == x) or items[i] == 0)]
            if None in remaining or None in others:
                return None
            out[out.index(-1)] = int(np.prod(remaining, dtype=np.int64)) // max(1, int(np.prod(others, dtype=np.int64)))
        return out

    def shape_items(self, name: str) -> list | None:
        """A 1-D int tensor as a list of ints or (tensor, axis) run-time dims; None when not traceable."""
        value = self.const_value(name) if self.is_constant(name) else None
        if value is not None:
            return [int(v) for v in np.asarray(value).reshape(-1)]
        producer = self.producer.get(name)
        if producer is None:
            return None
        node = producer.node
        if node.op_type == "Concat":
            items: list = []
            for piece in node.input:
                sub = self.shape_items(piece)
                if sub is None:
                    return None
                items += sub
            return items
        if node.op_type in ("Unsqueeze", "Squeeze", "Identity", "Cast"):
            return self.shape_items(node.input[0])
        if node.op_type == "Gather" and self.is_constant(node.input[1]):
            source = self.producer.get(node.input[0])
            if source is None or source.node.op_type != "Shape":
                return None
            start = int(attr(source.node, "start", 0))
            picked = np.asarray(self.const_value(node.input[1])).reshape(-1)
            rank = self.rank(source.node.input[0])
            if rank is None:
                return None
            return [(source.node.input[0], (start + int(i)) % rank) for i in picked]
        return None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output; None for anything computed at run time."""
        if name in self._values:
            return self._values[name]
        value = None
        if name in self.initializers:
            value = self.model.array(self.initializers[name])
        elif name in self.constant_nodes:
            value = _constant_node_value(self.constant_nodes[name], self.model)
        if value is not None and value.nbytes <= CACHE_LIMIT_BYTES:
            self._values[name] = value  # large weights are re-read instead, so memory stays flat on big models
        return value

    def const_tensor(self, name: str) -> onnx.TensorProto | None:
        """The TensorProto holding a constant (initializer or Constant node's ``value``), for in-place edits."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return a.t
        return None

    def shape(self, name: str) -> Dims | None:
        if name in self._values:
            return list(self._values[name].shape)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def size(self, name: str, axis: int) -> int | None:
        shape = self.shape(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]

    def consumers_of(self, name: str) -> list[Use]:
        return self.consumers.get(name, [])

    def forget_value(self, name: str) -> None:
        """Drop a cached constant after it was rewritten (callers that change a tensor through ``set_constant``
        need not)."""
        self._values.pop(name, None)

    # -- edits: every change to the graph goes through these, so that the maps above stay true -------------------

    def fresh_name(self, base: str, numbered: bool = False) -> str:
        """A tensor name nothing in the graph uses: ``base`` itself if free, else ``base1``, ``base2``, ...
        (``numbered``: ``base0``, ``base1``, ...)."""
        numbers = (f"{base}{k}" for k in itertools.count(0 if numbered else 1))
        return next(n for n in itertools.chain([] if numbered else [base], numbers) if not self._taken(n))

    def _taken(self, name: str) -> bool:
        return any(name in names for names in (self.initializers, self.producer, self.consumers, self.graph_inputs,
                                               self.graph_outputs, self.shapes, self.subgraph_users))

    def set_input(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """Make ``node.input[slot]`` read ``name`` ("" leaves an optional input out); missing slots before it are
        added empty, so this also gives a node a new optional input (a bias)."""
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        if old == name:
            return
        if old:
            self._drop_use(old, node, slot)
        node.input[slot] = name
        if name:
            self._add_use(name, Use(node, slot))

    def set_constant(self, name: str, value: np.ndarray) -> None:
        """New values, of any shape, for an initializer or the output of a Constant node; every reader sees them.

        Initializers go through :meth:`LoadedModel.replace` (which streams large ones of an external-data model to
        the output); their declaration as a graph input, which models before IR 4 also have, gets the new shape."""
        tensor = self.const_tensor(name)
        if tensor is None:  # Constant node with value_floats etc.: store as a tensor attribute
            node = self.constant_nodes[name]
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(value, name)))
        else:
            self.model.replace(tensor, value)
        self._values.pop(name, None)
        if name in self.initializers or name in self.shapes:  # a Constant node's shape is known if inferred
            self.shapes[name] = [int(d) for d in np.shape(value)]
        if name not in self.initializers:
            return
        for declared in self.graph.input:
            if declared.name == name and declared.type.tensor_type.HasField("shape"):
                for d, size in zip(declared.type.tensor_type.shape.dim, np.shape(value)):
                    d.Clear()
                    d.dim_value = int(size)

    def set_input_value(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give ``node.input[slot]`` a new constant value: in place when only this node reads that constant, else
        (shared or computed) as a new initializer wired to this slot alone."""
        name = node.input[slot] if slot < len(node.input) else ""
        if name and self.is_constant(name) and len(self.consumers_of(name)) <= 1:
            self.set_constant(name, value)
            return
        new = self.fresh_name(f"{name or f'{node.name or node.op_type}_input{slot}'}_pruned", numbered=True)
        self.set_input(node, slot, self.add_initializer(new, value))

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        """Add ``value`` as initializer ``name`` (free, or only read so far, e.g. the output of a node just removed
        by folding); returns the name. Take a new name from :meth:`fresh_name`."""
        if name in self.initializers or name in self.producer:
            raise ValueError(f"'{name}' is already defined in the graph")
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        tensor = self.graph.initializer[-1]
        self.initializers[name] = tensor
        self.graph_inputs.discard(name)
        self.shapes[name] = list(tensor.dims)
        self.dtypes[name] = tensor.data_type
        return name

    def remove_initializer(self, name: str) -> None:
        """Remove initializer ``name`` from the graph (its readers, if any, are the caller's business)."""
        tensor = self.initializers.pop(name)
        delete_items(self.graph.initializer, [tensor])
        self._forget_tensor(name)
        if any(i.name == name for i in self.graph.input):  # declared as an input too (IR < 4): now a real input
            self.graph_inputs.add(name)

    def drop_unused_initializers(self) -> int:
        """Remove initializers no node reads and no graph output is, with their graph-input declarations (IR < 4);
        returns how many. A graph with subgraphs keeps everything: they may read outer initializers by name."""
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in self.graph.node for a in node.attribute):
            return 0
        unused = [name for name in self.initializers if not self.consumers.get(name) and name not in self.graph_outputs]
        if not unused:
            return 0
        delete_items(self.graph.initializer, [self.initializers.pop(name) for name in unused])
        for name in unused:
            self._forget_tensor(name)
        gone = set(unused)
        delete_items(self.graph.input, [i for i in self.graph.input if i.name in gone])
        return len(unused)

    def remove_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        """Remove ``nodes`` from the graph; what they produced is then defined nowhere until the caller defines it
        (folding adds initializers of the same names)."""
        lost: list[str] = []
        for node in nodes:
            for slot, name in enumerate(node.input):
                if name:
                    self._drop_use(name, node, slot)
            for name in node.output:
                if name and name in self.producer and self.producer[name].node is node:
                    del self.producer[name]
                    self.constant_nodes.pop(name, None)
                    self._forget_tensor(name)
            lost += [n for n, user in self.subgraph_users.items() if user is node]
        for name in lost:
            del self.subgraph_users[name]
        delete_items(self.graph.node, nodes)
        if lost:  # another node's subgraph may read the same outer names
            for node in self.graph.node:
                for name in subgraph_reads(node):
                    self.subgraph_users.setdefault(name, node)

    def set_size(self, name: str, axis: int, size: int) -> None:
        """Record that axis ``axis`` of run-time tensor ``name`` now has ``size`` entries (after channel removal;
        constants get their shapes from :meth:`set_constant`)."""
        shape = self.shapes.get(name)
        if shape is not None and axis < len(shape):
            self.shapes[name] = shape[:axis] + [int(size)] + shape[axis + 1:]

    def drop_value_info(self, names: set[str]) -> None:
        """Drop the graph's recorded shapes (``value_info``) of ``names``: they changed, and onnx re-infers them."""
        stale = [vi for vi in self.graph.value_info if vi.name in names]
        if stale:
            delete_items(self.graph.value_info, stale)

    def _forget_tensor(self, name: str) -> None:
        self._values.pop(name, None)
        self.shapes.pop(name, None)
        self.dtypes.pop(name, None)

    def _add_use(self, name: str, use: Use) -> None:
        """Record a reader of ``name``, in graph order (node, then slot) like the constructor lists them."""
        uses = self.consumers.setdefault(name, [])
        if uses:
            position = {id(n): k for k, n in enumerate(self.graph.node)}
            uses.append(use)
            uses.sort(key=lambda u: (position.get(id(u.node), -1), u.index))
        else:
            uses.append(use)

    def _drop_use(self, name: str, node: onnx.NodeProto, slot: int) -> None:
        uses = [u for u in self.consumers.get(name, []) if not (u.node is node and u.index == slot)]
        if uses:
            self.consumers[name] = uses
        else:
            self.consumers.pop(name, None)


def _more_known(new: Dims, old: Dims) -> bool:
    """``new`` agrees with every known dim of ``old`` and knows more of them."""
    return (len(new) == len(old) and all(o is None or o == n for n, o in zip(new, old))
            and sum(n is not None for n in new) > sum(o is not None for o in old))
