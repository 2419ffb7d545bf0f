"""benchmarks/moe_rl.py refuses bad arguments before any work (its SFT run alone takes minutes).
The figures themselves are the benchmark's."""

import subprocess
import sys

import pytest

from conftest import ROOT, pipeline_env


@pytest.mark.parametrize("args, said", [
    (["--grpo-seeds", "0,one"], "--grpo-seeds: '0,one' is not a comma-separated list of integers"),
    (["--variants", "baseline,fp9"], "--variants: unknown ['fp9']"),
])
def test_bad_arguments_are_refused_before_any_work(args, said, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_rl.py"), "--runs-dir", str(tmp_path), *args],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())  # no run was started
