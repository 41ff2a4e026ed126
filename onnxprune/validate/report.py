"""The validation report: one object behind the human table, the JSON file and the CI thresholds.

Why one object: ``onnxprune validate`` and ``onnxprune MODEL --validate`` must print, serialise and gate on exactly
the same numbers. The JSON layout is versioned by ``schema`` and documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.formatting import human, table
from onnxprune.errors import ValidationFailed

SCHEMA = "onnxprune.validate/1"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | int | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    return table(headers, rows, indent="  ")  # indented under its section title


def _ratio(after: float | int | None, before: float | int | None) -> float | None:
    return after / before if after is not None and before else None


@dataclass
class ValidationReport:
    """Everything ``validate`` measured; see the README's "Validation JSON" section for the schema."""

    original: str
    pruned: str
    data: dict
    outputs: dict[str, dict]
    accuracy: dict | None = None
    latency: list[dict] = field(default_factory=list)
    size: dict = field(default_factory=dict)
    mobile: dict | None = None
    ort_export: list[str] | None = None
    thresholds: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    # ---- thresholds -------------------------------------------------------------------------------------------
    def failures(self) -> list[str]:
        """Human messages for every exceeded threshold (empty when all pass or none were set)."""
        out = []
        drop_max = self.thresholds.get("max_accuracy_drop")
        if drop_max is not None and self.accuracy is not None:
            drop = self.accuracy["top1_drop"]
            if drop > drop_max + 1e-12:
                out.append(f"top-1 accuracy dropped by {100 * drop:.2f} points "
                           f"({_pct(self.accuracy['original']['top1'])} -> {_pct(self.accuracy['pruned']['top1'])}), "
                           f"more than --max-accuracy-drop {drop_max:g} ({100 * drop_max:.2f} points)")
        agree_min = self.thresholds.get("min_agreement")
        cos_min = self.thresholds.get("min_cosine")
        for name, res in self.outputs.items():
            if agree_min is not None and res["top1_agreement"] is not None and res["top1_agreement"] < agree_min:
                out.append(f"output '{name}': top-1 agreement {_pct(res['top1_agreement'])} is below "
                           f"--min-agreement {agree_min:g}")
            if cos_min is not None and res["cosine_mean"] is not None and res["cosine_mean"] < cos_min:
                out.append(f"output '{name}': mean cosine similarity {res['cosine_mean']:.6f} is below "
                           f"--min-cosine {cos_min:g}")
        return out

    def check_thresholds(self) -> None:
        """Raise :class:`ValidationFailed` (exit 5) when ``--max-accuracy-drop``/``--min-agreement``/``--min-cosine``
        is exceeded."""
        failed = self.failures()
        if failed:
            raise ValidationFailed("validation failed: " + "; ".join(failed))

    # ---- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        failed = self.failures()
        return {
            "schema": SCHEMA,
            "original": self.original,
            "pruned": self.pruned,
            "data": self.data,
            "accuracy": self.accuracy,
            "outputs": self.outputs,
            "latency": self.latency,
            "size": self.size,
            "mobile": self.mobile,
            "ort_export": self.ort_export,
            "thresholds": {**self.thresholds, "passed": not failed, "failures": failed},
            "environment": self.environment,
        }

    # ---- human table ------------------------------------------------------------------------------------------
    def render(self) -> str:
        d = self.data
        parts = [f"validate {self.original} -> {self.pruned}",
                 f"data: {d['source']}, {d['samples']} samples, {'labels' if d['labels'] else 'no labels'}, "
                 f"batch {d['batch_size']}, accuracy/agreement on {d['provider']}"]
        parts += [f"  note: {note}" for note in d.get("notes", [])]
        if self.accuracy:
            a = self.accuracy
            rows = [["top-1", _pct(a["original"]["top1"]), _pct(a["pruned"]["top1"]), f"{100 * a['top1_drop']:.2f}"]]
            if a["original"]["top5"] is not None:
                rows.append(["top-5", _pct(a["original"]["top5"]), _pct(a["pruned"]["top5"]),
                             f"{100 * a['top5_drop']:.2f}"])
            parts += ["", f"accuracy (output '{a['output']}', {a['classes']} classes, {a['samples']} samples)",
                      _table(["metric", "original", "pruned", "drop (points)"], rows)]
        rows = []
        for name, r in self.outputs.items():
            snr = f"{r['snr_db']:.1f}" if r["snr_db"] is not None else ("inf" if r["identical"] else "-")
            rows.append([name, _pct(r["top1_agreement"]), _num(r["cosine_mean"], "{:.6f}"),
                         _num(r["cosine_min"], "{:.6f}"), f"{r['max_abs_error']:.3g}", f"{r['mean_abs_error']:.3g}",
                         snr])
        parts += ["", "agreement (pruned against original)",
                  _table(["output", "top-1 agree", "cosine mean", "cosine min", "max abs err", "mean abs err",
                         "SNR dB"], rows)]
        if self.latency:
            first = self.latency[0]
            rows = []
            for lat in self.latency:
                o, p = lat["original"], lat["pruned"]
                on_device = lat.get("device") and lat.get("session_providers", [""])[0] != "CPUExecutionProvider"
                rows.append([lat["provider"] + (f" on {lat['device']}" if on_device else ""),
                             f"{o['median_ms']:.3f} / {o['p90_ms']:.3f} / {o['p99_ms']:.3f}",
                             f"{p['median_ms']:.3f} / {p['p90_ms']:.3f} / {p['p99_ms']:.3f}",
                             f"{lat['speedup']:.2f}x",
                             f"{o['load_ms']:.0f} / {p['load_ms']:.0f}",
                             f"{_bytes(o['memory_bytes'])} / {_bytes(p['memory_bytes'])}"])
            parts += ["", f"latency (interleaved, {first['runs']} runs after {first['warmup']} warmup, batch "
                          f"{first['batch_size']}, threads {first['threads'] or 'default'})",
                      _table(["provider", "original ms med/p90/p99", "pruned ms med/p90/p99", "speedup",
                             "load ms orig/pruned", "memory orig/pruned"], rows)]
        if self.size:
            o, p = self.size["original"], self.size["pruned"]
            rows = [[label, fmt(o[key]), fmt(p[key]), _num(_ratio(p[key], o[key]))]
                    for label, key, fmt in (("parameters", "params", human), ("MACs/sample", "macs", human),
                                            ("file size", "file_size", _bytes))]
            parts += ["", "size", _table(["", "original", "pruned", "pruned/original"], rows)]
        if self.mobile:
            parts += ["", *mobile_section(self.mobile)]
        if self.ort_export:
            parts += ["", "ORT format export: " + ", ".join(self.ort_export)]
        failed = self.failures()
        if self.thresholds and any(v is not None for v in self.thresholds.values()):
            parts += ["", "thresholds: " + ("FAILED: " + "; ".join(failed) if failed else "passed")]
        return "\n".join(parts)


