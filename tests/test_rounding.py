"""Rounding kept channel counts to onnxruntime's block without keeping more MACs than exact pruning."""

from __future__ import annotations

import onnx
import pytest

from onnxprune.graph.io import from_proto
from onnxprune.pipeline import PruneOptions, prune_model
from onnxprune.prune.structured import allowed_keeps, round_keep

from conftest import MODELS


def test_allowed_keeps_are_blocks_or_everything():
    assert allowed_keeps(64, 16) == [16, 32, 48, 64]
    assert allowed_keeps(24, 16) == [16, 24]
    assert allowed_keeps(12, 16) == [12]
    assert allowed_keeps(5, 1) == [1, 2, 3, 4, 5]
    assert round_keep(64, 44.8, 16) == 48
    assert round_keep(64, 40.0, 16) == 32  # tie goes to the smaller count
    assert round_keep(12, 8.4, 16) == 12


@pytest.mark.parametrize("name", ["vgg_bn.onnx", "resnet_bn.onnx", "mobilenetv2_bn.onnx", "densenet_bn.onnx"])
@pytest.mark.parametrize("block", [4, 8])
def test_rounded_plans_use_blocks_and_stay_within_exact_macs(name, block):
    def run(round_to):
        model = from_proto(onnx.load(str(MODELS / name)))
        return prune_model(model, PruneOptions(channels=0.4, round_to=round_to))

    exact, rounded = run(1), run(block)
    for g in rounded.groups:
        assert g.after == g.before or g.after % block == 0, (g.name, g.after)
    if rounded.after.macs > exact.after.macs * 1.03:  # only when no group can go one block lower
        assert all(g.blocked or min(allowed_keeps(g.before, block)) == g.after for g in rounded.groups)
    assert any(g.after < g.before for g in rounded.groups)


def test_rounding_without_shapes_still_prunes():
    """With dynamic H/W no MACs are known: groups are rounded to the nearest block, never all put back."""
    proto = onnx.load(str(MODELS / "resnet_bn.onnx"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for axis in (2, 3):
        dims[axis].Clear()
        dims[axis].dim_param = f"s{axis}"
    del proto.graph.value_info[:]
    report = prune_model(from_proto(proto), PruneOptions(channels=0.3, round_to=16))
    assert report.after.macs is None
    assert [g.after for g in report.groups if g.before == 32] == [16, 16, 16]
