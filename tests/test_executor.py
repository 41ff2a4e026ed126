"""search/executor.py: results in task order from every kind of run, shared inputs shipped once per worker, a task's
error raised as itself, Ray equal to local (with a worker killed mid-task), and Ctrl-C/SIGTERM leaving no process and
no file behind (a real CLI run in its own session, signalled like a terminal does)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxprune.errors import ConfigError, DataError
from onnxprune.search.executor import run_tasks, worker_threads
from cli_support import snapshot

ROOT = Path(__file__).resolve().parents[1]
UNPICKLED = 0  # in a worker process: how often a Counted arrived there


class Counted:
    """Shared inputs that count their arrivals in a process (unpickling runs __setstate__)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __setstate__(self, state: dict) -> None:
        global UNPICKLED
        UNPICKLED += 1
        self.__dict__.update(state)


def square_plus(shared: Counted, task: int) -> tuple[int, int, int, int]:
    """(result, worker pid, arrivals of the shared inputs in this worker so far, worker threads)."""
    return task * task + shared.value, os.getpid(), UNPICKLED, worker_threads()


def fail_on_three(shared: Counted, task: int) -> int:
    if task == 3:
        raise DataError(f"task {task}: bad sample")
    return task


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_task_order_and_shared_inputs_shipped_once_per_worker(workers):
    results = run_tasks(square_plus, Counted(7), list(range(12)), workers=workers, progress=None, threads=1)
    assert [r[0] for r in results] == [t * t + 7 for t in range(12)]
    assert {r[3] for r in results} == {1}  # every task saw its worker's thread count
    pids = {r[1] for r in results}
    if workers == 1:
        assert pids == {os.getpid()} and {r[2] for r in results} == {UNPICKLED}  # no pickling in this process
    else:
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        assert {r[2] for r in results} == {1}  # 12 tasks, yet the inputs arrived once in each worker


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_error_is_raised_as_itself(workers):
    with pytest.raises(DataError, match="task 3: bad sample"):
        run_tasks(fail_on_three, Counted(0), list(range(6)), workers=workers, progress=None)


def test_no_tasks_and_bad_worker_counts():
    assert run_tasks(square_plus, Counted(0), [], workers=2) == []
    with pytest.raises(ConfigError, match="--workers 0"):
        run_tasks(square_plus, Counted(0), [1], workers=0)


def test_ray_missing_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"onnxprune\[ray\]"):
        run_tasks(square_plus, Counted(0), [1, 2], ray="auto")


def die_once(shared: tuple[str, int], task: int) -> int:
    """Kills its own worker process the first time task 2 runs (a marker file says it happened): Ray must re-run it."""
    marker = Path(shared[0])
    if task == 2 and not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return task * shared[1]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_local_results_and_retries_a_dead_worker(local_ray, tmp_path):
    local = run_tasks(square_plus, Counted(5), list(range(8)), workers=1, progress=None)
    on_ray = run_tasks(square_plus, Counted(5), list(range(8)), ray="auto", progress=None)
    assert [r[0] for r in on_ray] == [r[0] for r in local]
    assert {r[3] for r in on_ray} == {1} and {r[2] for r in on_ray} == {1}  # inputs fetched once per Ray worker
    assert local_ray.is_initialized()  # a Ray instance this call did not start is left running
    marker = tmp_path / "marker"
    assert run_tasks(die_once, (str(marker), 3), list(range(5)), ray="auto", progress=None) == [0, 3, 6, 9, 12]
    assert marker.read_text() == "died"
    with pytest.raises(DataError, match="task 3: bad sample"):
        run_tasks(fail_on_three, Counted(0), list(range(6)), ray="auto", progress=None)


@pytest.mark.slow
def test_sensitivity_on_ray_equals_local(local_ray):
    from test_sensitivity import RESNET, comparable, options

    from onnxprune.search.sensitivity import run_sensitivity

    local = run_sensitivity(str(RESNET), options(ratios=(0.25, 0.5)))
    on_ray = run_sensitivity(str(RESNET), options(ratios=(0.25, 0.5), ray="auto"))
    assert [comparable(r) for r in on_ray.rows] == [comparable(r) for r in local.rows]


def _session(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``: everything a run started, whoever its parent is now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state != "Z":
            found.append(f"{entry.name} {cmdline}")
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig, to_group, code, message", [
    pytest.param(signal.SIGINT, True, 130, "onnxprune: aborted", id="ctrl-c"),
    pytest.param(signal.SIGTERM, False, 143, "onnxprune: terminated", id="sigterm", marks=pytest.mark.slow)])
def test_interrupt_stops_every_worker_and_leaves_no_file(tmp_path, sig, to_group, code, message):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    # importing onnxruntime writes TMPDIR/.ses (its session id, kept across runs): there before any run of ours
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)
    tmp_before = snapshot(tmp)
    args = [sys.executable, "-m", "onnxprune", "sensitivity", ROOT / "models" / "digits_resnet.onnx", "--calib",
            ROOT / "models" / "digits_calib.npz", "--workers", "2", "--runs", "0", "--json", work / "s.json",
            "--plot", work / "plots"]
    run = subprocess.Popen(args, cwd=work, env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum("multiprocessing.spawn" in p for p in _session(run.pid)) < 2:  # both workers exist
            assert run.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # into the tasks
        os.killpg(run.pid, sig) if to_group else os.kill(run.pid, sig)  # a terminal's Ctrl-C reaches the group
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == code, err
    assert err.strip().splitlines() == [message]
    deadline = time.monotonic() + 10
    while _session(run.pid) and time.monotonic() < deadline:  # the resource tracker exits once it sees EOF
        time.sleep(0.1)
    assert _session(run.pid) == []
    assert snapshot(work) == {} and snapshot(tmp) == tmp_before
