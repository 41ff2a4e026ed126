"""Attention heads in unfused exports: grouping, exact removal, selection, rounding, MACs and inspect.

A head is the D columns of q, k and v and the D rows of the output projection that one head owns. The checks here
do not only reuse the tool's own groups: the independent ones find the removed heads from the pruned output
projection alone and zero just those heads' q/k/v columns (and biases) in the original.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from attention_graphs import Spec, build
from cli_support import run_main
from conftest import MODELS
from oracle import assert_matches, masked_model, random_feeds
from rules_support import OPSET13, assert_blocked, assert_prunable, groups_of, init, make, oracle

from onnxprune.channels import Dim
from onnxprune.channels.attention import attention_blocks
from onnxprune.graph.io import from_proto
from onnxprune.graph.stats import model_stats
from onnxprune.importance import channel_scorer
from onnxprune.pipeline import PruneOptions, find_groups, prune_model
from onnxprune.prune.structured import channel_units, plan_channels

TRANSFORMER = MODELS / "transformer.onnx"
HEADS, HEAD_DIM, SEQ, WIDTH, FFN = 4, 8, 16, 32, 64  # tools/zoo_models.py: Transformer()


def _load(path=TRANSFORMER) -> onnx.ModelProto:
    return onnx.load(str(path))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _projections(proto: onnx.ModelProto, layer: int) -> dict[str, tuple[str, str | None]]:
    """q, k, v and proj of one layer of transformer.onnx: (weight name, bias name), found by node names."""
    found = {}
    for role in ("q", "k", "v", "proj"):
        prefix = f"/layers/layers.{layer}/attn/{role}/"
        matmul = next(n for n in proto.graph.node if n.name == prefix + "MatMul")
        add = next((n for n in proto.graph.node if n.name == prefix + "Add"), None)
        found[role] = (matmul.input[1], next((i for i in add.input if i != matmul.output[0]), None) if add else None)
    return found


def _removed_heads(original: onnx.ModelProto, pruned: onnx.ModelProto, layer: int) -> np.ndarray:
    """Which heads of ``layer`` the pruned file lost, from the output projection's rows alone: every kept row must
    be an original row, and rows must go in whole heads."""
    name = _projections(original, layer)["proj"][0]
    before, after = _weights(original)[name], _weights(pruned)[name]
    rows = [int(np.flatnonzero((before == row).all(axis=1))[0]) for row in after]
    assert rows == sorted(rows), rows
    gone = np.setdiff1d(np.arange(before.shape[0]), rows)
    heads = np.unique(gone // HEAD_DIM)
    assert np.array_equal(np.sort(gone), (heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)), gone
    return heads


def _zero_heads(original: onnx.ModelProto, layer: int, heads: np.ndarray) -> onnx.ModelProto:
    """The original with the q, k and v columns (and biases) of ``heads`` zeroed; nothing else touched."""
    masked = _copy(original)
    cols = (heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)
    names = [n for role in ("q", "k", "v") for n in _projections(original, layer)[role] if n]
    for tensor in masked.graph.initializer:
        if tensor.name in names:
            value = numpy_helper.to_array(tensor).copy()
            value[..., cols] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return masked


# -- grouping ---------------------------------------------------------------------------------------------------------

def test_each_layer_has_one_group_of_heads():
    gs = find_groups(from_proto(_load()))
    for layer in (0, 1):
        proj = _projections(gs.index.model.proto, layer)
        group = next(g for g in gs.groups if Dim(proj["q"][0], 1) in g.dims)
        assert group.prunable and group.size == HEADS
        for role in ("q", "k", "v"):
            assert group.indices_of(Dim(proj[role][0], 1), np.array([2])).tolist() == list(range(16, 24))
        assert group.indices_of(Dim(proj["proj"][0], 0), np.array([2])).tolist() == list(range(16, 24))
        assert channel_units(gs, group) == HEAD_DIM


def test_walk_arriving_inside_a_head_blocks_with_the_reason():
    """A tensor that couples the head dim D with a channel axis of its own (here an Add with a MatMul output of
    width D) would need removal inside every head: frozen, said why."""
    proto = build(Spec(heads=2, head_dim=3, norm="none", mask=False))
    graph = proto.graph
    reshape = next(n for n in graph.node if n.op_type == "Reshape")
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w_inner")
    graph.initializer.append(w)
    graph.node.insert(list(graph.node).index(reshape) + 1, onnx.helper.make_node(
        "MatMul", [reshape.output[0], "w_inner"], ["inner"], name="inner_MatMul"))
    graph.node.insert(list(graph.node).index(reshape) + 2, onnx.helper.make_node(
        "Add", [reshape.output[0], "inner"], ["mixed"], name="mixed_Add"))
    consumer = next(n for n in graph.node if reshape.output[0] in n.input and n.op_type == "Transpose")
    consumer.input[0] = "mixed"
    _, gs = groups_of(proto)
    assert_blocked(gs, "inner", "only slices along output axis 2 (whole heads)", axis=3)


# -- exact removal ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_transformer_heads_removed_exactly(ratio):
    """--verify's oracle (the tool's groups) and the independent check (heads found from the output projection,
    only their q/k/v zeroed in the original) both hold; every target constant follows the head count."""
    original = _load()
    model = from_proto(_copy(original))
    report = prune_model(model, PruneOptions(channels=ratio, round_to=1, verify=True, exclude=("*fc1*",)))
    assert any("verified the channel removal" in n for n in report.notes), report.notes
    pruned = model.proto
    onnx.checker.check_model(pruned, full_check=True)
    masked = original
    kept_heads = []
    for layer in (0, 1):
        heads = _removed_heads(original, pruned, layer)
        assert len(heads) == round(ratio * HEADS)
        kept_heads.append(HEADS - len(heads))
        masked = _zero_heads(masked, layer, heads)
    for batch in (1, 3):
        assert_matches(masked, pruned, random_feeds(original, batch=batch))
    inferred = onnx.shape_inference.infer_shapes(pruned, strict_mode=True, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    for layer, kept in enumerate(kept_heads):
        q = f"/layers/layers.{layer}/attn/Reshape_output_0"
        assert shapes[q][2:] == [kept, HEAD_DIM]
        assert shapes[f"/layers/layers.{layer}/attn/Reshape_3_output_0"][2] == kept * HEAD_DIM


def test_the_independent_check_catches_a_wrong_head():
    """Guard: zeroing a different head than the one removed must not match."""
    original = _load()
    model = from_proto(_copy(original))
    prune_model(model, PruneOptions(channels=0.25, round_to=1, exclude=("*fc1*",)))
    heads = _removed_heads(original, model.proto, 0)
    masked = _zero_heads(_zero_heads(original, 0, (heads + 1) % HEADS), 1, _removed_heads(original, model.proto, 1))
    with pytest.raises(AssertionError):
        assert_matches(masked, model.proto, random_feeds(original))


def test_dynamic_batch_and_sequence_prune_heads_without_input_shape():
    """Reshape targets from Shape -> Gather -> Unsqueeze -> Concat, batch and sequence symbolic, no --input-shape:
    heads go, and the pruned model runs at other batch and sequence sizes than any the tool saw."""
    spec = Spec(heads=4, head_dim=3, dynamic=True, ffn=5, layers=2, qkv="separate")
    proto = build(spec)
    model = from_proto(_copy(proto))
    gs = find_groups(model)
    heads = [g for g in gs.prunable() if g.size == 4]
    assert len(heads) == 2
    plan = {g.id: np.array([1, 3]) for g in heads}
    gs2, pruned, _ = oracle(proto, plan, expect_groups=2)
    for batch in (1, 4):
        feeds = random_feeds(proto, batch=batch)
        assert_matches(masked_model(proto, gs2, plan), pruned, feeds)
    merged = [n for n in pruned.graph.node if n.op_type == "Concat" and len(n.input) == 3]
    assert merged and all(any(t.name in n.input and numpy_helper.to_array(t).tolist() == [6]
                              for t in pruned.graph.initializer) for n in merged)


def test_grouped_query_attention_keeps_each_kv_head_with_its_q_heads():
    spec = Spec(heads=4, head_dim=2, kv_heads=2, qkv="separate")
    proto = build(spec)
    _, gs = groups_of(proto)
    (group,) = [g for g in gs.prunable() if g.size == 2]
    q, k = (proto.graph.node[i].input[1] for i in (1, 5))  # LayerNorm, q MatMul, Add, Reshape, Transpose, k MatMul
    assert group.indices_of(Dim(q, 1), np.array([1])).tolist() == [4, 5, 6, 7]  # q heads 2 and 3
    assert group.indices_of(Dim(k, 1), np.array([1])).tolist() == [2, 3]  # kv head 1
    _, pruned, _ = oracle(proto, {group.id: [1]})
    expand = next(n for n in pruned.graph.node if n.op_type == "Expand")
    target = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == expand.input[1])
    assert target.tolist() == [spec.batch, 1, 2, spec.seq, 2]


def test_one_shared_kv_head_freezes_the_heads_with_the_reason():
    proto = build(Spec(heads=4, head_dim=2, kv_heads=1))
    _, gs = groups_of(proto)
    q = next(g for g in gs.groups if Dim(proto.graph.node[1].input[1], 1) in g.dims)  # LayerNorm, q MatMul
    assert not q.prunable and any("copies made by Expand" in r for r in q.blocked), q.blocked


@pytest.mark.parametrize("qkv", ["split", "slice", "reshape5"])
def test_fused_qkv_removes_q_k_and_v_of_a_head_together(qkv):
    spec = Spec(heads=3, head_dim=2, kv_heads=3, qkv=qkv)
    proto = build(spec)
    _, gs = groups_of(proto)
    (group,) = [g for g in gs.prunable() if g.size == 3]
    fused = next(n for n in proto.graph.node if n.op_type == "MatMul").input[1]
    assert sorted(group.indices_of(Dim(fused, 1), np.array([1])).tolist()) == [2, 3, 8, 9, 14, 15]
    oracle(proto, {group.id: [1]})


# -- selection --------------------------------------------------------------------------------------------------------

def _weak_head_model(head: int) -> onnx.ModelProto:
    """transformer.onnx with head ``head`` of layer 0 made nearly silent (q/k/v columns and proj rows x 0.01)."""
    proto = _load()
    proj = _projections(proto, 0)
    span = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    for tensor in proto.graph.initializer:
        for role, (weight, bias) in proj.items():
            if tensor.name in (weight, bias):
                value = numpy_helper.to_array(tensor).copy()
                if role == "proj" and tensor.name == weight:
                    value[span] *= 0.01
                elif role != "proj":
                    value[..., span] *= 0.01
                tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return proto


@pytest.mark.parametrize("criterion", ["l1", "l2", "act", "recon"])
def test_every_criterion_removes_the_silent_head(criterion):
    proto = _weak_head_model(2)
    gs = find_groups(from_proto(_copy(proto)))
    group = next(g for g in gs.groups if Dim(_projections(proto, 0)["q"][0], 1) in g.dims)
    batches = [random_feeds(proto, batch=8, seed=s) for s in range(2)] if criterion in ("act", "recon") else None
    scores, note = channel_scorer(criterion, gs, batches=batches)([group])[group.id]
    assert note is None and int(np.argmin(scores)) == 2, (scores, note)


def test_round_to_keeps_ffn_on_blocks_and_heads_one_by_one():
    """Heads are pruned one by one under --round-to 16 (no multiple of 16 below 4 exists), FFN counts stay on the
    block, and the MAC budget of exact pruning holds, with head costs that include their attention MatMuls."""
    report = prune_model(from_proto(_load()), PruneOptions(channels=0.3, round_to=16))
    sizes = [(g.before, g.after) for g in report.groups if g.after < g.before]
    heads = [after for before, after in sizes if before == HEADS]
    ffn = [after for before, after in sizes if before == FFN]
    assert len(heads) == 2 and all(0 < h < HEADS for h in heads), sizes
    assert len(ffn) == 2 and all(after % 16 == 0 for after in ffn), sizes
    exact = prune_model(from_proto(_load()), PruneOptions(channels=0.3, round_to=1))
    assert report.after.macs <= exact.after.macs


def test_global_scope_counts_a_head_for_its_columns():
    """--scope global ranks heads against FFN neurons; the budget is in weight columns, so removing one head uses
    HEAD_DIM of it, and the total removed is the ratio of all columns (within half the largest unit)."""
    gs = find_groups(from_proto(_load()))
    ratio = 0.3
    plan = plan_channels(gs, ratio, scope="global", round_to=1)
    units = {g.id: channel_units(gs, g) for g in gs.prunable()}
    total = sum(g.size * units[g.id] for g in gs.prunable())
    removed = sum(len(ids) * units[gid] for gid, ids in plan.remove.items())
    assert abs(removed - ratio * total) <= HEAD_DIM / 2, (removed, ratio * total)
    assert any(units[gid] == HEAD_DIM for gid in plan.remove) and any(units[gid] == 1 for gid in plan.remove)


# -- MACs and inspect -------------------------------------------------------------------------------------------------

def _transformer_macs(heads: list[int], ffn: list[int], batch: int = 1) -> int:
    """Counted by hand: embed, per layer q/k/v (heads * D outputs), scores and context (per head S*S*D each),
    proj, fc1 and fc2, the head Gemm on the pooled tokens."""
    total = SEQ * WIDTH * WIDTH + WIDTH * 10
    for h, f in zip(heads, ffn):
        total += 3 * SEQ * WIDTH * h * HEAD_DIM + 2 * h * SEQ * SEQ * HEAD_DIM + SEQ * h * HEAD_DIM * WIDTH
        total += 2 * SEQ * WIDTH * f
    return batch * total


def test_macs_count_the_attention_matmuls_before_and_after():
    original = from_proto(_load())
    assert model_stats(original).macs == _transformer_macs([HEADS, HEADS], [FFN, FFN])
    model = from_proto(_load())
    report = prune_model(model, PruneOptions(channels=0.5, round_to=1))
    assert report.after.macs == _transformer_macs([2, 2], [32, 32])


def test_macs_known_when_position_ids_are_sliced_to_the_sequence():
    """BERT exports slice a position_ids buffer (more than 64 values, so shape inference sees it as an input) to
    the run-time sequence length; onnx leaves that Slice's shape unknown, which used to hide every MAC count."""
    proto = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    g (int64[B, S] ids, float[512, 4] table, float[4, 6] w) => (float[B, S, 6] y) <int64[1] zero = {0},
      int64[1] one = {1}, int64 idx = {1}> {
        shape = Shape(ids)
        seq = Gather(shape, idx)
        end = Unsqueeze(seq, zero)
        pos = Slice(position_ids, zero, end, one)
        emb = Gather(table, pos)
        tok = Gather(table, ids)
        x = Add(tok, emb)
        y = MatMul(x, w)
    }''')
    proto.graph.initializer.append(numpy_helper.from_array(np.arange(512, dtype=np.int64)[None], "position_ids"))
    for name, shape in (("table", (512, 4)), ("w", (4, 6))):
        proto.graph.initializer.append(numpy_helper.from_array(np.ones(shape, np.float32), name))
    inits = {t.name for t in proto.graph.initializer}
    kept_inputs = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(kept_inputs)
    assert model_stats(from_proto(proto), {"ids": [2, 7]}).macs == 2 * 7 * 4 * 6


def test_inspect_shows_heads_and_ffn_width(capsys, tmp_path):
    code, out, _ = run_main(["inspect", TRANSFORMER], capsys)
    assert code == 0
    attention, ffn = out.split("attention blocks")[1].split("feed-forward layers")
    assert [line.split()[1:4] for line in attention.splitlines() if "/attn/Softmax" in line] == [["4", "8", "4"]] * 2
    assert [line.split()[1:3] for line in ffn.splitlines() if "/fc1/MatMul" in line] == [["64", "yes"]] * 2
    model = from_proto(_load())
    prune_model(model, PruneOptions(channels=0.5, round_to=1))
    after = attention_blocks(find_groups(model))
    assert [(b.heads, b.head_dim, b.units) for b in after] == [(2, 8, 2)] * 2


# -- head dims (--attention-units head-dims) --------------------------------------------------------------------------

def _kept_columns(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Original column of every pruned column, by value."""
    return np.array([int(np.flatnonzero((before == col[:, None]).all(axis=0))[0]) for col in after.T])


def test_head_dims_remove_the_same_dims_of_every_head_exactly():
    """Units are one dim of every head: q/k dims together, v/proj dims together. Checked independently: the
    removed v dims are read from the output projection's rows, the q/k dims from q's columns, and zeroing only
    v's and q's columns for them in the original gives the pruned outputs."""
    original = _load()
    model = from_proto(_copy(original))
    report = prune_model(model, PruneOptions(channels=0.25, round_to=1, attention_units="head-dims",
                                             exclude=("*fc1*",), verify=True))
    assert any("verified the channel removal" in n for n in report.notes), report.notes
    before, after = _weights(original), _weights(model.proto)
    masked = _copy(original)
    zero: dict[str, np.ndarray] = {}
    for layer in (0, 1):
        proj = _projections(original, layer)
        rows = _kept_columns(before[proj["proj"][0]].T, after[proj["proj"][0]].T)
        q_cols = _kept_columns(before[proj["q"][0]], after[proj["q"][0]])
        for kept, n_kept in ((rows, 6), (q_cols, 6)):  # 8 dims per head, 0.25 of them gone, in every head alike
            dims = [set(kept[kept // HEAD_DIM == h] % HEAD_DIM) for h in range(HEADS)]
            assert all(d == dims[0] for d in dims) and len(dims[0]) == n_kept, dims
        for role, kept in (("v", rows), ("q", q_cols)):
            for name in proj[role]:
                zero[name] = np.setdiff1d(np.arange(HEADS * HEAD_DIM), kept)
    for tensor in masked.graph.initializer:
        if tensor.name in zero:
            value = numpy_helper.to_array(tensor).copy()
            value[..., zero[tensor.name]] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    assert_matches(masked, model.proto, random_feeds(original, batch=3))


def test_cli_attention_units_head_dims(capsys, tmp_path):
    out = tmp_path / "hd.onnx"
    code, text, err = run_main([TRANSFORMER, "--channels", "0.5", "--round-to", "1", "--attention-units",
                                "head-dims", "-o", out], capsys)
    assert code == 0, err
    sizes = [line.split()[-3:] for line in text.splitlines() if "/attn/q/MatMul" in line or "/attn/v/MatMul" in line]
    assert [s[0:3] for s in sizes] == [["8", "->", "4"]] * 4, text
    blocks = attention_blocks(find_groups(from_proto(onnx.load(str(out)))))
    assert [(b.heads, b.head_dim) for b in blocks] == [(4, 4)] * 2


def test_expand_passes_channels_and_its_shape_follows():
    """Expand outside attention: a per-channel gate broadcast over H and W by Expand, then multiplied in; the
    channel entry of the Expand shape follows the kept count (the 1s broadcast by themselves)."""
    proto = make(OPSET13 + """
    g (float[1,3,4,4] x, float[6,3,1,1] w1, float[6,3,1,1] w2, float[4,6,1,1] w3) => (float[1,4,4,4] y)
      <int64[4] full = {1, 6, 4, 4}> {
        c = Conv(x, w1)
        p = GlobalAveragePool(x)
        gate = Conv(p, w2)
        wide = Expand(gate, full)
        m = Mul(c, wide)
        y = Conv(m, w3)
    }""")
    _, gs = groups_of(proto)
    assert Dim("wide", 1) in assert_prunable(gs, "c", 6).dims
    _, pruned, _ = oracle(proto, {"c": [1, 4]})
    assert init(pruned, "full").tolist() == [1, 4, 4, 4]
