"""Our math checker (`rewards.math.verify_many`) against math-verify, on the same labelled pairs in
one run: accuracy, checks/s, latency, overruns. Writes benchmarks/results/math_checker.json.

math-verify is called the way it works best: golds wrapped in `\\boxed{}` as verl does (so a gold is
never searched for a number), its own 5 s signal timeouts, in a pool of one process per core where
each check runs on the worker's main thread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = ROOT / "tests" / "data" / "math_pairs.jsonl"
RESULT = ROOT / "benchmarks" / "results" / "math_checker.json"
TIMEOUT_S = 5.0


def _mv_check(pair: tuple[str, str]) -> tuple[bool, float]:
    from math_verify import parse, verify

    gold, pred = pair
    start = time.perf_counter()
    try:
        verdict = bool(verify(parse("\\boxed{" + gold + "}"), parse(pred)))
    except BaseException:  # math-verify's TimeoutException is a BaseException
        verdict = False
    return verdict, time.perf_counter() - start


def _mv_warm(_: int) -> None:
    _mv_check(("1", "1"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _accuracy(rows: list[dict], verdicts: list) -> dict:
    """Over labelled pairs; a gold labelled unparsable is right only when the checker says None."""
    right = [v is r["equivalent"] for r, v in zip(rows, verdicts)]
    by_category: dict[str, list[bool]] = {}
    for row, ok in zip(rows, right):
        by_category.setdefault(row["category"], []).append(ok)
    hostile_fp = sum(1 for r, v in zip(rows, verdicts) if r["category"] == "hostile" and v and not r["equivalent"])
    false_positives = sum(1 for r, v in zip(rows, verdicts) if v is True and r["equivalent"] is not True)
    return {"accuracy": round(sum(right) / len(right), 4), "false_positives": false_positives,
            "hostile_false_positives": hostile_fp,
            "by_category": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_category.items())}}


def _start_up(method: str) -> float:
    from rewards.math_pool import CheckPool

    pool = CheckPool(method=method)
    start = time.perf_counter()
    pool.map([("x^2", "x*x")] * pool.size * 2, TIMEOUT_S)
    elapsed = time.perf_counter() - start
    pool.close()
    return round(elapsed, 3)


def main() -> None:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    pairs = [(r["gold"], r["pred"]) for r in rows]
    cores = os.cpu_count() or 1

    from rewards.math import stats, verify, verify_many

    start_up = {"spawn_s": _start_up("spawn"), "forkserver_s": _start_up("forkserver")}
    verify("1", "1")  # the module pool, warm
    start = time.perf_counter()
    ours = verify_many(pairs, timeout=TIMEOUT_S)
    ours_wall = time.perf_counter() - start
    ours_latency = []
    for pair in pairs:
        start = time.perf_counter()
        verify(*pair, timeout=TIMEOUT_S)
        ours_latency.append(time.perf_counter() - start)
    ours_stats = stats()

    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_mv_warm, range(cores))
        start = time.perf_counter()
        mv = pool.map(_mv_check, pairs, chunksize=8)
        mv_wall = time.perf_counter() - start
    mv_verdicts = [v for v, _ in mv]
    mv_latency = [t for _, t in mv]

    def speed(wall: float, latency: list[float]) -> dict:
        return {"wall_s": round(wall, 3), "checks_per_s": round(len(pairs) / wall, 1),
                "latency_p50_ms": round(1000 * statistics.median(latency), 3),
                "latency_p99_ms": round(1000 * _percentile(latency, 0.99), 1),
                "latency_max_s": round(max(latency), 3)}

    result = {
        "pairs": len(pairs), "timeout_s": TIMEOUT_S,
        "ours": {**_accuracy(rows, ours), **speed(ours_wall, ours_latency),
                 "overruns": ours_stats["overruns"], "workers_killed": ours_stats["kills"],
                 "pool_start_up_s": start_up, "latency_note": "one verify() at a time, caller's wall clock"},
        "math_verify": {**_accuracy(rows, mv_verdicts), **speed(mv_wall, mv_latency),
                        "overruns": sum(1 for t in mv_latency if t >= TIMEOUT_S),
                        "latency_note": "per check inside its worker process"},
        "speed_ratio": round(mv_wall / ours_wall, 2),
        "machine": {"cpu_count": cores, "python": platform.python_version(), "platform": platform.platform(),
                    **{name: version(name) for name in ("sympy", "latex2sympy2_extended", "math-verify",
                                                        "antlr4-python3-runtime")}},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("pairs", "speed_ratio")} | {
        name: {k: result[name][k] for k in ("accuracy", "checks_per_s", "latency_p50_ms", "latency_p99_ms",
                                            "hostile_false_positives", "overruns")}
        for name in ("ours", "math_verify")}, indent=2))


if __name__ == "__main__":
    main()
