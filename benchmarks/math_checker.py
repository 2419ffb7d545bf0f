"""Our math checker (`rewards.math.verify_many`) against math-verify 0.9.0, in one run, on two sets:

1. tests/data/math_pairs.jsonl, the project's labelled pairs, reported per split: `original` (written
   with the first checker), `heldout` (written before issue 18's changes, from its classes), `real`
   (completions sampled from the embedded default) and `dev` (written while making those changes).
   math-verify is called the way it works best: the gold wrapped in `\\boxed{}` as verl does (so a
   gold is never searched for a number), its own 5 s signal timeouts.
2. benchmarks/data/math_verify_suite.jsonl, math-verify's own public test suite (converted once by
   benchmarks/data/convert_math_verify_tests.py), per test file. math-verify is called exactly as each
   of its tests calls it (`own`: extraction targets, precision, strict, allow_set_relation_comp) and,
   for reference, the boxed-gold way. Ours is called two ways: with its defaults, verify(gold, pred),
   and `own`: with the options the test passes math-verify explicitly, under the same names
   (rewards.math_equiv.Options: precision as float_rounding, strict, allow_set_relation_comp); where
   a test leaves an option at math-verify's default, ours keeps its own default.

Speed is measured on set 1, which holds pathological inputs (the `hostile` category): checks/s over
the whole set (ours: verify_many, its worker pool; math-verify: a pool of one process per core, each
check on a worker's main thread), the median of ROUNDS alternating passes, and per-check latency
(ours: one verify() at a time, the caller's wall clock; math-verify: inside its worker).
Writes benchmarks/results/math_checker.json.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "math_pairs.jsonl"
SUITE = ROOT / "benchmarks" / "data" / "math_verify_suite.jsonl"
RESULT = ROOT / "benchmarks" / "results" / "math_checker.json"
TIMEOUT_S = 5.0
ROUNDS = 3


def _mv_check(task: tuple[str, str, object]) -> tuple[bool, float]:
    """One math-verify check: `call` is "boxed" (the gold wrapped in \\boxed{}), "parse_verify", or
    the compare_strings options of math-verify's tests/test_all.py."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold, pred, call = task
    start = time.perf_counter()
    try:
        if call == "boxed":
            verdict = verify(parse("\\boxed{" + gold + "}"), parse(pred))
        elif call == "parse_verify":
            verdict = verify(parse(gold), parse(pred))
        else:
            targets = [LatexExtractionConfig(boxed_match_priority=0) if kind == "latex" else ExprExtractionConfig()
                       for kind in call["match_types"]]
            verdict = verify(parse(gold, targets), parse(pred, targets), float_rounding=call.get("precision", 6),
                             strict=call.get("strict", True),
                             allow_set_relation_comp=call.get("allow_set_relation_comp", False))
        verdict = bool(verdict)
    except BaseException:  # math-verify's TimeoutException is a BaseException
        verdict = False
    return verdict, time.perf_counter() - start


