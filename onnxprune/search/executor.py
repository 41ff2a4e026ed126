"""Run independent evaluation tasks in a local process pool or on a Ray cluster, with one API.

Why one API: sensitivity analysis and budget search both evaluate many candidates (a group at a ratio, a budget
allocation) that share the same heavy inputs (the model's bytes, calibration and validation arrays) and do not
depend on each other. :func:`run_tasks` ships the shared inputs once per worker, runs the tasks, and returns the
results in task order, so the caller's code is the same for 1 process, N local processes or a cluster, and the
results are identical for deterministic tasks.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits

from onnxprune.errors import ConfigError, OnnxPruneError
from onnxprune.progress import progress as progress_bar

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

RAY_HINT = "pip install 'onnxprune[ray]' (or pip install 'ray[default]')"
MAX_RETRIES = 3  # Ray: re-runs of a task whose worker died (a raised exception is never retried)

_THREADS: contextvars.ContextVar[int] = contextvars.ContextVar("onnxprune_worker_threads", default=0)
_SHARED: dict[str, Any] = {}  # inside a worker process: the shared inputs, set once per run


def worker_threads() -> int:
    """The onnxruntime intra-op thread count a task should give its sessions (0: onnxruntime's default).

    Inside :func:`run_tasks` this is its ``threads`` argument, in every kind of worker; outside it is 0."""
    return _THREADS.get()


def run_tasks(fn: Callable[[S, T], R], shared: S, tasks: Sequence[T], workers: int = 1, ray: str | None = None,
              progress: str | None = "tasks", threads: int = 1, max_retries: int = MAX_RETRIES) -> list[R]:
    """Run ``fn(shared, task)`` for every task and return the results in task order.

    Args:
        fn: a module-level function (it is pickled by reference to reach spawned processes and Ray workers). It
            must be deterministic for the results to be identical across kinds of run. It gives its onnxruntime
            sessions :func:`worker_threads` intra-op threads. When it raises, the first failure to arrive is
            re-raised here and the remaining tasks are cancelled: an :class:`~onnxprune.errors.OnnxPruneError` as
            itself from every kind of run, other exceptions as themselves locally and wrapped by Ray on Ray.
        shared: the inputs every task reads (model bytes, numpy arrays, options): pickled and shipped ONCE per
            worker process (local: the pool's initializer; Ray: one ``ray.put`` into the object store, fetched once
            by each Ray worker process), never once per task. Tasks must not modify it.
        tasks: small picklable descriptions of the work (e.g. a group id and a ratio), shipped one by one.
        workers: local processes. 1 runs every task in this process (no pickling at all); N > 1 starts N processes
            with the ``spawn`` context (safe with onnxruntime's threads). Ignored with ``ray``.
        ray: ``None`` for local; ``"auto"`` starts a local Ray instance (or joins the one already initialised in
            this process, or the cluster ``RAY_ADDRESS`` names); any other value is a cluster address for
            ``ray.init(address=...)``, e.g. ``ray://head:10001`` or ``head:6379``. A Ray instance this call started
            is shut down before it returns.
        progress: the label of a progress bar over tasks (drawn only on a terminal), or None for no bar.
        threads: onnxruntime intra-op threads per worker (default 1: workers, not threads, use the cores).
        max_retries: Ray only: how often a task is re-run when its worker process dies.

    Returns:
        ``[fn(shared, t) for t in tasks]``, computed where asked.

    Raises:
        ConfigError (exit 2): ``workers < 1``; ``ray`` given but the ``ray`` package is not installed; the cluster
        cannot be reached. The OnnxPruneError a task raised. Terminated/KeyboardInterrupt (Ctrl-C, SIGTERM) after
        every worker process this call started has been stopped: nothing is left running.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1")
    tasks = list(tasks)
    if not tasks:
        return []
    bar = progress_bar(len(tasks), progress) if progress is not None else contextlib.nullcontext(_no_bar)
    with bar as advance:
        if ray is not None:
            return _run_ray(fn, shared, tasks, ray, threads, max_retries, advance)
        if workers == 1 or len(tasks) == 1:
            return _run_here(fn, shared, tasks, threads, advance)
        return _run_pool(fn, shared, tasks, min(workers, len(tasks)), threads, advance)


def _no_bar(n: int = 1) -> None:
    """The progress callback when no bar is wanted."""


def _blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """numpy's BLAS (recovery's solvers) limited to the worker's threads, in every kind of worker. Why: N workers
    with one BLAS thread per core each fight over N cores, and a BLAS sum over a different number of threads
    rounds differently: lsq results on large layers would then differ between 1 local worker, N, and Ray."""
    return threadpool_limits(limits=threads, user_api="blas") if threads > 0 else contextlib.nullcontext()


def _run_here(fn: Callable, shared: Any, tasks: list, threads: int, advance: Callable[[int], None]) -> list:
    token = _THREADS.set(threads)
    try:
        with _blas_threads(threads):
            results = []
            for task in tasks:
                results.append(fn(shared, task))
                advance(1)
            return results
    finally:
        _THREADS.reset(token)


def _init_worker(shared: Any, threads: int) -> None:
    """Pool initializer: keep the shared inputs for every task of this process. Ctrl-C in a terminal reaches the
    whole process group: the parent decides, so a worker ignores SIGINT and is stopped by the parent instead. The
    worker was started with SIGINT blocked (see :func:`_signals_deferred`); one that arrived meanwhile is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _SHARED["value"] = shared
    _THREADS.set(threads)
    if threads > 0:
        threadpool_limits(limits=threads, user_api="blas")  # set on the call, for the life of this process


def _pool_task(fn: Callable, task: Any) -> Any:
    return fn(_SHARED["value"], task)


def _run_pool(fn: Callable, shared: Any, tasks: list, workers: int, threads: int,
              advance: Callable[[int], None]) -> list:
    others = set(multiprocessing.active_children())  # processes this call did not start are never stopped by it
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(shared, threads))
    try:
        with _signals_deferred():  # the workers start during these submits
            futures = [pool.submit(_pool_task, fn, task) for task in tasks]
        for future in cf.as_completed(futures):
            future.result()  # the first failure stops the run
            advance(1)
        results = [f.result() for f in futures]
    except cf.process.BrokenProcessPool:
        _stop(pool, others)
        raise OnnxPruneError("a worker process died (out of memory or killed); rerun with fewer --workers") from None
    except BaseException:
        _stop(pool, others)  # an error, Ctrl-C or SIGTERM: no worker outlives the call
        raise
    pool.shutdown(wait=True)
    return results


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While workers start, hold Ctrl-C and SIGTERM back and act on them right after.

    Why: starting a spawned worker writes the shared inputs into a pipe the new process reads while it imports; an
    exception raised in the middle (Python runs signal handlers between any two bytecodes) would leave a process
    that is started but not yet known to the pool or to multiprocessing. The workers themselves start with SIGINT
    blocked (a mask survives fork and exec, a Python handler does not) and ignore it from their initializer on, so
    a terminal's Ctrl-C, sent to the whole process group, reaches this process only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not None:  # None: a handler installed from C, left alone
            signal.signal(sig, lambda signum, frame: received.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])  # the handler this process had, now


def _stop(pool: cf.ProcessPoolExecutor, others: set) -> None:
    """Cancel what has not started and terminate the worker processes now (not after their current task): every
    live child process that ``others`` (the children from before the pool) does not hold."""
    pool.shutdown(wait=False, cancel_futures=True)
    workers = [p for p in multiprocessing.active_children() if p not in others]
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the ray package: {RAY_HINT}") from None
    return ray


def _ray_task(fn: Callable, shared: list, task: Any, threads: int) -> Any:
    """What a Ray worker runs. ``shared`` is ``[ObjectRef]``: wrapped, so Ray does not resolve it for every task;
    the worker fetches and deserialises it once and keeps it for the next tasks of the same run."""
    ref = shared[0]
    if _SHARED.get("ray_ref") != ref.hex():
        import ray

        _SHARED.clear()  # a previous run's inputs
        _SHARED.update(ray_ref=ref.hex(), value=ray.get(ref))
    token = _THREADS.set(threads)
    try:
        with _blas_threads(threads):
            return fn(_SHARED["value"], task)
    finally:
        _THREADS.reset(token)


def _run_ray(fn: Callable, shared: Any, tasks: list, address: str, threads: int, max_retries: int,
             advance: Callable[[int], None]) -> list:
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError by cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--ray {address}: cannot connect: {first}") from None
    refs: list = []
    try:
        remote = ray.remote(num_cpus=threads or 1, max_retries=max_retries)(_ray_task)
        shared_ref = ray.put(shared)  # once: every task reads the same object
        refs = [remote.remote(fn, [shared_ref], task, threads) for task in tasks]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            _ray_get(ray, done)  # the first failure stops the run
            advance(len(done))
        return _ray_get(ray, refs)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _ray_get(ray: Any, refs: list) -> list:
    """``ray.get``, with a task's own OnnxPruneError re-raised as itself instead of Ray's wrapper."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, OnnxPruneError):
            raise exc.cause from None
        raise
