"""Shared fixtures: the committed model zoo and copies of it in a temporary folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # so tests can import the oracle helper
MODELS = TESTS.parent / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"]
ZOO = sorted(name for name in MANIFEST if name.endswith(".onnx"))


@pytest.fixture
def model_copy(tmp_path):
    """Copy a zoo model (and its external data) into tmp_path; returns the copy's path."""

    def copy(name: str) -> Path:
        for extra in MANIFEST[name].get("external_data_files", []):
            shutil.copy(MODELS / extra, tmp_path / extra)
        return Path(shutil.copy(MODELS / name, tmp_path / name))

    return copy


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", help="also run the tests marked slow (what CI runs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; runs with --all (CI runs them all)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--all"):
        return
    skip = pytest.mark.skip(reason="slow: run with --all")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
