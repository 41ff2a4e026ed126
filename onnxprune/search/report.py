"""The sensitivity report: one result behind the text table, the JSON file and the plots.

The table has one line per (group, ratio) and the recoveries side by side, so the effect of recovery reads across a
line and the effect of the ratio down a group; the JSON keeps every measured number (schema ``onnxprune.sensitivity/1``,
documented in the README)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from onnxprune.formatting import table
from onnxprune.search.allocate import Levels, allocate
from onnxprune.search.sensitivity import SensitivityResult

SCHEMA = "onnxprune.sensitivity/1"
FRONTIER_STEPS = 20  # MACs budgets 0.95, 0.90, ... down to where no allocation reaches the budget
METRICS = {"top1_drop": "top-1 drop", "disagreement": "1 - agreement", "1-cosine": "1 - cosine"}


@dataclass
class Point:
    """One point of the frontier: what the budget search's allocation would pick for a MACs budget."""

    budget: float  # MACs budget, a fraction of the original's
    macs_kept: float  # the allocation's MACs (exact for the combination: search/cost.py)
    loss: float  # estimated: the sum of the chosen single-group losses
    removed: dict[int, int] = field(default_factory=dict)  # channels removed per group (0 left out)


def frontier(result: SensitivityResult, recover: str | None = None, judged: bool = False,
             budgets: int = FRONTIER_STEPS) -> list[Point]:
    """The estimated budget/loss frontier: for MACs budgets from 1 down, the greedy allocation the budget search
    uses (search/allocate.py) over the single-group losses of the rows recovered with ``recover`` (default: the
    recovery compared with none), by selection loss unless ``judged``.

    Why an estimate: sensitivity prunes one group at a time, so the loss of several together is not measured;
    adding single-group losses is the usual first-order model (NNI's sensitivity pruner, SparseML's loss
    sensitivity). MACs are exact for the combination (a layer between two pruned groups saves the product)."""
    if result.macs is None:
        return []
    method = recover or result.options["recover"][-1]
    levels = []
    for g in result.groups:
        rows = sorted((r for r in result.rows if r.group == g.id and r.recover == method), key=lambda r: r.removed)
        scores = [r.judged if judged else r.selection for r in rows]
        if rows and all(s is not None for s in scores):
            levels.append(Levels(g.id, (0, *(r.removed for r in rows)), (0.0, *(s.loss for s in scores))))
    total = result.macs.total
    points = []
    for budget in np.linspace(1.0, 0.0, budgets + 1)[1:]:
        chosen = allocate(levels, result.macs.cost, budget * total)
        if not chosen.reached:
            break
        points.append(Point(float(budget), chosen.cost / total, chosen.loss,
                            {g: n for g, n in chosen.removed.items() if n}))
    return points


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
                    "-" if base.macs_kept is None else f"{base.macs_kept:.3f}"]
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
        "total_macs": result.macs.total if result.macs else None,
        "frozen": [{"group": name, "reason": why} for name, why in result.frozen],
        "notes": result.notes,
        "elapsed_s": round(result.elapsed_s, 3),
    }
