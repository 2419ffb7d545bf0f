"""benchmarks/gpu_check.sh, the GPU checks in one call, tested where it can be here so that it does
not fail on first contact with a lent GPU machine: its arguments, the carry list (the wheels the GPU
machine lacks, at the versions installed here), the wheel installation of its wrapper, and a dry run of
every part at toy sizes on the CPU. What it measures on a GPU (the FP8 kernel against the emulation,
GEMM and model speed, a GRPO stage) can only run there."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import ROOT, pipeline_env

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def gpu_check(*args, env=None, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**pipeline_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [(["--parts", "fp8,nope"], "unknown ['nope']"),
                                           (["--budget", "0"], "--budget 0.0: must be > 0"),
                                           (["--parts", ""], "unknown []")])
def test_bad_arguments_are_refused_with_the_reason(args, message):
    done = gpu_check(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_carry_list_pins_the_installed_versions_and_fetches_per_python_wheels():
    done = gpu_check("--carry-list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert f"trl=={version('trl')}" in lines[0] and f"datasets=={version('datasets')}" in lines[0]
    for python in ("3.11", "3.12"):
        assert any(f"--python-version {python}" in line and f"xxhash=={version('xxhash')}" in line
                   and f"multiprocess=={version('multiprocess')}" in line for line in lines[1:])


def test_the_wrapper_installs_carried_wheels_for_this_python_and_skips_others(tmp_path):
    wheels, probe = tmp_path / "wheels", tmp_path / "wheel_probe"
    wheels.mkdir()
    shutil.copytree(ROOT / "tests" / "data" / "wheel_probe", probe)  # the build writes beside its source
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(probe)], check=True)
    (wheels / "other-1.0-py2-none-any.whl").write_bytes(b"not a wheel for this Python")
    site = tmp_path / "site"
    done = gpu_check("--carry-list", env={"GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_SITE": str(site)})
    assert done.returncode == 0, done.stderr
    assert (site / "wheel_probe" / "__init__.py").is_file()
    assert "other-1.0-py2-none-any.whl: not installable here" in done.stdout


@pytest.mark.slow
def test_a_dry_run_exercises_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--dry-run", "--out", str(out), "--budget", "1500", timeout=1600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] and summary["parts"] == {"fp8": "ok", "model": "ok", "grpo": "ok"}
    fp8 = json.loads((out / "gpu_fp8.json").read_text())
    assert "CPU" in fp8["device"] and fp8["correctness"][0]["skipped"].startswith("no SM90")
    model = json.loads((out / "gpu_model.json").read_text())
    assert {"tiny", "mid"} <= model.keys() and model["mid"]["models"]["ours"]["step_ms"] > 0
    grpo = json.loads((out / "gpu_grpo.json").read_text())
    step = grpo["lengths"]["24"]
    assert step["step_s"] > 0 and step["generation_s"] > 0 and step["timed_steps"] >= 1
