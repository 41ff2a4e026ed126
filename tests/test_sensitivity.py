"""`onnxprune sensitivity`: its numbers against a direct prune + validate of the same group and ratio (an oracle),
the same results from 1 and 2 local workers, the frontier's MACs model against measured MACs, the report files, and
bad inputs as one-line errors."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from onnxprune.data.loader import DataOptions
from onnxprune.pipeline import PruneOptions, prune_file
from onnxprune.search import report as sensitivity_report
from onnxprune.search.sensitivity import SensitivityOptions, run_sensitivity
from onnxprune.validate import ValidateOptions, run_validation
from cli_support import assert_one_error, run_main

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "models" / "digits_resnet.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
CALIB_LIMIT = 64  # the default 256 makes each lsq task several seconds on 2 shared cores
# digits_resnet's groups: 0 stem + layer1.conv2 (residual), 1 layer1.conv1, 2 layer2.conv1, 3 layer2.conv2 + short
LAYER1_CONV1 = "/layer1/conv1/Conv"


def options(**changes) -> SensitivityOptions:
    base = SensitivityOptions(prune=PruneOptions(calib=str(CALIB), calib_limit=CALIB_LIMIT, round_to=1),
                              data=DataOptions(path=str(VAL)), ratios=(0.5,), recover="none", runs=0)
    return replace(base, **changes)


def comparable(row) -> dict:
    """A row without its wall times (the only fields that differ between runs)."""
    values = asdict(row)
    for name in ("seconds", "prune_s", "compare_s", "latency_s"):
        values.pop(name)
    return values


@pytest.fixture(scope="module")
def local_result():
    """Every group at two ratios without recovery, in this process: the reference for the other kinds of run."""
    return run_sensitivity(str(RESNET), options(ratios=(0.25, 0.5)))


@pytest.mark.parametrize("recover", ["none", pytest.param("lsq", marks=pytest.mark.slow)])
def test_numbers_equal_a_direct_prune_and_validate_of_the_same_group(tmp_path, recover):
    result = run_sensitivity(str(RESNET), options(only=(LAYER1_CONV1,), recover=recover))
    row = next(r for r in result.rows if r.recover == recover)
    # the direct way, by the prune command's own options: every other group excluded by hand-written globs
    out = tmp_path / "pruned.onnx"
    report = prune_file(RESNET, out, PruneOptions(channels=0.5, exclude=("/stem/*", "/layer2/*"), round_to=1,
                                                  calib=str(CALIB), calib_limit=CALIB_LIMIT, recover=recover))
    changed = [(g.name, g.before - g.after) for g in report.groups if g.after != g.before]
    assert changed == [(LAYER1_CONV1, row.removed)] and row.removed == 8
    assert row.macs_kept == report.after.macs / report.before.macs
    on_data = run_validation(RESNET, out, ValidateOptions(data=DataOptions(path=str(VAL), batch_size=32), runs=0,
                                                          mobile=False))
    assert row.judged.top1 == on_data.accuracy["pruned"]["top1"]
    assert row.judged.top1_original == on_data.accuracy["original"]["top1"]
    assert row.judged.loss == on_data.accuracy["top1_drop"]
    output = on_data.outputs["logits"]
    assert row.judged.agreement == output["top1_agreement"]
    assert row.judged.cosine == pytest.approx(output["cosine_mean"], rel=1e-9)
    on_calib = run_validation(RESNET, out, ValidateOptions(data=DataOptions(path=str(CALIB), limit=CALIB_LIMIT,
                                                                            batch_size=32), runs=0, mobile=False))
    assert on_calib.accuracy is None  # no labels in the calibration file: selection ranks by disagreement
    assert row.selection.metric == "disagreement"
    assert row.selection.loss == 1 - on_calib.outputs["logits"]["top1_agreement"]
    assert row.selection.cosine == pytest.approx(on_calib.outputs["logits"]["cosine_mean"], rel=1e-9)


def test_two_workers_give_the_results_of_one(local_result):
    pooled = run_sensitivity(str(RESNET), options(ratios=(0.25, 0.5), workers=2))
    assert len(local_result.rows) == 8  # 4 groups x 2 ratios
    assert [comparable(r) for r in pooled.rows] == [comparable(r) for r in local_result.rows]
    assert sensitivity_report.to_dict(pooled)["frontier"] == sensitivity_report.to_dict(local_result)["frontier"]


def test_losses_differ_between_groups_and_grow_with_the_ratio(local_result):
    """Not a constant table: the residual stem group is far more fragile than layer2's groups (measured)."""
    loss = {(r.group, r.ratio): r.selection.loss for r in local_result.rows}
    assert loss[(0, 0.5)] > 0.5 > 0.05 > loss[(2, 0.5)]
    assert all(loss[(g, 0.25)] <= loss[(g, 0.5)] for g in range(4))


