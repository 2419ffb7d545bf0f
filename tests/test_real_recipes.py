"""The shipped real-model recipes run end to end on CPU: a tiny Qwen2 through `r1-qwen2.5-1.5b` (R1's
template, four stages) and a tiny Llama through `chat-llama-3.2-1b-instruct` (its chat template,
LoRA, four stages), then eval. Their hub models and datasets come from the test mirror
(tests/hub_mirror.py: tiny random models of those architectures, the hand-written dataset fixtures);
only sizes and GPU-only switches (bf16, vLLM) are overridden."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import pipeline_env
from test_stages import pipeline

pytestmark = pytest.mark.slow

CPU_SIZES = [
    "model.dtype=float32", "data.num_train=24", "data.num_heldout=4",
    *[f"{stage}.{key}" for stage in ("sft", "rejection") for key in (
        "max_steps=2", "save_steps=2", "per_device_train_batch_size=4", "gradient_accumulation_steps=1",
        "max_length=1024", "bf16=false", "gradient_checkpointing=false", "warmup_steps=0", "logging_steps=1")],
    *[f"{stage}.{key}" for stage in ("grpo", "align") for key in (
        "max_steps=2", "save_steps=2", "per_device_train_batch_size=8", "gradient_accumulation_steps=1",
        "num_generations=4", "max_completion_length=16", "bf16=false", "use_vllm=false",
        "gradient_checkpointing=false")],
    "rejection.sampling={num_samples: 2, max_new_tokens: 16, num_prompts: 8, batch_size: 32, backend: transformers}",
    "rejection.accept_threshold=0.0", "align.reward_model={num_pairs: 64, max_steps: 4}",
    "eval.k=2", "eval.max_new_tokens=16", "eval.num_problems=4", "eval.backend=transformers",
]


@pytest.mark.parametrize("recipe, architecture, prompt_format", [
    ("r1-qwen2.5-1.5b", "qwen2", "r1"),
    ("chat-llama-3.2-1b-instruct", "llama", "chat"),
])
def test_real_recipe_runs_four_stages_and_eval_on_a_stock_architecture(recipe, architecture, prompt_format, tmp_path,
                                                                        hub_mirror):
    env = {**pipeline_env(), "R1PIPELINE_HUB_MIRROR": str(hub_mirror), "HF_HUB_OFFLINE": "1"}
    runs = tmp_path / "runs"
    code, out = pipeline(runs, "real", "all", "--recipe", recipe, *CPU_SIZES, env=env)
    assert code == 0, out[-4000:]
    run = runs / "real"
    for stage in ("sft", "grpo", "rejection", "align"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert AutoConfig.from_pretrained(run / stage / "final").model_type == architecture
        evaluated = json.loads((run / "eval" / f"{stage}.json").read_text())
        assert evaluated["num_problems"] >= 1 and 0 <= evaluated["pass@1"] <= 1
    assert manifest["input"]["path"] == str(run / "rejection" / "final")
    # Stage 3 retrains the base model (`init_from: model`), read from the mirror.
    assert json.loads((run / "rejection" / "manifest.json").read_text())["input"]["path"].startswith(str(hub_mirror))
    AutoModelForCausalLM.from_pretrained(run / "align" / "final")  # a stock checkpoint, no peft needed
    sft_row = json.loads((run / "rejection" / "sft_data.jsonl").read_text().splitlines()[0])
    assert isinstance(sft_row["prompt"], list if prompt_format == "chat" else str)
    if prompt_format == "chat":  # the recipe trains LoRA adapters
        assert (run / "grpo" / "final" / "adapter" / "adapter_config.json").is_file()
    assert (run / "report.md").is_file()
