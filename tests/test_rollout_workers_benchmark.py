"""benchmarks/rollout_workers.py runs end to end where `make bench` runs it with no checkpoint (a freshly
initialised tiny policy), and checks that the two sides' samples agree. The figures are the benchmark's."""

import json
import subprocess
import sys

from conftest import ROOT, pipeline_env


def test_the_benchmark_runs_on_a_fresh_policy_and_finds_the_same_samples_on_both_sides(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_workers.py"), "--checkpoint",
                           str(tmp_path / "none"), "--num-problems", "8", "--reps", "1", "--out", str(out)],
                          env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a freshly initialised tiny policy" in done.stderr
    result = json.loads(out.read_text())
    assert result["same_samples"] and result["rows"] == 8 and result["setting"] == "eval"
    assert len(result["one_process_s"]) == len(result["workers_s"]) == 1 and result["speedup"] > 0
