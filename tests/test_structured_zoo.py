"""Structured pruning on every zoo model: the mask oracle for random channel sets, and full coverage at 0.3."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.prune.structured import ChannelPlan, apply_plan
from oracle import assert_matches, masked_model, random_feeds

from conftest import MANIFEST, MODELS, ZOO


def _proto(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / name))  # external data loaded into memory


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ZOO)
def test_random_removal_matches_masked_original(name, seed):
    original = _proto(name)
    model = from_proto(_proto(name))
    groups = find_groups(model)
    rng = np.random.default_rng(seed)
    remove = {}
    for g in groups.prunable():
        count = int(rng.integers(1, g.size))  # at least one removed, at least one kept
        remove[g.id] = np.sort(rng.choice(g.size, size=count, replace=False))
    assert remove, f"{name}: nothing prunable"
    masked = masked_model(original, groups, remove)
    apply_plan(groups, ChannelPlan(remove))
    onnx.checker.check_model(model.proto, full_check=True)
    assert_matches(masked, model.proto, random_feeds(original, batch=2, seed=seed))


def test_oracle_detects_a_wrong_removal():
    """Guard against an oracle that cannot fail: mask one set, remove another."""
    original = _proto("resnet_bn.onnx")
    model = from_proto(_proto("resnet_bn.onnx"))
    groups = find_groups(model)
    g = groups.prunable()[0]
    masked = masked_model(original, groups, {g.id: np.array([0, 1])})
    apply_plan(groups, ChannelPlan({g.id: np.array([2, 3])}))
    with pytest.raises(AssertionError):
        assert_matches(masked, model.proto, random_feeds(original))


CNN = [n for n in ZOO if n != "transformer.onnx"]


@pytest.mark.parametrize("name", CNN)
def test_every_cnn_group_is_pruned_at_0_3(name):
    model = from_proto(_proto(name))
    report = prune_model(model, PruneOptions(channels=0.3, round_to=1))
    blocked = [g for g in report.groups if g.blocked]
    assert all(all("graph output" in r for r in g.blocked) for g in blocked), [g.blocked for g in blocked]
    assert len(blocked) == 1  # only the head that produces the graph output stays whole
    pruned = [g for g in report.groups if not g.blocked]
    assert pruned and all(g.after < g.before for g in pruned if g.before > 1)
    assert report.after.macs < 0.75 * report.before.macs
    onnx.checker.check_model(model.proto, full_check=True)


@pytest.mark.parametrize("name, feature", [
    ("resnet_bn.onnx", "residual"), ("densenet_bn.onnx", "concat"), ("csp_bn.onnx", "split"),
    ("resnext_bn.onnx", "grouped"), ("convflatten_bn.onnx", "flatten"), ("mobilenetv2_bn.onnx", "depthwise"),
    ("keras_cnn.onnx", "squeeze_matmul"), ("nhwc_cnn.onnx", "nhwc"), ("unet_bn.onnx", "conv_transpose"), ("mobilenetv3_bn.onnx", "se_gate"),
])
def test_feature_groups_are_pruned(name, feature):
    groups = find_groups(from_proto(_proto(name)))
    index = groups.index
    ops = lambda g: {index.producer[d.tensor].node.op_type for d in g.dims if d.tensor in index.producer}
    consumers = lambda g: {u.node.op_type for d in g.dims for u in index.consumers_of(d.tensor)}
    check = {
        "residual": lambda g: "Add" in consumers(g) and len(g.producers) > 1,
        "concat": lambda g: "Concat" in consumers(g),
        "split": lambda g: "Split" in ops(g) or "Split" in consumers(g),
        "grouped": lambda g: any(u.node.op_type == "Conv" and u.index == 0 and
                                 1 < next(a.i for a in u.node.attribute if a.name == "group") <
                                 index.size(u.node.input[0], 1)
                                 for d in g.dims for u in index.consumers_of(d.tensor)
                                 if any(a.name == "group" for a in u.node.attribute)),
        "flatten": lambda g: "Flatten" in consumers(g) or "Reshape" in consumers(g),
        "depthwise": lambda g: any(u.node.op_type == "Conv" and index.shape(u.node.input[1])[1] == 1
                                   and u.index == 0 for d in g.dims for u in index.consumers_of(d.tensor)),
        "nhwc": lambda g: "Transpose" in ops(g) and any(d.axis == 3 for d in g.dims),
        "squeeze_matmul": lambda g: "Squeeze" in consumers(g) and "MatMul" in consumers(g),
        "conv_transpose": lambda g: "ConvTranspose" in ops(g) or "ConvTranspose" in consumers(g),
        "se_gate": lambda g: "Mul" in consumers(g) and "GlobalAveragePool" in consumers(g),
    }[feature]
    assert any(check(g) for g in groups.prunable()), feature


def test_transformer_prunes_heads_and_feed_forward_and_explains_the_rest():
    """Heads (4 per layer, q/k/v/proj together) and FFN neurons go; the LayerNorm-coupled stream stays, said why
    (tests/test_heads.py checks the heads in detail)."""
    report = prune_model(from_proto(_proto("transformer.onnx")), PruneOptions(channels=0.3, round_to=1))
    pruned = [g for g in report.groups if g.after < g.before]
    assert sorted(g.before for g in pruned) == [4, 4, 64, 64]
    reasons = " ".join(r for g in report.groups for r in g.blocked)
    assert "LayerNormalization normalises over the channel axis" in reasons


def test_manifest_lists_every_model():
    assert {p.name for p in MODELS.glob("*.onnx")} >= set(MANIFEST)
