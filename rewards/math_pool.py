"""A pool of killable worker processes that run math checks under a hard wall-clock timeout.

Why processes: sympy and the ANTLR parser can run for minutes on hostile input, inside C code that
ignores signals, and a thread cannot be stopped (and starves the caller through the GIL). So each
check runs in a worker's main thread under `setitimer` (a cheap early exit for Python-level work),
and the caller kills the worker with SIGKILL when a check overruns its timeout by `GRACE_S`, then
starts a fresh one; the checks queued behind it go to the fresh worker.

Workers come from a `forkserver` with the checker preloaded: forking from the training process
(torch threads) is unsafe, `spawn` costs a full sympy import per respawn, and the forkserver forks
an already-imported interpreter (see benchmarks/results/math_checker.json for the start-up times).
The pool is safe to use from many threads at once, from asyncio (via threads) and from child
processes (a process that finds a pool made by its parent makes its own).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import queue
import resource
import signal
import sys
import threading
import types
from collections import deque

GRACE_S = 0.5  # the caller's kill comes this long after the worker's own timer
# A worker's address space: sympy on a hostile expression can grow by gigabytes within one timeout,
# on machines shared with training; over the cap, allocation fails (MemoryError: the check is False).
WORKER_MEMORY_BYTES = 4 << 30
STARTUP_TIMEOUT_S = 120.0
PRELOAD = ["rewards.math_warm"]  # imports the checker and warms it up, once, in the forkserver


class _Overrun(BaseException):
    """Raised by the worker's timer; a BaseException so that no `except Exception` inside the parser
    swallows it. It never leaves the worker."""


def _on_timer(signum, frame):
    raise _Overrun


def _serve(conn) -> None:
    """A worker's main loop: batches of (index, gold, pred[, options], timeout) in, (index, result,
    overran) out."""
    import rewards.math_warm  # noqa: F401  (already imported, and warm, in a forkserver's child)
    from rewards.math_equiv import check

    signal.signal(signal.SIGALRM, _on_timer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, hard))
    conn.send("ready")
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for index, *task, timeout in batch:  # task: (gold, pred) or (gold, pred, options)
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    result, overran = check(*task), False
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _Overrun:
                result, overran = False, True
            except Exception:  # a checker error scores the prediction wrong, never right
                result, overran = False, False
            conn.send((index, result, overran))


_main_lock = threading.Lock()


@contextlib.contextmanager
def _without_main():
    """Start workers without the caller's `__main__`: spawn and forkserver children otherwise re-run
    the caller's script (which fails unless it has the `if __name__ == "__main__"` guard, and imports
    torch and the trainer into every worker). The workers need nothing from it."""
    with _main_lock:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


class _Worker:
    def __init__(self, context):
        self.context = context
        self.process = None
        self.conn = None

    def start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_serve, args=(child,), daemon=True, name="math-check")
        with _without_main():
            self.process.start()
        child.close()
        self.conn = parent
        if not parent.poll(STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"math-check worker did not start within {STARTUP_TIMEOUT_S} s")
        parent.recv()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process = self.conn = None

    def run(self, tasks: list, results: list, timeout: float) -> tuple[list, int]:
        """Run tasks, writing (result, overran) into `results`; returns the tasks left over after an
        overrun (for another worker) and the number of kills."""
        if self.process is None or not self.process.is_alive():
            self.kill()
            self.start()
        self.conn.send(tasks)
        for k, (index, *_rest) in enumerate(tasks):
            try:
                if self.conn.poll(timeout + GRACE_S):
                    got, result, overran = self.conn.recv()
                    results[got] = (result, overran)
                    continue
                results[index] = (False, True)
            except (EOFError, OSError):  # the worker died (killed for memory, crashed in C)
                results[index] = (False, False)
            self.kill()
            return tasks[k + 1:], 1
        return [], 0


def _forkserver_usable() -> bool:
    """False in a forked child of a process that started the forkserver: the server is its parent's."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
        return True
    except ChildProcessError:
        return False


class CheckPool:
    """`map(tasks, timeout)` runs (gold, pred) checks on `workers` processes, chunked so that one
    GRPO group's completions (same gold) mostly share a worker and its parsed-gold cache."""

    def __init__(self, workers: int | None = None, method: str = "forkserver"):
        self.size = workers or min(2, os.cpu_count() or 1)
        if self.size < 1:
            raise ValueError(f"workers = {workers!r} must be at least 1")
        if method == "forkserver" and not _forkserver_usable():
            method = "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(PRELOAD)
        self.workers = [_Worker(context) for _ in range(self.size)]
        self.idle: queue.Queue = queue.Queue()
        for worker in self.workers:
            self.idle.put(worker)
        self.lock = threading.Lock()
        self.checks = self.overruns = self.kills = 0

    def map(self, tasks: list[tuple], timeout: float) -> list[tuple[bool | None, bool]]:
        results: list = [None] * len(tasks)
        chunk = max(1, min(32, len(tasks) // (self.size * 4)))
        numbered = [(i, *task, timeout) for i, task in enumerate(tasks)]
        pending = deque(numbered[i:i + chunk] for i in range(0, len(numbered), chunk))
        errors: list[BaseException] = []

        def drain() -> None:
            while True:
                with self.lock:
                    if not pending or errors:
                        return
                    batch = pending.popleft()
                worker = self.idle.get()
                try:
                    leftover, kills = worker.run(batch, results, timeout)
                except BaseException as exc:  # start-up failure: reported to the caller
                    errors.append(exc)
                    return
                finally:
                    self.idle.put(worker)
                with self.lock:
                    self.kills += kills
                    if leftover:
                        pending.appendleft(leftover)

        helpers = [threading.Thread(target=drain, daemon=True) for _ in range(min(self.size, len(pending)) - 1)]
        for helper in helpers:
            helper.start()
        drain()
        for helper in helpers:
            helper.join()
        if errors:
            raise errors[0]
        with self.lock:
            self.checks += len(tasks)
            self.overruns += sum(1 for _, overran in results if overran)
        return results

    def close(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.conn is not None:
                try:
                    worker.conn.send(None)
                    worker.process.join(0.2)
                except (OSError, ValueError):
                    pass
            worker.kill()


_pool: CheckPool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def get_pool() -> CheckPool:
    """The module's pool, made on first use; a child process never reuses its parent's workers."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = CheckPool(int(os.environ.get("R1_MATH_WORKERS", "0")) or None)
            _pool_pid = os.getpid()
        return _pool


def shutdown() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool = None


atexit.register(shutdown)
