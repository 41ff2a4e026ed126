"""The output commit protocol (graph/io.py): an earlier output survives any failure, interrupt or kill of a later run;
a new output appears complete and checked or not at all; no run leaves files behind (a killed one's are swept)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxprune.graph.io as io
from onnxprune.errors import OutputError
from onnxprune.graph.io import load_model, save_model, sweep_leftovers
from onnxprune.pipeline import PruneOptions, prune_file

from cli_support import snapshot

RUN_FILE = io._RUN_DATA, io._TEMP_MODEL


def _mlp(path: Path, width: int, layers: int, external: bool) -> Path:
    """A Gemm/Relu chain of ``layers`` square layers: channels prune through it, and its size is chosen by width."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{k}")]
        nodes += [helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [f"g{k}"], transB=1),
                  helper.make_node("Relu", [f"g{k}"], [f"r{k}"])]
        x = f"r{k}"
    nodes[-1] = helper.make_node("Identity", [f"g{layers - 1}"], ["y"])
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path, save_as_external_data=external, location=path.name + ".data", size_threshold=0)
    return path


def _run(path: Path) -> np.ndarray:
    """The saved model's output on a fixed input: loading and running it is the proof that the pair is complete."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    width = session.get_inputs()[0].shape[1]
    x = np.random.default_rng(1).standard_normal((2, width)).astype(np.float32)
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True])
def test_failed_check_keeps_the_previous_output(tmp_path, monkeypatch, external):
    """The reported loss: a second run to the same output failed its check and deleted the first run's data file."""
    model = _mlp(tmp_path / "m.onnx", 64, 3, external)
    prune_file(model, None, PruneOptions(sparsity=0.5))
    before = snapshot(tmp_path)
    expected = _run(tmp_path / "m.pruned.onnx")

    def broken(*args):
        raise OutputError("the result failed its check (injected)")

    monkeypatch.setattr(io, "_check_saved", broken)
    with pytest.raises(OutputError, match="injected"):
        prune_file(model, None, PruneOptions(channels=0.3, round_to=1))
    assert snapshot(tmp_path) == before
    np.testing.assert_array_equal(_run(tmp_path / "m.pruned.onnx"), expected)


