"""The sensitivity report: one result behind the text table, the JSON file and the plots.

The table has one line per (group, ratio) and the recoveries side by side, so the effect of recovery reads across a
line and the effect of the ratio down a group; the JSON keeps every measured number (schema ``onnxprune.sensitivity/1``,
documented in the README)."""

from __future__ import annotations

from dataclasses import asdict

from onnxprune.formatting import table
from onnxprune.search.frontier import Option, Point, greedy_frontier
from onnxprune.search.sensitivity import SensitivityResult

SCHEMA = "onnxprune.sensitivity/1"
METRICS = {"top1_drop": "top-1 drop", "disagreement": "1 - agreement", "1-cosine": "1 - cosine"}


def frontier(result: SensitivityResult, recover: str | None = None, judged: bool = False) -> list[Point]:
    """The estimated budget/loss frontier (see :mod:`onnxprune.search.frontier`) from the rows recovered with
    ``recover`` (default: the last recovery measured, i.e. the one compared with none), by selection loss unless
    ``judged``."""
    method = recover or result.options["recover"][-1]
    channels = {g.id: g.channels for g in result.groups}
    options = [Option(r.group, r.ratio, r.removed / channels[r.group], (r.judged if judged else r.selection).loss)
               for r in result.rows if r.recover == method and (r.judged is not None or not judged)]
    return greedy_frontier(options, result.layers, result.total_macs)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(result: SensitivityResult) -> str:
    """The human report: groups, the table of losses, frozen groups and notes."""
    recoveries = result.options["recover"]
    providers = result.options["providers"] if result.options["runs"] else []
    first = result.rows[0] if result.rows else None
    lines = [f"sensitivity of {result.model}: {len(result.groups)} prunable groups x "
             f"{len(result.options['ratios'])} ratios x {len(recoveries)} recoveries = {len(result.rows)} tasks in "
             f"{result.elapsed_s:.1f} s ({_where(result.options)})"]
    if first is not None:
        lines.append(f"selection on --calib ({result.options['calib_samples']} samples): "
                     f"{METRICS[first.selection.metric]}"
                     + (f"; judged on --data ({result.options['data_samples']} samples): "
                        f"{METRICS[first.judged.metric]}, original top-1 {_pct(first.judged.top1_original)}"
                        if first.judged is not None and first.judged.top1_original is not None else
                        f"; judged on --data: {METRICS[first.judged.metric]}" if first.judged is not None else ""))
    by_key = {(r.group, r.ratio, r.recover): r for r in result.rows}
    headers = ["group", "channels", "MACs share", "ratio", "removed", "MACs kept"]
    headers += [f"calib {m}" for m in recoveries]
    if first is not None and first.judged is not None:
        headers += [f"data {m}" for m in recoveries]
    headers += [f"speedup {p}" for p in providers]
    rows = []
    for g in result.groups:
        for ratio in result.options["ratios"]:
            base = by_key.get((g.id, ratio, recoveries[0]))
            if base is None:
                continue
            line = [g.name, str(g.channels), _pct(g.macs_share), f"{ratio:g}", str(base.removed),
                    f"{base.macs_kept:.3f}"]
            line += [_pct(by_key[(g.id, ratio, m)].selection.loss) for m in recoveries]
            if base.judged is not None:
                line += [_pct(by_key[(g.id, ratio, m)].judged.loss) for m in recoveries]
            line += [f"{base.speedup[p]:.2f}x" if base.speedup else "-" for p in providers]
            rows.append(line)
    lines.append(table(headers, rows, indent="  "))
    lines += [f"frozen: {name}: {why}" for name, why in result.frozen]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _where(options: dict) -> str:
    if options["ray"]:
        return f"on Ray ({options['ray']})"
    return f"{options['workers']} local worker{'s' if options['workers'] > 1 else ''}"


def to_dict(result: SensitivityResult) -> dict:
    """The JSON report."""
    return {
        "schema": SCHEMA,
        "model": result.model,
        "options": result.options,
        "groups": [asdict(g) for g in result.groups],
        "rows": [asdict(r) for r in result.rows],
        "frontier": [asdict(p) for p in frontier(result)] if result.rows else [],
        "total_macs": result.total_macs,
        "frozen": [{"group": name, "reason": why} for name, why in result.frozen],
        "notes": result.notes,
        "elapsed_s": round(result.elapsed_s, 3),
    }
