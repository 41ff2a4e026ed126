"""Running the real console entry point in-process, error mapping included, and the folder snapshot that shows a run
changed nothing (shared by the CLI-level and output tests)."""

from __future__ import annotations

from pathlib import Path


def run_main(argv: list[str | Path], capture) -> tuple[int, str, str]:
    """``onnxprune ARGV`` through main(), as the console script runs it: (exit code, stdout, stderr) of this run.

    ``capture`` is pytest's ``capsys``, or ``capfd`` to see what onnxruntime's C++ side prints as well."""
    from onnxprune.cli.main import main

    capture.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capture.readouterr()
    return code, out, err


def assert_one_error(err: str, *fragments: str) -> None:
    """``err`` is one line, ``onnxprune: error: ...``, holding every fragment."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxprune: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """What is directly in ``folder``: each file's bytes, None for a folder; equal before and after a run that must
    add, remove or change nothing."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}
