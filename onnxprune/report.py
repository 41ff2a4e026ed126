"""Human tables and JSON for `inspect` and `prune` reports (one schema, documented in the README)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from onnxprune.channels.attention import AttentionBlock, FeedForward
from onnxprune.errors import OutputError
from onnxprune.formatting import human, table as _table
from onnxprune.passes.state import HiddenRow
from onnxprune.pipeline import PruneReport
from onnxprune.graph.stats import ModelStats
from onnxprune.quantize import QuantizationResult


def _ratio(after: int | None, before: int | None) -> str:
    return f"{after / before:.3f}" if after is not None and before else "?"


def stats_dict(stats: ModelStats) -> dict:
    return {
        "params": stats.params, "macs": stats.macs, "file_size": stats.file_size, "opset": stats.opset,
        "producer": stats.producer, "layer_params": stats.layer_params, "layer_zeros": stats.zeros,
        "layers": [{"node": l.node, "op": l.op, "weight": l.weight, "weight_shape": list(l.weight_shape),
                    "params": l.params, "macs": l.macs, "sparsity": round(l.sparsity, 6)} for l in stats.layers],
    }


def render_inspect(stats: ModelStats, path: str) -> str:
    rows = [[l.node, l.op, "x".join(map(str, l.weight_shape)), human(l.params), human(l.macs),
             f"{100 * l.sparsity:.1f}%"] for l in stats.layers]
    body = _table(["node", "op", "weight", "params", "MACs", "sparsity"], rows)
    total_sparsity = stats.zeros / stats.layer_params if stats.layer_params else 0.0
    return (f"{path}: opset {stats.opset}, producer '{stats.producer}', {human(stats.file_size)}B on disk\n{body}\n"
            f"total: {human(stats.params)} parameters ({human(stats.layer_params)} in {len(stats.layers)} "
            f"prunable layers, {100 * total_sparsity:.1f}% zero), {human(stats.macs)} MACs")


def render_transformer(blocks: list[AttentionBlock], ffns: list[FeedForward]) -> str:
    """Per attention block its heads, head dim and removable units; per FFN its width (empty without attention)."""
    if not blocks:
        return ""
    rows = [[b.softmax, str(b.heads or "?"), str(b.head_dim or "?"), str(b.units or "frozen"), human(b.macs),
             b.note] for b in blocks]
    text = "attention blocks (MACs: scores and context MatMuls)\n" + _table(
        ["softmax", "heads", "head dim", "removable units", "MACs", "note"], rows)
    if ffns:
        text += "\nfeed-forward layers\n" + _table(
            ["layer", "width", "removable", "note"], [[f.layer, str(f.width), "yes" if f.removable else "no", f.note]
                                                      for f in ffns])
    return text


def prune_dict(report: PruneReport) -> dict:
    data = {
        "input": report.input, "output": report.output, "output_size": report.output_size,
        "before": stats_dict(report.before), "after": stats_dict(report.after), "round_to": report.round_to,
        "groups": [vars(g) for g in report.groups], "notes": report.notes,
        "hidden": None if report.hidden is None else vars(report.hidden),
        "recovery": None if report.recovery is None else {
            "method": report.recovery.method, "seconds": report.recovery.seconds, "kept": report.recovery.kept,
            "output_error_before": report.recovery.output_error_before,
            "output_error_after": report.recovery.output_error_after,
            "steps": [{"output_error_before": b, "output_error_after": a} for b, a in report.recovery.steps],
            "layers": [vars(layer) for layer in report.recovery.layers]},
    }
    data["budget"] = None if report.budget is None else _budget_dict(report)
    q = report.quantization
    data["quantization"] = None if q is None else {
        "kind": q.kind, "method": q.method, "params": q.params, "zeros_before": q.zeros_before,
        "zeros_after": q.zeros_after, "sparsity_before": q.zeros_before / q.params if q.params else 0.0,
        "sparsity_after": q.zeros_after / q.params if q.params else 0.0, "float_nodes": q.float_nodes,
        "size_before": q.size_before, "size_after": q.size_after, "preprocessed": q.preprocessed,
        "bias_correction": None if q.bias_correction is None else vars(q.bias_correction)}
    if report.unstructured is not None:
        u = report.unstructured
        data["unstructured"] = {
            "params": u.params, "zeros_before": u.zeros_before, "zeros_after": u.zeros_after,
            "weights": [{"name": w.name, "node": w.node, "op": w.op, "shape": list(w.shape), "params": w.params,
                         "sparsity_before": w.zeros_before / w.params if w.params else 0.0,
                         "sparsity_after": w.zeros_after / w.params if w.params else 0.0, "skipped": w.skipped}
                        for w in u.weights],
        }
    return data


def render_prune(report: PruneReport) -> str:
    parts = []
    if report.groups:
        rows = []
        for g in report.groups:
            status = "; ".join(g.blocked) if g.blocked else (g.note or "")
            rows.append([str(g.id), g.name[:60], str(len(g.members)), f"{g.before} -> {g.after}",
                         "kept: " + status if g.blocked else status])
        parts.append(_table(["group", "producers", "members", "channels", "note"], rows))
        pruned = sum(1 for g in report.groups if g.after < g.before)
        blocked = sum(1 for g in report.groups if g.blocked)
        whole = len(report.groups) - pruned - blocked
        parts.append(f"{len(report.groups)} channel groups: {pruned} pruned, {blocked} cannot be pruned, {whole} kept "
                     f"whole by choice (reasons shown); kept counts are multiples of {report.round_to} "
                     f"(--round-to)")
    if report.unstructured is not None and report.unstructured.weights:
        u = report.unstructured
        rows = [[w.node[:50], w.op, "x".join(map(str, w.shape)), human(w.params),
                 f"{100 * w.zeros_before / w.params:.1f}%", f"{100 * w.zeros_after / w.params:.1f}%",
                 w.skipped or ""] for w in u.weights]
        parts.append(_table(["node", "op", "weight", "params", "before", "after", "skipped"], rows))
        if u.params:
            parts.append(f"weights: {100 * u.zeros_before / u.params:.1f}% -> {100 * u.zeros_after / u.params:.1f}% "
                         f"zero over {human(u.params)} parameters")
    if report.hidden is not None:
        parts.append(_render_hidden(report.hidden))
    if report.recovery is not None and report.recovery.method != "none" \
            and report.recovery.output_error_before is not None:  # else skipped; the notes say why
        r = report.recovery
        better = sum(1 for layer in r.layers if layer.accepted)
        if r.steps:  # rounds: the first one's starting error, then the error of the final model
            error = (f"{r.output_error_before:.4g} after the first round's pruning -> {r.output_error_after:.4g} "
                     f"after all {len(r.steps)} rounds")
        else:
            error = f"{r.output_error_before:.4g} -> {r.output_error_after:.4g}{'' if r.kept else ' (undone)'}"
        parts.append(f"recovery {r.method}: {len(r.layers)} layers revisited, {better} updated, output error on "
                     f"calibration data {error}, {r.seconds:.2f}s")
    if report.quantization is not None:
        parts.append(_render_quantization(report.quantization))
    if report.budget is not None:
        parts.append(_render_budget(report))
    b, a = report.before, report.after
    parts.append(f"params {human(b.params)} -> {human(a.params)} ({_ratio(a.params, b.params)}x), "
                 f"MACs {human(b.macs)} -> {human(a.macs)} ({_ratio(a.macs, b.macs)}x), "
                 f"file {human(b.file_size)}B -> {human(report.output_size)}B")
    parts += [f"note: {n}" for n in report.notes]
    parts.append(f"wrote {report.output}")
    return "\n".join(parts)


def _render_hidden(row: HiddenRow) -> str:
    share = "" if row.variance_kept is None else f"; {100 * row.variance_kept:.1f}% of the stream's variance kept"
    return (f"hidden width {row.before} -> {row.after} ({row.treatment}); {row.norms} norms, {row.writers} writer "
            f"constants, {row.readers} readers{share}; the rewrite without slicing reproduces the original (max "
            f"relative difference {row.reference_difference:.2g} on the first calibration batch)")


def _chosen_ratios(report: PruneReport) -> dict[str, float]:
    """The fraction of its channels each prunable group lost: the ratios a budget search chose."""
    return {g.name: round(1 - g.after / g.before, 4) for g in report.groups if not g.blocked and g.before > 1}


def _budget_dict(report: PruneReport) -> dict:
    b = report.budget
    return {"kind": b.kind, "target": b.target, "reached": b.reached, "method": b.method,
            "evaluations": b.evaluations, "timings": b.timings, "recoveries": b.recoveries,
            "ratios": _chosen_ratios(report),
            "rounds": [vars(r) for r in b.rounds]}


def _render_budget(report: PruneReport) -> str:
    """The search path (goal, prediction and measurement per round) and the ratio it chose per group."""
    b = report.budget
    def error(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    rows = [[str(k + 1), f"{r.goal:.3f}", f"{r.predicted:.3f}", f"{r.reached:.3f}", str(r.removed),
             f"{r.choice} ({', '.join(f'{name} {error(e)}' for name, e in r.errors.items()) or 'no other'})",
             error(r.output_error)]
            for k, r in enumerate(b.rounds)]
    path = _table(["round", "goal", "predicted", "reached", "channels removed",
                   "aim (each aim's error at the target)", "error after recovery"], rows)
    ratios = ", ".join(f"{name} {ratio:.2f}" for name, ratio in _chosen_ratios(report).items())
    return (f"budget search: --target-{b.kind} {b.target:g} ({b.method}), reached {b.reached:.3f} of the original as "
            f"measured after the last round; {b.evaluations} loss evaluations, {b.recoveries} allocations recovered to "
            f"compare"
            f"{f', {b.timings} latency timings' if b.timings else ''}\n{path}\nchosen ratio per group: {ratios}")


def _render_quantization(q: QuantizationResult) -> str:
    method = f", {q.method} calibration" if q.method else ""
    zeros = (f"weights {100 * q.zeros_before / q.params:.1f}% -> {100 * q.zeros_after / q.params:.1f}% zero over "
             f"{human(q.params)} parameters (every pruned zero kept)" if q.params else "no constant weights")
    floats = (f"{len(q.float_nodes)} nodes left float: {', '.join(q.float_nodes[:8])}"
              f"{' ...' if len(q.float_nodes) > 8 else ''}" if q.float_nodes else "no node left float")
    return (f"quantize {q.kind}{method}: {zeros}; {floats}; model {human(q.size_before)}B -> "
            f"{human(q.size_after)}B")


def check_json_target(path: str | Path, protected: Iterable[str | Path] = ()) -> Path:
    """Refuse a ``--json`` target that cannot be written, before any work or output, so that a bad path does not
    fail a run after its model was written.

    Args:
        protected: files the report must never replace (the input and output models and their data).

    Raises:
        OutputError: the path is a folder or not a regular file, its folder is missing or not writable, it is one
            of ``protected``, or it is an existing file that is not a JSON report.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"--json {path}: is a directory; give a file name for the report")
    if path.exists() and not path.is_file():
        raise OutputError(f"--json {path}: exists and is not a regular file")
    if not folder.is_dir():
        raise OutputError(f"--json {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"--json {path}: folder {folder} is not writable")
    target = path.resolve()
    clash = next((p for p in protected if Path(p).resolve() == target), None)
    if clash is not None:
        raise OutputError(f"--json {path}: refusing to write the report over the model file {clash}")
    if path.is_file():  # e.g. the input's external data file, whose name the CLI does not know before loading
        with open(path, "rb") as handle:
            start = handle.read(64).lstrip()
        if start and not start.startswith(b"{"):
            raise OutputError(f"--json {path}: exists and is not a JSON report; refusing to replace it")
    return path


def _write_failed(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"--json {path}: cannot write the report ({exc.strerror or exc})")


def write_json(data: dict, path: str | Path, protected: Iterable[str | Path] = ()) -> None:
    """Atomic JSON write: a temporary file in the same folder, then rename; nothing is left behind on failure.

    Raises:
        OutputError: see :func:`check_json_target`, or writing failed (disk full, ...).
    """
    path = check_json_target(path, protected)
    text = json.dumps(data, indent=2, default=str)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:  # O_EXCL with mode 0o666: a fresh file that gets the umask's permissions (mkstemp's would be 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write
        tmp.unlink(missing_ok=True)
        raise
