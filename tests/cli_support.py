"""Running the real console entry point in-process, error mapping included (shared by the CLI-level tests)."""

from __future__ import annotations

import pytest


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``onnxprune ARGV`` in-process: (exit code, stdout, stderr)."""
    from onnxprune.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