def test_frontier_macs_equal_the_measured_macs_of_each_group_alone(local_result):
    """The frontier's MACs for one group alone equal what pruning it really kept; the frontier descends in budget
    and its loss is the sum of the chosen groups' measured losses."""
    for row in local_result.rows:
        estimated = local_result.macs.cost({row.group: row.removed}) / local_result.macs.total
        assert estimated == pytest.approx(row.macs_kept, rel=1e-9), row
    points = sensitivity_report.frontier(local_result)
    assert len(points) >= 3 and all(p.macs_kept <= p.budget for p in points)
    assert [p.macs_kept for p in points] == sorted((p.macs_kept for p in points), reverse=True)
    loss = {(r.group, r.removed): r.selection.loss for r in local_result.rows}
    for point in points:
        assert point.loss == pytest.approx(sum(loss[g, n] for g, n in point.removed.items()))


def test_share_of_macs_is_what_removing_every_channel_would_save(local_result):
    """macs_share is linear in the ratio: at ratio r the measured saving is r x share (round_to 1, 16/32 channels)."""
    share = {g.id: g.macs_share for g in local_result.groups}
    for row in local_result.rows:
        assert 1 - row.macs_kept == pytest.approx(row.ratio * share[row.group], rel=1e-9)


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    json_path, plots = tmp_path / "s.json", tmp_path / "plots"
    code, out, err = run_main(["sensitivity", RESNET, "--calib", CALIB, "--calib-limit", CALIB_LIMIT, "--data", VAL,
                               "--only", "/layer2/*", "--ratios", "0.25,0.5", "--recover", "none", "--round-to", "1",
                               "--runs", "3", "--warmup", "1", "--json", json_path, "--plot", plots], capsys)
    assert code == 0, err
    data = json.loads(json_path.read_text())
    assert data["schema"] == "onnxprune.sensitivity/1"
    assert [g["name"] for g in data["groups"]] == ["/layer2/conv1/Conv", "/layer2/conv2/Conv, /layer2/short/short.0/Conv"]
    assert len(data["rows"]) == 4 and all(r["speedup"]["cpu"] > 0 for r in data["rows"])
    assert data["frozen"] == [{"group": "/fc/Gemm", "reason": "reaches graph output 'logits'"}]
    table_lines = [line for line in out.splitlines() if line.strip().startswith("/layer2/")]
    assert len(table_lines) == 4
    for line, row in zip(table_lines, data["rows"]):  # the table shows the JSON's numbers
        assert f"{100 * row['selection']['loss']:.1f}%" in line and f"{row['macs_kept']:.3f}" in line
    for name in ("sensitivity_loss.png", "sensitivity_frontier.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {plots / name}" in out


BASE = ["sensitivity", RESNET, "--calib", CALIB, "--runs", "0"]


@pytest.mark.parametrize("args, code, fragments", [
    (["sensitivity", RESNET], 2, ["--calib"]),
    ([*BASE, "--ratios", "0.5,1"], 2, ["(0, 1)", "1.0"]),
    ([*BASE, "--ratios", "0,0.5"], 2, ["(0, 1)"]),
    ([*BASE, "--ratios", "0.5,0.5"], 2, ["repeats"]),
    ([*BASE, "--ratios", "half"], 2, ["not a comma-separated list"]),
    ([*BASE, "--workers", "0"], 2, ["--workers"]),
    ([*BASE, "--workers", "2", "--ray", "auto"], 2, ["--workers", "--ray"]),
    ([*BASE, "--max-accuracy-drop", "0.01"], 2, ["--max-accuracy-drop is not a sensitivity option"]),
    ([*BASE, "--no-mobile"], 2, ["--mobile is not a sensitivity option"]),
    ([*BASE, "--only", "nothing*"], 2, ["--only nothing*", "no prunable group"]),
    (["sensitivity", ROOT / "models" / "missing.onnx", "--calib", CALIB], 3, ["missing.onnx"]),
    ([*BASE[:-2], "--providers", "cuda"], 6, ["cuda"]),
    (["sensitivity", ROOT / "models" / "vgg_bn.onnx", "--calib", CALIB, "--runs", "0"], 7, ["digits_calib.npz"]),
])
def test_bad_input_is_one_line_error_before_any_work(args, code, fragments, capsys):
    got, out, err = run_main(args, capsys)
    assert got == code, err
    assert_one_error(err, *fragments)
    assert out == ""


def test_nan_calibration_data_is_a_data_error(tmp_path, capsys):
    inputs = np.load(CALIB)["input"][:8].copy()
    inputs[3, 0, 0, 0] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, input=inputs)
    code, _, err = run_main([*BASE[:2], "--calib", bad, "--runs", "0"], capsys)
    assert code == 7
    assert_one_error(err, "nan.npz")


@pytest.mark.parametrize("flag, module, package", [("--plot", "matplotlib", "onnxprune[plots]"),
                                                   ("--ray", "ray", "onnxprune[ray]")])
def test_a_missing_extra_names_its_package(flag, module, package, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails as if not installed
    value = str(tmp_path / "plots") if flag == "--plot" else "auto"
    code, out, err = run_main([*BASE, "--only", LAYER1_CONV1, "--ratios", "0.5", "--recover", "none", flag, value],
                              capsys)
    assert code == 2
    assert_one_error(err, flag, package)
    assert not (tmp_path / "plots").exists()


def test_unwritable_report_targets_are_refused_before_the_run(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    code, _, err = run_main([*BASE, "--plot", afile], capsys)
    assert code == 4 and "not a folder" in err
    code, _, err = run_main([*BASE, "--json", tmp_path], capsys)
    assert code == 4 and "is a directory" in err
