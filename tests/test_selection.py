"""Which channels go: ``--scope global`` against ``--scope layer``, ``--max-group-ratio`` and ``--exclude``.

A three-conv chain with hand-set weight norms makes the choice predictable. x -> conv1 -> Relu -> conv2 -> Relu -> conv3:
group A is conv1's 8 outputs (w1 rows, w2 columns), group B is conv2's 8 outputs (w2 rows, w3 columns); conv3's
outputs are the graph output and stay. Every entry of w2 is +-1, so w2's rows and columns all have the same l1 norm.
A channel's l1 score is the mean over its members of (its l1 / the member's mean l1), so

    A: w1 row norms a = 0.10 0.12 0.14 0.16 1.84 1.86 1.88 1.90 (mean 1)  -> scores (a + 1) / 2 = 0.55 .. 0.58, 1.42 ..
    B: w3 column norms b = 1.0 0.8 1.2 0.9 1.1 0.7 1.3 1.0 (mean 1)       -> scores (1 + b) / 2 = 1.0 0.9 1.1 0.95 ..

Layer scope at 0.3 keeps round(8 x 0.7) = 6 of each group: A drops 0, 1 and B drops 5, 1 (its two lowest).
Global scope ranks the 16 channels by score / group mean (both means are 1) and removes round(0.3 x 16) = 5,
lowest first, no group losing more than the cap: the default cap min(0.9, 2 x 0.3) = 0.6 lets a group lose
8 - ceil(8 x 0.4) = 4, so A loses its four small channels 0-3 and B its lowest, 5. With --max-group-ratio 0.4 a group
may lose 8 - ceil(8 x 0.6) = 3: A loses 0-2 and B the next two lowest of the pool, 5 and 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import MODELS
from cli_support import run_main

A_NORMS = np.array([0.10, 0.12, 0.14, 0.16, 1.84, 1.86, 1.88, 1.90])
B_NORMS = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 0.7, 1.3, 1.0])


def chain_weights() -> dict[str, np.ndarray]:
    """Random signs; w1 rows and w3 columns split their norm in random positive shares, so each is distinct."""
    rng = np.random.default_rng(0)
    signs = np.where(rng.random((8, 4)) < 0.5, -1.0, 1.0), np.where(rng.random((8, 8)) < 0.5, -1.0, 1.0)
    w1 = signs[0] * rng.dirichlet(np.ones(4), 8) * A_NORMS[:, None]  # row l1 = A_NORMS
    w2 = signs[1]  # every row and column has l1 8
    w3 = np.where(rng.random((2, 8)) < 0.5, -1.0, 1.0) * rng.dirichlet(np.ones(2), 8).T * B_NORMS  # column l1 = B
    return {name: w.reshape(*w.shape, 1, 1).astype(np.float32) for name, w in (("w1", w1), ("w2", w2), ("w3", w3))}


def chain_model(path: Path) -> dict[str, np.ndarray]:
    """Write the chain to ``path``; returns its weights."""
    weights = chain_weights()
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["ra", "w2"], ["b"], name="conv2"), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Conv", ["rb", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["batch", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2, 6, 6])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return weights


def scores_by_hand(weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """l1 score of every channel of A and B, straight from the formula in the module docstring."""

    def normalised_l1(name: str, axis: int) -> np.ndarray:
        w = weights[name]
        l1 = np.abs(w).sum(axis=tuple(a for a in range(w.ndim) if a != axis))
        return l1 / l1.mean()

    a = (normalised_l1("w1", 0) + normalised_l1("w2", 1)) / 2
    b = (normalised_l1("w2", 0) + normalised_l1("w3", 1)) / 2
    return a, b


def test_the_chain_has_the_scores_the_docstring_says():
    a, b = scores_by_hand(chain_weights())
    np.testing.assert_allclose(a, (A_NORMS + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(b, (1 + B_NORMS) / 2, rtol=1e-6)


def prune_chain(tmp_path: Path, capsys, *options: str) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Prune the chain through the CLI; returns the report's groups by name and the output's weights."""
    weights = chain_model(tmp_path / "chain.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, err = run_main([tmp_path / "chain.onnx", "-o", out, "--round-to", "1", "--json", report, *options],
                            capsys)
    assert code == 0, err
    groups = {g["name"]: g for g in json.loads(report.read_text())["groups"]}
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert set(pruned) == set(weights)
    return groups, pruned


