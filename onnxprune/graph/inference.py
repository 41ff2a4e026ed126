"""Static shape inference for the live graph (``graph/index.py``): onnx's inference on a weight-free copy, with
shapes onnx cannot know supplied from outside: hints the index resolved itself (Slices and Reshapes of run-time
sizes) and the output shapes of onnxruntime's contrib ops, registered by the modules that understand them."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

Dims = list  # list[int | None]: None is an unknown (symbolic) size
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
Shaped = list  # list[int | str | None]: static size, symbolic name, or unknown
OutputShapes = Callable[[onnx.NodeProto, Callable[[str], "Shaped | None"]], "list[Shaped | None] | None"]
_OUTPUT_SHAPES: dict[tuple[str, str], OutputShapes] = {}


def register_output_shapes(op: str, domain: str) -> Callable[[OutputShapes], OutputShapes]:
    """Register the output shapes of an op onnx's inference does not know (onnxruntime's contrib ops): given the
    node and the shapes of its inputs, the shape of each output (None: unknown; its dtype is that of the first float
    input). Without them every tensor after such an op would have no shape, and no rule could couple channels
    there."""

    def decorate(fn: OutputShapes) -> OutputShapes:
        _OUTPUT_SHAPES[(domain, op)] = fn
        return fn

    return decorate



def delete_items(container, items: list) -> None:
    """Delete ``items`` (by identity) from a repeated proto field. Deleting by position keeps every other element the
    same Python object, which the maps hold; rebuilding the field (``del field[:]`` then ``extend``) would copy them
    and leave the maps pointing at detached copies."""
    doomed = {id(x) for x in items}
    for k in reversed([k for k, x in enumerate(container) if id(x) in doomed]):
        del container[k]


def infer_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]],
                  hints: dict[str, tuple[int, Dims]] | None = None) -> tuple[dict, dict] | None:
    """Static shape inference on a weight-free copy, so large models cost neither time nor memory; ``hints`` are
    (element type, shape) known better than onnx infers them, given to it as ``value_info`` (it keeps the more
    specific one); None when onnx fails with them."""
    light = without_weights(proto)
    if hints:
        delete_items(light.graph.value_info, [vi for vi in light.graph.value_info if vi.name in hints])
        for name, (elem, dims) in hints.items():
            light.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims))
    for inp in light.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, input_shapes[inp.name]):
                d.Clear()
                d.dim_value = int(value)
    imported = {o.domain for o in light.opset_import}
    for domain in sorted({n.domain for n in light.graph.node} - imported - {"", "ai.onnx"}):
        light.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # onnxruntime's optimizer omits it
    rounds = 1 + sum(1 for n in light.graph.node if (n.domain, n.op_type) in _OUTPUT_SHAPES)
    for _ in range(rounds):  # onnx's inference runs again after each layer of ops it has no schema for
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception:  # inference is best effort: unknown shapes only make rules more conservative
            if hints:
                return None
            inferred = light
        shaped, dtypes = _read_types(inferred.graph)
        if not _add_registered_shapes(light, shaped, dtypes):
            break
    shapes = {name: [d if isinstance(d, int) else None for d in dims] for name, dims in shaped.items()}
    return shapes, dtypes


def _read_types(g: onnx.GraphProto) -> tuple[dict[str, Shaped], dict[str, int]]:
    shapes: dict[str, Shaped] = {}
    dtypes: dict[str, int] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type:
            dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return shapes, dtypes


def _add_registered_shapes(light: onnx.ModelProto, shapes: dict[str, Shaped], dtypes: dict[str, int]) -> bool:
    """Record (as value_info of ``light``) the outputs of ops with registered shapes whose inputs are now known;
    True when anything was added, so that onnx's inference runs again from there."""
    added = False
    for node in light.graph.node:
        fn = _OUTPUT_SHAPES.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
        if fn is None or all(not o or o in shapes for o in node.output):
            continue
        outs = fn(node, shapes.get)
        dtype = next((dtypes[i] for i in node.input if dtypes.get(i) in _FLOATS), onnx.TensorProto.FLOAT)
        for name, dims in zip(node.output, outs or []):
            if not name or name in shapes or dims is None:
                continue
            light.graph.value_info.append(onnx.helper.make_tensor_value_info(name, dtype, list(dims)))
            shapes[name] = list(dims)
            added = True
    return added


def without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer over 64 values replaced by a typed graph input of the same shape (shape
    inference needs only the small ones, which hold shape constants)."""
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, field, getattr(proto, field))
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    graph, src = out.graph, proto.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph.sparse_initializer.extend(src.sparse_initializer)
    return out

