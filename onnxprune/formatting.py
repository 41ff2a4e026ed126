"""Small text helpers shared by every report (prune, inspect, validate)."""

from __future__ import annotations


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'; None -> '?'."""
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table with a rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
