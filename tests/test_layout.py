"""The folders read like the pipeline, and imports run one way: a stage imports only earlier stages (and the shared
leaf modules), never a later one. Read from the source with ast, so an import anywhere (even inside a function)
counts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "onnxprune"
LEAVES = {"errors", "finite", "progress", "formatting"}  # shared by every stage, importing none of them
STAGES = ["graph", "channels", "data", "importance", "prune", "recovery", "quantize", "passes", "pipeline", "validate",
          "search", "report", "cli"]


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxprune"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("onnxprune"))
    return names


def test_imports_run_from_later_stages_to_earlier_ones():
    backward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("__init__", "__main__"):
            continue  # the public API and the entry point sit above every stage
        here = parts[0]
        for name in _imports(path):
            there = _stage(name)
            if there in LEAVES or there not in STAGES or there == here:
                continue
            if here in LEAVES or STAGES.index(there) > STAGES.index(here):
                backward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert backward == [], "\n".join(backward)


def test_every_module_belongs_to_a_stage_or_is_a_shared_leaf():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"} - LEAVES - set(STAGES)
    assert loose == set()
