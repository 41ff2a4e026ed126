"""An independent check of structured removal, from the files alone.

The tool's own oracle (``--verify``) masks the original with the tool's groups and plan, so a wrong grouping would
fool both. This check reads only the original and the pruned output: it matches every weight of the output to the
original by name, finds which original indices each shrunk axis kept by comparing values, zeroes the dropped
entries in the original, and requires the same outputs in onnxruntime. It imports nothing from the tool's channel
analysis (``onnxprune.channels.groups``, ``onnxprune.channels``, ``onnxprune.prune.verify``).

Why zeroing is exact: a dropped channel's producer rows and bias are zero, so it carries zero (or, after an
activation such as HardSigmoid, a value that only ever meets another zeroed channel), and every consumer's columns
for it are zero, so whatever it carries adds nothing. BatchNormalization is masked through its scale and bias (the
channel becomes 0 * normalised + 0 = 0); its mean and variance stay as they are, since a variance of 0 would make
the result depend on epsilon.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxprune.pipeline import PruneOptions, prune_file

from conftest import ZOO

RATIOS = (0.3, 0.6)
TOLERANCE = 1e-4
# (op, input index) of the constants whose dropped entries are zeroed; BN mean/var (3, 4) keep their values
ZEROED = {("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gemm", 0), ("Gemm", 1),
          ("Gemm", 2), ("MatMul", 0), ("MatMul", 1), ("Add", 0), ("Add", 1), ("Mul", 0), ("Mul", 1),
          ("BatchNormalization", 1), ("BatchNormalization", 2)}
KEPT_AS_IS = {("BatchNormalization", 3), ("BatchNormalization", 4)}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float initializers and Constant-node values by name."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found.update({node.output[0]: numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"})
    return {name: value for name, value in found.items() if value.dtype.kind == "f"}


def set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value, name))
            return
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    attribute = next(a for a in node.attribute if a.name == "value")
    attribute.t.CopyFrom(numpy_helper.from_array(value, name))


def kept_indices(name: str, original: np.ndarray, pruned: np.ndarray) -> dict[int, np.ndarray]:
    """Per shrunk axis, the original indices the pruned tensor kept, found by value.

    A *cell* is the sub-array over the axes that kept their size (a whole slice when one axis shrank, a kernel when
    a conv weight lost rows and columns, a scalar for a Gemm weight that lost both). Each pruned cell is looked up
    among the original cells by its exact bytes; cells whose bytes occur more than once in the original say nothing
    and are skipped. Every pruned index must then be explained by exactly one original index, the indices must
    increase strictly, and slicing the original by them must give the pruned tensor bit for bit.
    """
    assert original.ndim == pruned.ndim, f"{name}: rank changed"
    shrunk = [a for a in range(original.ndim) if pruned.shape[a] != original.shape[a]]
    assert all(pruned.shape[a] < original.shape[a] for a in shrunk), f"{name}: grew {original.shape}->{pruned.shape}"
    if not shrunk:
        return {}
    rest = [a for a in range(original.ndim) if a not in shrunk]

    def cells(x: np.ndarray) -> tuple[list[bytes], tuple[int, ...]]:
        grid = tuple(x.shape[a] for a in shrunk)
        moved = np.ascontiguousarray(np.transpose(x, shrunk + rest)).reshape(int(np.prod(grid)), -1)
        return [row.tobytes() for row in moved], grid

    original_cells, original_grid = cells(original)
    where: dict[bytes, list[int]] = {}
    for flat, key in enumerate(original_cells):
        where.setdefault(key, []).append(flat)
    pruned_cells, pruned_grid = cells(pruned)
    seen: list[list[set[int]]] = [[set() for _ in range(pruned.shape[a])] for a in shrunk]
    for flat, key in enumerate(pruned_cells):
        hits = where.get(key)
        assert hits, f"{name}: pruned cell {np.unravel_index(flat, pruned_grid)} is not in the original"
        if len(hits) == 1:
            at, came_from = np.unravel_index(flat, pruned_grid), np.unravel_index(hits[0], original_grid)
            for k in range(len(shrunk)):
                seen[k][at[k]].add(int(came_from[k]))
    kept = {}
    for k, axis in enumerate(shrunk):
        sources = seen[k]
        assert all(len(s) == 1 for s in sources), f"{name} axis {axis}: not one original index per kept index"
        idx = np.array([next(iter(s)) for s in sources])
        assert np.all(np.diff(idx) > 0), f"{name} axis {axis}: kept indices are not strictly increasing: {idx}"
        kept[axis] = idx
    assert np.array_equal(original[np.ix_(*[kept.get(a, np.arange(n)) for a, n in enumerate(original.shape)])]
                          .view(np.uint8), pruned.view(np.uint8)), f"{name}: not a slice of the original"
    return kept


def masked_original(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The original with every dropped entry of every shrunk weight zeroed (see the module docstring); returns it
    and how many tensors shrank."""
    before, after = constants(original), constants(pruned)
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in original.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, i))
    masked = onnx.ModelProto()
    masked.CopyFrom(original)
    shrunk = 0
    for name, value in after.items():
        assert name in before, f"output weight {name} has no original of that name"
        kept = kept_indices(name, before[name], value)
        if not kept:
            continue
        shrunk += 1
        unknown = uses.get(name, set()) - ZEROED - KEPT_AS_IS
        assert not unknown, f"{name} is read by {unknown}: this check does not know how to mask that"
        if uses[name] & KEPT_AS_IS:
            continue
        zeroed = before[name].copy()
        for axis, idx in kept.items():
            dropped = np.setdiff1d(np.arange(zeroed.shape[axis]), idx)
            index = [slice(None)] * zeroed.ndim
            index[axis] = dropped
            zeroed[tuple(index)] = 0
        set_constant(masked, name, zeroed)
    return masked, shrunk


