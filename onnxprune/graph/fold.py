"""Fold small constant subgraphs into initializers.

Exporters sometimes compute weights at run time from constants: ``Identity`` of an initializer (tied weights in
PyTorch), ``Cast``/``Transpose``/``Reshape`` of one (TF exporters), shape arithmetic on constants. A rule cannot slice
a tensor that is computed, so such nodes are evaluated once here (with onnx's reference evaluator) and their outputs
become initializers. Nodes reading any run-time value, random ops and nodes with subgraphs are never folded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from onnxprune.graph.index import GraphIndex

NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
              "Constant", "If", "Loop", "Scan", "SequenceConstruct",
              # quantisation is meaning, not arithmetic: folding DequantizeLinear would turn a QDQ model into float
              "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
MAX_ELEMENTS = 1 << 26  # 64M values: folding must never blow memory up


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray], opset: int) -> list[np.ndarray] | None:
    names = [f"in{i}" for i in range(len(inputs))]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(n if real else "" for n, real in zip(names, [v is not None for v in inputs]))
    try:
        evaluator = ReferenceEvaluator(onnx.helper.make_model(
            onnx.helper.make_graph([copy], "fold", [onnx.helper.make_tensor_value_info(n, 1, None) for n, v in
                                                     zip(names, inputs) if v is not None],
                                   [onnx.helper.make_tensor_value_info(o, 1, None) for o in node.output if o]),
            opset_imports=[onnx.helper.make_opsetid("", opset)]))
        feeds = {n: v for n, v in zip(names, inputs) if v is not None}
        return [np.asarray(v) for v in evaluator.run(None, feeds)]
    except Exception:  # the reference evaluator lacks some ops: such a node is simply left in the graph
        return None


def fold_constant_subgraphs(index: GraphIndex) -> int:
    """Replace every node computable from constants alone by initializers; returns how many nodes were folded.

    The graph is edited through ``index``, which stays true; shapes are inferred again, since some may be known
    only now that values computed at run time are constants."""
    values: dict[str, np.ndarray] = {}
    folded: list[onnx.NodeProto] = []
    for node in index.graph.node:
        if node.op_type in NEVER_FOLD or node.domain not in ("", "ai.onnx") or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = []
        for name in node.input:
            if not name:
                inputs.append(None)
            elif name in values:
                inputs.append(values[name])
            elif index.is_constant(name):
                inputs.append(index.const_value(name))
            else:
                break
        else:
            if not any(v is not None for v in inputs):
                continue
            outputs = _evaluate(node, inputs, index.opset)
            if outputs is None or sum(o.size for o in outputs) > MAX_ELEMENTS:
                continue
            values.update(zip(node.output, outputs))
            folded.append(node)
    if not folded:
        return 0
    index.remove_nodes(folded)
    for name, value in values.items():
        if index.consumers_of(name) or name in index.graph_outputs:
            index.add_initializer(name, value)
    index.drop_value_info(set(values))
    index.infer_shapes()
    return len(folded)