class _DiskFull:
    """A file whose writes fail the way a full disk makes them fail."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data) -> int:
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("where", ["pruning", "check", "commit"])
@pytest.mark.parametrize("signal_like", [KeyboardInterrupt, SystemExit, OSError])
def test_interrupt_before_the_commit_leaves_nothing(tmp_path, monkeypatch, external, where, signal_like):
    """Ctrl-C (KeyboardInterrupt), SIGTERM (the CLI turns it into an exception) or a write error at any point before
    the commit: the folder is exactly as before, previous output included."""
    model = _mlp(tmp_path / "m.onnx", 64, 3, external)
    prune_file(model, None, PruneOptions(sparsity=0.3))
    before = snapshot(tmp_path)

    def interrupt(*args, **kwargs):
        raise signal_like(28, "No space left on device") if signal_like is OSError else signal_like()

    import onnxprune.passes.prepare as prepare

    if where == "pruning" and signal_like is OSError:  # disk full while streaming weights or writing the model
        fdopen = os.fdopen
        monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: _DiskFull(fdopen(fd, mode)))
    elif where == "pruning":
        monkeypatch.setattr(prepare, "model_stats", interrupt)
    elif where == "check":
        monkeypatch.setattr(io, "_check_saved", interrupt)
    else:
        monkeypatch.setattr(io, "_fsync_folder", interrupt)
        monkeypatch.setattr(io.os, "replace", interrupt)
    with pytest.raises(OutputError if signal_like is OSError else signal_like):
        prune_file(model, None, PruneOptions(channels=0.3, round_to=1))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_overwriting_an_external_output_keeps_the_conventional_name(tmp_path):
    model = _mlp(tmp_path / "m.onnx", 64, 3, True)
    for options in (PruneOptions(sparsity=0.5), PruneOptions(channels=0.25, round_to=1), PruneOptions(sparsity=0.2)):
        prune_file(model, None, options)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "m.onnx", "m.onnx.data", "m.pruned.onnx", "m.pruned.onnx.data"]
        assert io._referenced_locations(tmp_path / "m.pruned.onnx") == {"m.pruned.onnx.data"}
        _run(tmp_path / "m.pruned.onnx")


def test_external_output_replaced_by_an_inline_one_loses_its_data_file(tmp_path, monkeypatch):
    model = _mlp(tmp_path / "m.onnx", 64, 3, True)
    prune_file(model, tmp_path / "out.onnx", PruneOptions(sparsity=0.5))
    assert (tmp_path / "out.onnx.data").exists()
    inline = _mlp(tmp_path / "inline.onnx", 64, 3, False)
    prune_file(inline, tmp_path / "out.onnx", PruneOptions(sparsity=0.5))
    assert not (tmp_path / "out.onnx.data").exists()
    _run(tmp_path / "out.onnx")


def test_a_shared_data_file_of_the_replaced_output_is_not_removed(tmp_path):
    """Only names this tool gives are its to remove: an output path that held a model with some other data file."""
    other = _mlp(tmp_path / "out.onnx", 32, 2, False)
    proto = onnx.load(str(other))
    onnx.save(proto, other, save_as_external_data=True, location="shared.bin", size_threshold=0)
    model = _mlp(tmp_path / "m.onnx", 64, 3, True)
    prune_file(model, tmp_path / "out.onnx", PruneOptions(sparsity=0.5))
    assert (tmp_path / "shared.bin").exists()


def test_sweep_removes_dead_runs_files_only(tmp_path):
    """What a killed run leaves is swept by the next run writing there; a live run's files, a data file the committed
    output refers to, the input, and look-alike names of other programs are not."""
    model = _mlp(tmp_path / "m.onnx", 32, 2, True)
    prune_file(model, None, PruneOptions(sparsity=0.5))
    dead_model = tmp_path / ".m.pruned.onnx.onnxprune-0123abcd.tmp"
    dead_data = tmp_path / "m.pruned.onnx.onnxprune-89abcdef.data"
    legacy = tmp_path / ".m.pruned.onnx.data.k2j4h5g6.tmp"
    for path in (dead_model, dead_data, legacy):
        path.write_bytes(b"partial")
    lookalike = tmp_path / "notes.onnxprune.data"
    lookalike.write_bytes(b"user file")
    live = io._RunFile(tmp_path / ".m.pruned.onnx.onnxprune-fedcba98.tmp")
    try:
        if io.fcntl is not None:
            # another process holds the lock on a live run's file; flock locks are per open file, so this test's own
            # second open (in sweep) conflicts with the first just as another process's would
            removed = sweep_leftovers(tmp_path)
            assert sorted(removed) == sorted([dead_model, dead_data, legacy])
            assert live.path.exists() and lookalike.exists()
    finally:
        live.discard()
    # a data file the committed output refers to (a kill between the two renames of the commit) stays
    proto = onnx.load(str(tmp_path / "m.pruned.onnx"), load_external_data=False)
    os.link(tmp_path / "m.pruned.onnx.data", tmp_path / "m.pruned.onnx.onnxprune-00000000.data")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "m.pruned.onnx.onnxprune-00000000.data"
    onnx.save(proto, tmp_path / "m.pruned.onnx")
    (tmp_path / "m.pruned.onnx.data").unlink()
    assert sweep_leftovers(tmp_path) == []
    _run(tmp_path / "m.pruned.onnx")
    # and the next run replaces that pair with the conventional name
    prune_file(model, None, PruneOptions(sparsity=0.3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.pruned.onnx",
                                                         "m.pruned.onnx.data", "notes.onnxprune.data"]


def test_library_open_output_without_save_leaves_nothing(tmp_path):
    model = load_model(_mlp(tmp_path / "m.onnx", 32, 2, True))
    model.open_output(tmp_path / "o.onnx")
    assert any(io._RUN_DATA.match(p.name) for p in tmp_path.iterdir())
    model.discard_output()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_save_to_read_only_folder_even_as_root(tmp_path):
    """Root ignores permission bits, so when the test runs as root the save runs with an unprivileged effective uid
    (the folder is made outside pytest's private tmp folder, which that uid could not even enter)."""
    model = load_model(_mlp(tmp_path / "m.onnx", 32, 2, True))
    folder = Path(tempfile.mkdtemp(prefix="onnxprune-ro-"))
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            os.setresuid(0, 65534, 0)
        with pytest.raises(OutputError, match="not writable"):
            save_model(model, folder / "out.onnx")
    finally:
        if os.getresuid()[1] != 0:
            os.setresuid(0, 0, 0)
        leftovers = list(folder.iterdir())
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert leftovers == []
    model.discard_output()


# --- killed runs -------------------------------------------------------------------------------------------------

def _command(model: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "onnxprune", str(model), *args]


def _check_folder_after_kill(folder: Path, out: Path, allowed: list[np.ndarray], inputs: set[str]) -> None:
    """The invariant: the output is absent, or it loads with its partner and computes one of the allowed results;
    every other file is an input, the output's data file, or a file of a run pattern (swept by the next run)."""
    if out.exists():
        result = _run(out)
        assert any(np.array_equal(result, a) for a in allowed), "the output is neither the previous nor the new one"
        partners = io._referenced_locations(out)
    else:
        partners = set()
    for path in folder.iterdir():
        name = path.name
        if name in inputs or name == out.name or name in partners or any(p.match(name) for p in RUN_FILE):
            continue
        # killed in the commit's second half (after the new <out> took its name, before <out>.data did): <out> refers
        # to the run's data file; <out>.data is either already a hard link of it, or the previous output's data,
        # which no model refers to any more and the next run replaces
        assert name == out.name + ".data" and out.exists(), f"unexpected file {name}"
        assert partners and all(io._RUN_DATA.match(p) for p in partners), f"{name} is not the output's data"


def _kill_at(proc: subprocess.Popen, folder: Path, delay: float, after_save_starts: bool) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after it starts, or after its temporary model file appears (the save)."""
    start = time.perf_counter()
    if after_save_starts:
        while proc.poll() is None and not any(io._TEMP_MODEL.match(n) for n in os.listdir(folder)):
            time.sleep(0.002)
        start = time.perf_counter()
    time.sleep(max(0.0, delay - (time.perf_counter() - start)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_runs_never_break_the_output(tmp_path):
    """SIGKILL at random moments of runs writing an external-data output (a 16 MB model, so saving takes a while),
    20 times with no previous output and 20 times over a previous one: half the kills anywhere in the run, half in
    the save (from the moment its temporary model appears), where the commit happens."""
    model = _mlp(tmp_path / "m.onnx", 1024, 4, True)
    first, second = ["--sparsity", "0.5"], ["--channels", "0.3", "--round-to", "1"]
    previous_run = tmp_path / "previous"  # the earlier output, made once and copied in
    previous_run.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        shutil.copy(tmp_path / name, previous_run / name)
    subprocess.run(_command(previous_run / "m.onnx", first), check=True, capture_output=True)
    # how long a run takes, and how long its save (from the temporary model's appearance to the end): the kills are
    # spread over what this machine takes now, however loaded it is
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    proc = subprocess.Popen(_command(model, [*second, "-o", str(reference / "new.onnx")]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    save_start = None
    while proc.poll() is None:
        if save_start is None and any(io._TEMP_MODEL.match(n) for n in os.listdir(reference)):
            save_start = time.perf_counter()
        time.sleep(0.002)
    assert proc.returncode == 0
    end = time.perf_counter()
    assert save_start is not None, "the temporary model was never seen"
    duration, save = end - start, end - save_start
    expected = {"first": _run(previous_run / "m.pruned.onnx"), "second": _run(reference / "new.onnx")}
    rng = random.Random(0)
    inputs = {"m.onnx", "m.onnx.data"}
    outcomes = {"absent": 0, "previous": 0, "new": 0}
    for k in range(40):
        folder = tmp_path / f"kill{k}"
        folder.mkdir()
        previous = k % 2 == 1
        for name in ("m.onnx", "m.onnx.data", *(("m.pruned.onnx", "m.pruned.onnx.data") if previous else ())):
            shutil.copy(previous_run / name, folder / name)  # copies: onnx refuses hard-linked external data
        in_save = k % 4 >= 2
        proc = subprocess.Popen(_command(folder / "m.onnx", second), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _kill_at(proc, folder, rng.uniform(0.0, 1.5 * save) if in_save else rng.uniform(0.0, duration), in_save)
        out = folder / "m.pruned.onnx"
        allowed = [expected["second"], expected["first"]] if previous else [expected["second"]]
        _check_folder_after_kill(folder, out, allowed, inputs)
        outcome = "absent" if not out.exists() else "new" if np.array_equal(_run(out), allowed[0]) else "previous"
        outcomes[outcome] += 1
        # the next run writing there sweeps what the killed one left and commits normally
        prune_file(folder / "m.onnx", None, PruneOptions(sparsity=0.5))
        assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data", "m.pruned.onnx",
                                                           "m.pruned.onnx.data"]
        np.testing.assert_array_equal(_run(out), expected["first"])
        shutil.rmtree(folder)
    print(f"kill outcomes: {outcomes} (run {duration:.2f} s, save {save:.2f} s)")
    assert outcomes["new"] and outcomes["absent"] + outcomes["previous"], f"kills missed a side of the commit: {outcomes}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_cli_run_leaves_nothing(tmp_path, sig):
    """Ctrl-C and SIGTERM during a run: one line on stderr, the documented exit code, no file of the run left."""
    model = _mlp(tmp_path / "m.onnx", 1024, 4, True)
    proc = subprocess.Popen(_command(model, ["--channels", "0.3", "--round-to", "1"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.perf_counter() + 60  # signal once the run is writing (its handlers are installed by then)
    while proc.poll() is None and not any(io._RUN_DATA.match(n) for n in os.listdir(tmp_path)):
        assert time.perf_counter() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == (130 if sig == signal.SIGINT else 143)
    assert len(err.strip().splitlines()) == 1 and err.startswith("onnxprune: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