def _mv_warm(_: int) -> None:
    _mv_check(("1", "1", "boxed"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _score(rows: list[dict], verdicts: list) -> dict:
    """Accuracy, false positives (True on a pair labelled not equal) and false negatives."""
    right = sum(v is r["equivalent"] for r, v in zip(rows, verdicts))
    negatives = sum(r["equivalent"] is not True for r in rows)
    false_positives = sum(1 for r, v in zip(rows, verdicts) if v is True and r["equivalent"] is not True)
    return {"pairs": len(rows), "accuracy": round(right / len(rows), 4), "false_positives": false_positives,
            "false_positive_rate": round(false_positives / len(rows), 4),
            "false_positives_of_negatives": round(false_positives / max(negatives, 1), 4),
            "false_negatives": len(rows) - right - false_positives}


def _grouped(rows: list[dict], verdicts: list, key: str) -> dict:
    groups: dict[str, tuple[list, list]] = {}
    for row, verdict in zip(rows, verdicts):
        group = groups.setdefault(row.get(key, "original"), ([], []))
        group[0].append(row)
        group[1].append(verdict)
    return {name: _score(*group) for name, group in sorted(groups.items())}


def _mv_pool(tasks: list, cores: int) -> tuple[list[bool], list[float], float]:
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_mv_warm, range(cores))
        start = time.perf_counter()
        results = pool.map(_mv_check, tasks, chunksize=8)
        wall = time.perf_counter() - start
    return [v for v, _ in results], [t for _, t in results], wall


def _ours_as_called(suite: list[dict], verify_many) -> list:
    """Ours on the suite with the options each test passes math-verify explicitly (same names)."""
    from rewards.math_equiv import Options

    def options(call) -> Options:
        call = call if isinstance(call, dict) else {}
        return Options(float_rounding=call.get("precision"), strict=call.get("strict", True),
                       allow_set_relation_comp=call.get("allow_set_relation_comp", True))

    verdicts: list = [None] * len(suite)
    groups: dict = {}
    for i, row in enumerate(suite):
        groups.setdefault(options(row["call"]), []).append(i)
    for group_options, indices in groups.items():
        found = verify_many([(suite[i]["gold"], suite[i]["pred"]) for i in indices], timeout=TIMEOUT_S,
                            options=group_options)
        for i, verdict in zip(indices, found):
            verdicts[i] = verdict
    return verdicts


def _start_up(method: str) -> float:
    """Seconds for a fresh pool to answer its first checks (math_pool.py's choice of forkserver)."""
    from rewards.math_pool import CheckPool

    pool = CheckPool(method=method)
    start = time.perf_counter()
    pool.map([("x^2", "x*x")] * pool.size * 2, TIMEOUT_S)
    elapsed = time.perf_counter() - start
    pool.close()
    return round(elapsed, 3)


def main() -> None:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    suite = [json.loads(line) for line in SUITE.read_text().splitlines() if line.strip()]
    pairs = [(r["gold"], r["pred"]) for r in rows]
    cores = os.cpu_count() or 1

    from rewards.math import stats, verify, verify_many

    from rewards import math_pool

    start_up = {"spawn_s": _start_up("spawn"), "forkserver_s": _start_up("forkserver")}
    # Throughput: ROUNDS alternating passes over the whole set, each on fresh workers (our pool is
    # restarted, so no parsed gold or parser cache survives from the pass before; math-verify gets a
    # fresh pool too), both warmed the same way first. The median ratio is reported, so that a burst
    # of load from other work on the machine during one pass does not decide it.
    ours_walls, mv_walls, overruns, kills = [], [], 0, 0
    for _ in range(ROUNDS):
        overruns, kills = overruns + stats()["overruns"], kills + stats()["kills"]
        math_pool.shutdown()
        verify_many([("x^2", "x*x"), ("x+1", "1+x")] * 8)  # every worker started (math-verify: _mv_warm)
        start = time.perf_counter()
        ours = verify_many(pairs, timeout=TIMEOUT_S)
        ours_walls.append(time.perf_counter() - start)
        mv, mv_latency, mv_wall = _mv_pool([(g, p, "boxed") for g, p in pairs], cores)
        mv_walls.append(mv_wall)
    ratios = sorted(mv / ours for mv, ours in zip(mv_walls, ours_walls))
    ours_wall, mv_wall = statistics.median(ours_walls), statistics.median(mv_walls)
    overruns, kills = overruns + stats()["overruns"], kills + stats()["kills"]
    ours_latency = []
    for pair in pairs:
        start = time.perf_counter()
        verify(*pair, timeout=TIMEOUT_S)
        ours_latency.append(time.perf_counter() - start)
    ours_suite = verify_many([(r["gold"], r["pred"]) for r in suite], timeout=TIMEOUT_S)
    ours_suite_own = _ours_as_called(suite, verify_many)

    mv_suite_own, _, _ = _mv_pool([(r["gold"], r["pred"], r["call"]) for r in suite], cores)
    mv_suite_boxed, _, _ = _mv_pool([(r["gold"], r["pred"], "boxed") for r in suite], cores)

    def speed(wall: float, latency: list[float]) -> dict:
        return {"wall_s": round(wall, 3), "checks_per_s": round(len(pairs) / wall, 1),
                "latency_p50_ms": round(1000 * statistics.median(latency), 3),
                "latency_p99_ms": round(1000 * _percentile(latency, 0.99), 1),
                "latency_max_s": round(max(latency), 3)}

    hostile = [i for i, r in enumerate(rows) if r["category"] == "hostile"]
    result = {
        "timeout_s": TIMEOUT_S,
        "grown_set": {
            "file": str(PAIRS.relative_to(ROOT)),
            "ours": {**_score(rows, ours), "by_split": _grouped(rows, ours, "split"),
                     "by_category": _grouped(rows, ours, "category"), **speed(ours_wall, ours_latency),
                     "hostile_latency_max_s": round(max(ours_latency[i] for i in hostile), 3),
                     "overruns": overruns, "workers_killed": kills,
                     "pool_start_up_s": start_up,
                     "latency_note": "one verify() at a time, caller's wall clock"},
            "math_verify_boxed_gold": {**_score(rows, mv), "by_split": _grouped(rows, mv, "split"),
                                       "by_category": _grouped(rows, mv, "category"), **speed(mv_wall, mv_latency),
                                       "hostile_latency_max_s": round(max(mv_latency[i] for i in hostile), 3),
                                       "overruns": sum(1 for t in mv_latency if t >= TIMEOUT_S),
                                       "latency_note": f"per check inside its worker process ({cores} workers)"},
            "speed_ratio": round(statistics.median(ratios), 2),
            "speed_ratios_per_round": [round(r, 2) for r in ratios],
            "wall_s_per_round": {"ours": [round(w, 3) for w in ours_walls], "math_verify": [round(w, 3) for w in mv_walls]},
        },
        "math_verify_suite": {
            "file": str(SUITE.relative_to(ROOT)),
            "ours": {**_score(suite, ours_suite), "by_file": _grouped(suite, ours_suite, "file")},
            "ours_own_calls": {**_score(suite, ours_suite_own), "by_file": _grouped(suite, ours_suite_own, "file")},
            "math_verify_own_calls": {**_score(suite, mv_suite_own), "by_file": _grouped(suite, mv_suite_own, "file")},
            "math_verify_boxed_gold": {**_score(suite, mv_suite_boxed),
                                       "by_file": _grouped(suite, mv_suite_boxed, "file")},
            "ours_wrong": [{"file": r["file"], "test": r["test"], "gold": r["gold"][-80:], "pred": r["pred"][-80:],
                            "label": r["equivalent"], "ours": v}
                           for r, v in zip(suite, ours_suite) if v is not r["equivalent"]],
            "ours_own_calls_wrong": [{"file": r["file"], "test": r["test"], "gold": r["gold"][-80:],
                                      "pred": r["pred"][-80:], "call": r["call"], "label": r["equivalent"], "ours": v}
                                     for r, v in zip(suite, ours_suite_own) if v is not r["equivalent"]],
        },
        "machine": {**host.describe(), **{name: version(name) for name in
                                          ("sympy", "latex2sympy2_extended", "math-verify", "antlr4-python3-runtime")}},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    grown, mv_suite = result["grown_set"], result["math_verify_suite"]
    summary = {"speed_ratio": grown["speed_ratio"], "speed_ratios_per_round": grown["speed_ratios_per_round"]}
    for name in ("ours", "math_verify_boxed_gold"):
        summary[f"grown/{name}"] = {k: grown[name][k] for k in ("pairs", "accuracy", "false_positives",
                                                                "false_negatives", "checks_per_s", "latency_p99_ms")}
    for name in ("ours", "ours_own_calls", "math_verify_own_calls", "math_verify_boxed_gold"):
        summary[f"suite/{name}"] = {k: mv_suite[name][k] for k in ("pairs", "accuracy", "false_positives",
                                                                   "false_negatives")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