def mobile_section(reports: dict[str, dict]) -> list[str]:
    """The mobile readiness table, one column per checked model (``{"original": ..., "pruned": ...}`` in
    ``validate``; the final model alone after ``prune --export-ort`` without ``--validate``)."""
    lines = ["mobile readiness (onnxruntime usability check: supported nodes, partitions, verdict)"]
    rows = []
    for key, label in (("nnapi", "NNAPI"), ("coreml_neuralnetwork", "CoreML NeuralNetwork"),
                       ("coreml_mlprogram", "CoreML MLProgram")):
        rows.append([label] + [_mobile_cell(report, key) for report in reports.values()])
    lines.append(_table(["provider", *reports], rows))
    for which, report in reports.items():
        if report.get("dynamic_inputs"):
            lines.append(f"  {which}: dynamic inputs {', '.join(report['dynamic_inputs'])}; "
                         "'fixed:' is the verdict with fixed shapes "
                         "(python -m onnxruntime.tools.make_dynamic_shape_fixed)")
            break
    return lines


def render_shipped(shipped: dict) -> str:
    """What :func:`~onnxprune.validate.mobile.ship_for_mobile` returned, as text."""
    parts = ["", *mobile_section({"final model": shipped["mobile"]})] if shipped["mobile"] else []
    return "\n".join([*parts, "", "ORT format export: " + ", ".join(shipped["ort_export"])])


def _mobile_cell(report: dict, key: str) -> str:
    if "error" in report:
        return f"error: {report['error']}"
    entry = report[key]
    cell = f"{entry['supported_nodes']}/{entry['nodes']} nodes, {entry['partitions']} part., {entry['suitability']}"
    fixed = entry.get("if_shapes_fixed")
    if fixed:
        cell += f" (fixed: {fixed['supported_nodes']}/{entry['nodes']}, {fixed['partitions']} part., " \
                f"{fixed['suitability']})"
    if entry["unsupported_ops"]:
        cell += f"; unsupported: {', '.join(op.split(':')[-1] for op in entry['unsupported_ops'])}"
    return cell
