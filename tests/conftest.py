import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Tests never download (nothing may, here). huggingface_hub reads this when first imported, so a test that
# only sets it later would still wait for network time-outs (24 s for one hub name that does not exist).
os.environ["HF_HUB_OFFLINE"] = "1"

# Small enough for seconds on 2 cores, large enough to exercise every code path.
FAST_DATA = ["data.num_train=96", "data.num_heldout=16"]
# Stages 1 and 3 start from the preset (tiny.yaml: from stage 0's base) unless a test runs stage 0 (FAST_BASE).
FAST_BASE = ["base.max_steps=3", "base.save_steps=2", "base.per_device_train_batch_size=4", "base.logging_steps=1",
             "base.warmup_steps=0", "base.documents=40", "base.max_length=64", "sft.init_from=base",
             "rejection.init_from=base"]
FAST_SFT = ["sft.init_from=model", "sft.max_steps=6", "sft.save_steps=2", "sft.per_device_train_batch_size=8", "sft.logging_steps=1",
            "sft.warmup_steps=0"]
FAST_GRPO = ["grpo.max_steps=6", "grpo.save_steps=2", "grpo.per_device_train_batch_size=8",
             "grpo.num_generations=4", "grpo.max_completion_length=12"]
FAST_REJECTION = ["rejection.init_from=model", "rejection.max_steps=4", "rejection.save_steps=2", "rejection.per_device_train_batch_size=8",
                  "rejection.logging_steps=1", "rejection.warmup_steps=0", "rejection.sampling.num_prompts=12",
                  "rejection.sampling.max_new_tokens=24", "rejection.accept_threshold=0.0"]
FAST_ALIGN = ["align.max_steps=4", "align.save_steps=2", "align.per_device_train_batch_size=8",
              "align.num_generations=4", "align.max_completion_length=12", "align.reward_model.num_pairs=64",
              "align.reward_model.max_steps=4"]
FAST_DISTILL = ["distill.max_steps=2", "distill.save_steps=2", "distill.per_device_train_batch_size=8",
                "distill.logging_steps=1", "distill.warmup_steps=0", "distill.sampling.num_prompts=12",
                "distill.sampling.max_new_tokens=24", "distill.accept_threshold=0.0"]
FAST_EVAL = ["eval.k=2", "eval.num_problems=4", "eval.max_new_tokens=12", "eval.general_prompts=4"]


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory):
    """A local hub mirror (R1PIPELINE_HUB_MIRROR) of every model and dataset the shipped recipes name:
    tiny random models of their architectures and the hand-written fixtures (tests/hub_mirror.py)."""
    import hub_mirror as mirror

    return mirror.build(tmp_path_factory.mktemp("hub-mirror"))


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