def random_inputs(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    """Normal random values; the symbolic batch dim is ``batch`` (every zoo input is static otherwise)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check(original: onnx.ModelProto, pruned: onnx.ModelProto) -> int:
    """Assert the pruned model equals the masked original on random inputs; returns how many tensors shrank."""
    masked, shrunk = masked_original(original, pruned)
    feeds = random_inputs(original)
    for expected, actual in zip(outputs(masked, feeds), outputs(pruned, feeds), strict=True):
        assert expected.shape == actual.shape
        difference = np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max()))
        assert difference <= TOLERANCE, f"pruned differs from the masked original by {difference:.3g}"
    return shrunk


def prune(model_copy, tmp_path, name: str, ratio: float) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Prune a copy of zoo model ``name`` to a file with the tool; both models come back with their data loaded."""
    path = model_copy(name)
    out = tmp_path / "out" / name
    out.parent.mkdir()
    prune_file(path, out, PruneOptions(channels=ratio, round_to=1))
    return onnx.load(str(path)), onnx.load(str(out))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", ZOO)
def test_output_equals_the_masked_original(model_copy, tmp_path, name, ratio):
    original, pruned = prune(model_copy, tmp_path, name, ratio)
    assert check(original, pruned) > 0, f"{name}: nothing was pruned"


def test_the_check_catches_a_consumer_that_reads_other_channels(model_copy, tmp_path):
    """Guard against a check that cannot fail: give one conv that lost input channels the original's *first*
    columns instead of the kept ones (still a slice of the original, so only the outputs can tell)."""
    original, pruned = prune(model_copy, tmp_path, "resnet_bn.onnx", 0.3)
    check(original, pruned)
    before, after = constants(original), constants(pruned)
    name = next(n for n, v in after.items() if v.ndim == 4 and v.shape[1] < before[n].shape[1]
                and not np.array_equal(kept_indices(n, before[n], v)[1], np.arange(v.shape[1])))
    rows = kept_indices(name, before[name], after[name]).get(0, np.arange(after[name].shape[0]))
    set_constant(pruned, name, before[name][rows][:, : after[name].shape[1]])
    with pytest.raises(AssertionError, match="differs from the masked original"):
        check(original, pruned)
