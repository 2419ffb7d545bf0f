"""`--dry-run` / `make plan`: every shipped recipe is validated and priced without training or writing."""

import pytest
import yaml
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen2Config

from r1pipeline import cli
from r1pipeline.config import RECIPES_DIR, load_recipe
from r1pipeline.dryrun import count_parameters, training_memory
from r1pipeline.pipeline import accelerate_setup

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
ACCELERATE = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_dry_runs_and_writes_nothing(recipe, tmp_path, capsys, monkeypatch, hub_mirror):
    """The real recipes' hub models and datasets come from the test mirror (tests/hub_mirror.py)."""
    monkeypatch.setenv("R1PIPELINE_HUB_MIRROR", str(hub_mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    assert cli.main(["--recipe", recipe, "--runs-dir", str(runs), "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("r1pipeline plan (dry run")
    for stage in ("base", "sft", "grpo", "rejection", "align"):
        assert (f"- {stage}: from " in out) == (stage in load_recipe(recipe)), stage
    assert "M parameters" in out and "GiB" in out and "held-out:" in out
    assert not runs.exists(), "a dry run writes nothing"


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.stem)
def test_dry_run_prints_the_per_device_plan_of_each_accelerate_config(config, tmp_path, capsys):
    setup = accelerate_setup(str(config))
    assert cli.main(["--recipe", "tiny", "--runs-dir", str(tmp_path), "all", "--dry-run",
                     "--accelerate-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"devices: {setup['processes']} process(es)" in out
    assert f"x {setup['processes']} process(es)" in out, "the batch arithmetic uses the world size"
    assert ("sharded" in out) == (setup["sharded"] is not None)
    assert ("per machine" in out) == (setup["machines"] > 1)


def test_the_multi_node_plan_names_the_layout_the_rollouts_and_the_timeouts(tmp_path, capsys):
    config = RECIPES_DIR / "accelerate" / "multinode-fsdp2.yaml"
    assert cli.main(["--recipe", "tiny", "--runs-dir", str(tmp_path), "all", "--dry-run", "--accelerate-config",
                     str(config), "model.preset=tiny-vllm", "grpo.use_vllm=true", "grpo.vllm_mode=server",
                     "grpo.vllm_server_host=10.0.0.9", "grpo.ddp_timeout=900"]) == 0
    out = capsys.readouterr().out
    assert "devices: 16 process(es) on 2 machine(s), 8 per machine" in out and "(sharded 16 ways)" in out
    grpo = out.split("- grpo:")[1].split("\n- ")[0]
    assert "x 16 process(es)" in grpo and "the vLLM server at 10.0.0.9:8000" in grpo
    assert "vllm_server_timeout = 240 s" in grpo and "ddp_timeout = 900 s" in grpo


def test_each_node_passes_its_rank_and_rendezvous_to_accelerate():
    env = {"MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.0.0.1"}
    command = cli.launch_command("multinode.yaml", ["grpo", "--run", "x"], env)
    launch = command[command.index("accelerate.commands.launch"):]
    assert launch[:7] == ["accelerate.commands.launch", "--config_file", "multinode.yaml", "--machine_rank", "1",
                          "--main_process_ip", "10.0.0.1"]
    assert launch[7:] == ["-m", "r1pipeline", "grpo", "--run", "x"]
    assert "--machine_rank" not in cli.launch_command("one-node.yaml", [], {})


def test_a_bad_recipe_fails_the_dry_run_before_anything(tmp_path, capsys):
    assert cli.main(["--recipe", "tiny", "--runs-dir", str(tmp_path), "all", "--dry-run",
                     "grpo.num_generations=3"]) == 2
    assert "not divisible by num_generations (3)" in capsys.readouterr().err


def test_an_unreachable_hub_model_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = {**load_recipe("tiny"), "model": {"name_or_path": "nobody-here/no-such-model-1234"}}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(recipe))
    code = cli.main(["--recipe", str(tmp_path / "hub.yaml"), "--runs-dir", str(tmp_path / "runs"), "sft", "--dry-run",
                     "sft.init_from=model"])
    assert code == 2
    assert "no-such-model-1234" in capsys.readouterr().err


@pytest.mark.parametrize("config", [
    Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
], ids=["qwen2", "llama"])
def test_parameter_count_from_the_config_alone_is_exact(config):
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert count_parameters(config) == {"total": real, "active": real, "trainable": real}


def test_moe_active_parameters_count_top_k_of_the_routed_experts():
    config = DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                              kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=1,
                              topk_group=1, num_nextn_predict_layers=0)
    counted = count_parameters(config)
    expert = 3 * 64 * 32  # gate, up and down projections of one routed expert
    assert counted["total"] - counted["active"] == expert * (8 - 2), "one MoE layer: 6 of its 8 experts idle per token"


def test_memory_estimate_shards_only_under_fsdp_or_zero3():
    ddp, fsdp = accelerate_setup(str(RECIPES_DIR / "accelerate" / "ddp.yaml")), \
        accelerate_setup(str(RECIPES_DIR / "accelerate" / "fsdp2.yaml"))
    billion = 10**9
    # bf16 weights: 2 (weights) + 2 (grads) + 8 (Adam moments) bytes per parameter
    assert training_memory(billion, billion, "bfloat16", ddp) == pytest.approx(12 * billion / 1024**3)
    assert training_memory(billion, billion, "bfloat16", fsdp) == pytest.approx(12 * billion / 8 / 1024**3)
    assert accelerate_setup(None)["processes"] == 1

