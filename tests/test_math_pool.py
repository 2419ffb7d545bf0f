"""Hard timeouts of the math checker's worker pool, from threads, asyncio and other processes."""

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rewards import math_pool
from rewards.math import stats, verify, verify_many

ROOT = Path(__file__).resolve().parent.parent
# The sine of x to a 14000-digit power: under the static guards' bound for numbers (it has a symbol),
# and evaluating it at the checker's test points runs for minutes of pure CPU, far over a 0.3 s budget.
GOLD = "x"
HOSTILE = "\\sin(x^{10^{14000}})"
TIMEOUT = 0.3


def _timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def test_overrun_is_false_counted_and_bounded_from_the_main_thread():
    verify("x+1", "1+x")  # pool started (a number is checked in the caller): the bound is on the check
    before = stats()["overruns"]
    result, elapsed = _timed(verify, GOLD, HOSTILE, timeout=TIMEOUT)
    assert result is False and elapsed < TIMEOUT + 1.0
    assert stats()["overruns"] == before + 1


def test_overrun_is_bounded_from_a_worker_thread():
    verify("x+1", "1+x")
    box = {}
    thread = threading.Thread(target=lambda: box.update(zip(("result", "elapsed"),
                                                            _timed(verify, GOLD, HOSTILE, timeout=TIMEOUT))))
    thread.start()
    thread.join(TIMEOUT + 5)
    assert box["result"] is False and box["elapsed"] < TIMEOUT + 1.0


def test_a_stuck_worker_is_killed_and_its_queued_checks_still_run():
    """A worker that stops answering (here: SIGSTOP, as if stuck in C code that ignores its timer) is
    killed after timeout + grace; the checks queued behind it go to a fresh worker."""
    pool = math_pool.CheckPool(workers=1)
    try:
        pool.map([("1", "1")], 5.0)
        worker = pool.workers[0]
        threading.Timer(0.2, os.kill, (worker.process.pid, signal.SIGSTOP)).start()
        tasks = [(GOLD, HOSTILE), ("x^2-1", "(x-1)(x+1)"), ("\\{1,2\\}", "2, 1"), ("3", "4")]
        results, elapsed = _timed(pool.map, tasks, 1.0)
        assert [r for r, _ in results] == [False, True, True, False]
        assert results[0] == (False, True) and pool.kills == 1 and pool.overruns == 1
        assert elapsed < 1.0 + 1.0 + 3.0  # the kill, then three quick checks on a fresh fork
    finally:
        pool.close()


def test_concurrent_threads_and_asyncio_get_their_own_answers():
    cases = [("7/12", "\\frac{7}{12}", True), ("x^2", "x*x", True), ("(1,2]", "(1,2)", False), ("6*x", "6y", False)]

    def worker(k, out):
        gold, pred, _ = cases[k % len(cases)]
        out[k] = verify_many([(gold, pred)] * 3 + [(GOLD, HOSTILE)], timeout=TIMEOUT)

    out = {}
    threads = [threading.Thread(target=worker, args=(k, out)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(out[k] == [cases[k % len(cases)][2]] * 3 + [False] for k in range(6))

    async def main():
        direct = verify("1/2", "0.5")  # blocking, but fine inside a coroutine
        threaded = await asyncio.gather(*(asyncio.to_thread(verify, gold, pred) for gold, pred, _ in cases))
        return direct, threaded

    direct, threaded = asyncio.run(main())
    assert direct is True and threaded == [expected for _, _, expected in cases]


def _in_forked_child(queue):
    queue.put((verify("\\sqrt{8}", "2\\sqrt{2}"), verify(GOLD, HOSTILE, timeout=TIMEOUT)))


def test_works_in_a_forked_child_and_a_fresh_interpreter():
    verify("1", "1")  # the parent has a pool; the forked child must not use the parent's workers
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_in_forked_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == (True, False)
    child.join(10)
    assert child.exitcode == 0
    script = "from rewards.math import verify; print(verify('(1,2]', '1 < x \\\\le 2'), verify('\\\\frac{1}{', '1'))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "None"], done.stderr


def test_shutdown_leaves_no_worker_behind():
    pool = math_pool.CheckPool(workers=2)
    pool.map([("1", "x")] * 8, 5.0)
    processes = [worker.process for worker in pool.workers]
    pool.close()
    assert all(not process.is_alive() for process in processes)