def dropped(original: np.ndarray, pruned: np.ndarray, axis: int) -> list[int]:
    """Indices along ``axis`` of ``original`` that the pruned weight no longer has, by value (its other axis is
    never pruned: w1's inputs are the graph input's, w3's outputs the graph output's)."""
    rows, kept = np.moveaxis(original, axis, 0), np.moveaxis(pruned, axis, 0)
    found = [next(i for i, row in enumerate(rows) if np.array_equal(row, p)) for p in kept]
    return sorted(set(range(len(rows))) - set(found))


def test_layer_scope_takes_the_same_share_of_every_group(tmp_path, capsys):
    groups, pruned = prune_chain(tmp_path, capsys, "--channels", "0.3")
    assert (groups["conv1"]["after"], groups["conv2"]["after"], groups["conv3"]["after"]) == (6, 6, 2)
    weights = chain_weights()
    assert dropped(weights["w1"], pruned["w1"], 0) == [0, 1]
    assert dropped(weights["w3"], pruned["w3"], 1) == [1, 5]


def test_global_scope_takes_more_from_the_group_with_uneven_weights(tmp_path, capsys):
    groups, pruned = prune_chain(tmp_path, capsys, "--channels", "0.3", "--scope", "global")
    assert (groups["conv1"]["after"], groups["conv2"]["after"]) == (4, 7)
    weights = chain_weights()
    assert dropped(weights["w1"], pruned["w1"], 0) == [0, 1, 2, 3]
    assert dropped(weights["w3"], pruned["w3"], 1) == [5]
    assert pruned["w2"].shape == (7, 4, 1, 1)  # conv2 lost one output and the four inputs conv1 no longer makes


def test_max_group_ratio_caps_a_group_and_the_budget_moves_on(tmp_path, capsys):
    groups, pruned = prune_chain(tmp_path, capsys, "--channels", "0.3", "--scope", "global", "--max-group-ratio", "0.4")
    assert (groups["conv1"]["after"], groups["conv2"]["after"]) == (5, 6)
    weights = chain_weights()
    assert dropped(weights["w1"], pruned["w1"], 0) == [0, 1, 2]
    assert dropped(weights["w3"], pruned["w3"], 1) == [1, 5]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("glob, whole, shrunk", [("conv2", "conv2", "conv1"), ("w*1", "conv1", "conv2")])
def test_exclude_keeps_the_matching_group_whole(tmp_path, capsys, scope, glob, whole, shrunk):
    """A glob on a node name or on a tensor name; in global scope the other group then carries the whole budget of
    its own channels (round(0.3 x 8) = 2, within the cap of 4)."""
    groups, pruned = prune_chain(tmp_path, capsys, "--channels", "0.3", "--scope", scope, "--exclude", glob)
    assert groups[whole]["after"] == groups[whole]["before"] == 8
    assert groups[whole]["note"] == "excluded by --exclude"
    assert groups[shrunk]["after"] == 6


def test_exclude_on_a_zoo_model_leaves_the_other_groups_as_they_were(tmp_path, capsys):
    """resnet_bn through the CLI: excluding one group by its producer's name keeps it whole and changes no other
    group's count (layer scope, exact rounding)."""
    model = tmp_path / "resnet_bn.onnx"
    model.write_bytes((MODELS / "resnet_bn.onnx").read_bytes())

    def groups(*extra: str) -> dict[str, dict]:
        report = tmp_path / "report.json"
        code, _, err = run_main([model, "-o", tmp_path / "out.onnx", "--channels", "0.3", "--round-to", "1", "--json",
                                 report, *extra], capsys)
        assert code == 0, err
        return {g["name"]: g for g in json.loads(report.read_text())["groups"]}

    plain = groups()
    target = next(g for g in plain.values() if len(g["producers"]) == 1 and g["after"] < g["before"])
    excluded = groups("--exclude", target["producers"][0])
    assert excluded[target["name"]]["after"] == excluded[target["name"]]["before"]
    others = [name for name, g in plain.items() if name != target["name"]]
    assert [excluded[n]["after"] for n in others] == [plain[n]["after"] for n in others]
    assert sum(plain[n]["after"] < plain[n]["before"] for n in others) >= 3
