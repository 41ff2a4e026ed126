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


def table(headers: list[str], rows: list[list[str]], indent: str = "") -> str:
    """A plain left-aligned text table with a rule under the header, each line prefixed by ``indent`` (no trailing
    spaces: an empty last column leaves none)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return (indent + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])
