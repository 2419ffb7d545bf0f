"""LoRA (`model.lora`, TRL's peft_config): recipe checks, and on the real stages a GRPO run that
resumes exactly and hands a merged checkpoint, loadable without peft, to the next stage."""

import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_DATA, FAST_GRPO, FAST_SFT
from r1pipeline import cli
from r1pipeline.policy import lora_config, load_pretrained
from test_stages import assert_same_weights, pipeline


def test_lora_settings_become_a_peft_config():
    config = lora_config({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_a_proj", "o_proj"]})
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == {"q_a_proj", "o_proj"} and config.task_type == "CAUSAL_LM"
    assert lora_config({"r": 8}).target_modules == "all-linear"
    assert lora_config(None) is None and lora_config({}) is None


@pytest.mark.parametrize("lora, message", [
    ("{rank: 8}", "unknown key 'rank'"),
    ("{r: 8, task_type: SEQ_CLS}", "unknown key 'task_type'"),
    ("[8]", "model.lora = \\[8\\] \\(list\\) has the wrong type"),
])
def test_bad_lora_settings_fail_before_any_work(tmp_path, capsys, lora, message):
    assert cli.main(["--runs-dir", str(tmp_path), "sft", "--dry-run", f"model.lora={lora}"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "default").exists()


def test_lora_with_a_sharded_accelerate_config_is_refused(tmp_path, capsys):
    from r1pipeline.config import RECIPES_DIR

    assert cli.main(["--runs-dir", str(tmp_path), "sft", "--dry-run", "model.lora={r: 4}", "sft.init_from=model",
                     "--accelerate-config", str(RECIPES_DIR / "accelerate" / "fsdp2.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.lora with" in err and "(FSDP2)" in err and "ddp.yaml" in err


def test_lora_with_fp8_is_refused(tmp_path, capsys):
    assert cli.main(["--runs-dir", str(tmp_path), "sft", "--dry-run", "model.lora={r: 4}",
                     "model.config={fp8: true, hidden_size: 128}"]) == 2
    assert "model.lora with model.config.fp8" in capsys.readouterr().err


def test_cached_decoding_applies_the_adapter_of_kv_b_proj():
    """Absorbed MLA decoding reads kv_b_proj's weight directly; under LoRA it must add the adapter, or
    rollouts would sample from another policy than the one trained."""
    from peft import get_peft_model

    from r1pipeline.model import R1MoEForCausalLM
    from r1pipeline.pipeline import preset_config

    torch.manual_seed(0)
    config = preset_config({"preset": "tiny"})
    config.vocab_size = 64
    peft_model = get_peft_model(R1MoEForCausalLM(config).eval(),
                                lora_config({"r": 4, "target_modules": ["kv_b_proj"], "init_lora_weights": False}))
    ids = torch.randint(3, 64, (1, 12))
    with torch.no_grad():
        full = peft_model(ids).logits[:, -1]
        cache = peft_model(ids[:, :-1], use_cache=True).past_key_values
        step = peft_model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        peft_model.disable_adapter_layers()
        without = peft_model(ids).logits[:, -1]
    assert not torch.allclose(full, without, atol=1e-3), "the adapter changes the output"
    assert torch.allclose(step, full, atol=1e-4)


@pytest.mark.slow
def test_lora_grpo_resumes_exactly_and_hands_on_a_merged_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    lora = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_a_proj, q_b_proj, kv_b_proj, o_proj]}"
    code, out = pipeline(runs, "base", "sft", *FAST_DATA, *FAST_SFT)
    assert code == 0, out
    sft_final = runs / "base" / "sft" / "final"
    # A length reward varies within every group (completions of 1 to 12 tokens), so the adapter trains.
    args = [*FAST_DATA, *FAST_GRPO, lora, f"grpo.init_from={sft_final}", "grpo.learning_rate=1e-2",
            "grpo.rewards=[{name: soft_overlong, weight: 1.0, args: {max_length: 12, cache: 11}}]"]
    code, out = pipeline(runs, "straight", "grpo", *args)
    assert code == 0, out

    stage = runs / "killed" / "grpo"
    code, _ = pipeline(runs, "killed", "grpo", *args, kill_when=lambda: (stage / "checkpoint-2" / "COMPLETE").exists())
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists()
    assert (stage / "checkpoint-2" / "adapter_model.safetensors").is_file(), "a LoRA checkpoint holds the adapter"
    code, out = pipeline(runs, "killed", "grpo", *args)
    assert code == 0, out
    assert f"grpo: resuming from {stage / 'checkpoint-2'} (step 2)" in out
    assert_same_weights(runs / "straight" / "grpo", stage)

    # final/ is the merged model: no LoRA tensor names, the adapted layers changed, the rest untouched.
    merged, base = load_file(str(stage / "final" / "model.safetensors")), load_file(str(sft_final / "model.safetensors"))
    assert not [name for name in merged if "lora_" in name or "base_layer" in name]
    changed = {name for name in merged if not torch.equal(merged[name], base[name])}
    adapted_layers = ("q_a_proj", "q_b_proj", "kv_b_proj", "o_proj", "gate")  # gate: the routing bias
    assert changed and all(name.rsplit(".", 2)[-2] in adapted_layers for name in changed), sorted(changed)[:5]
    assert any(name.endswith("q_b_proj.weight") for name in changed)
    assert (stage / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((stage / "final" / "config.json").read_text())["use_cache"] is True  # generates with its cache

    # The merged checkpoint computes what base + adapter computes, and loads without peft.
    from peft import PeftModel

    model = load_pretrained(str(stage / "final")).eval()
    base = load_pretrained(str(sft_final))
    trained_bias = {name: buffer for name, buffer in model.named_buffers() if name.endswith("e_score_correction_bias")}
    for name, buffer in base.named_buffers():  # the routing bias moved during GRPO; it is no adapter weight
        if name in trained_bias:
            buffer.copy_(trained_bias[name])
    adapted = PeftModel.from_pretrained(base, str(stage / "final" / "adapter")).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted(ids).logits, atol=1e-4)

    # The next stage starts from it (and evaluation loads it).
    code, out = pipeline(runs, "next", "grpo", *FAST_DATA, *FAST_GRPO, f"grpo.init_from={stage / 'final'}",
                         "grpo.max_steps=2")
    assert code == 0, out
