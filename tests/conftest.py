import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Small enough for seconds on 2 cores, large enough to exercise every code path.
FAST_DATA = ["data.num_train=96", "data.num_heldout=16"]
FAST_SFT = ["sft.max_steps=6", "sft.save_steps=2", "sft.per_device_train_batch_size=8", "sft.logging_steps=1",
            "sft.warmup_steps=0"]
FAST_GRPO = ["grpo.max_steps=6", "grpo.save_steps=2", "grpo.per_device_train_batch_size=8",
             "grpo.num_generations=4", "grpo.max_completion_length=12"]


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _no_accelerate_env(monkeypatch):
    monkeypatch.delenv("ACCELERATE_CONFIG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def pipeline_env(extra_pythonpath=None) -> dict:
    """Environment for running `python -m r1pipeline` in a subprocess."""
    paths = [str(ROOT)] + ([str(extra_pythonpath)] if extra_pythonpath else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_CONFIG", None)
    return env
