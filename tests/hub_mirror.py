"""A hub mirror (r1pipeline/hub.py) for the tests: every model and dataset the shipped recipes name,
built offline. Nothing can be downloaded here, so this is the one stand-in for the hub: the models
are tiny random-initialised models of the named architectures (Qwen2, Llama, DeepSeek-V3) with a
real byte-level BPE tokenizer and each family's chat template, and the datasets are the hand-written
fixtures of tests/data/real/ in their public datasets' columns, repeated to a few dozen rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from data import build_tokenizer
from r1pipeline import policy

REAL = Path(__file__).parent / "data" / "real"

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# hub name: (architecture, chat template, special tokens, end-of-turn token used as EOS or None)
MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": ("qwen2", CHATML, ["<|im_start|>", "<|im_end|>"], None),
    "Qwen/Qwen2.5-1.5B": ("qwen2", CHATML, ["<|im_start|>", "<|im_end|>"], None),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": ("qwen2", CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama", LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>",
                                                           "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "moonshotai/Moonlight-16B-A3B-Instruct": ("deepseek_v3", CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}
# hub dataset (configuration): (fixture files by split, copies of each training row)
DATASETS = {
    "DigitalLearningGmbH/MATH-lighteval": {"train": "competition_math.jsonl", "test": "competition_math.jsonl"},
    "open-r1/OpenR1-Math-220k/default": {"train": "openr1_math.jsonl"},
    "openai/gsm8k/main": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "KodCode/KodCode-Light-RL-10K": {"train": "kodcode.jsonl"},
    "BytedTsinghua-SIA/DAPO-Math-17k": {"train": "dapo_math.jsonl"},
}
COPIES = 12


def corpus() -> list[str]:
    texts = []
    for path in REAL.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            texts += [value for value in json.loads(line).values() if isinstance(value, str)]
    return texts + [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]


def tiny_model(name: str, directory: Path) -> None:
    kind, template, specials, end_of_turn = MODELS[name]
    tokenizer = build_tokenizer(corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if kind == "llama":
        tokenizer.bos_token = "<|begin_of_text|>"
    if end_of_turn:
        tokenizer.eos_token = end_of_turn
    tokenizer.chat_template = template
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "deepseek_v3":  # Moonlight's shape, shrunk: q_proj (no q LoRA), grouped sigmoid routing
        model = policy.build_from_preset("tiny", {"q_lora_rank": None, "n_group": 1, "topk_group": 1}, tokenizer, seed=0)
    else:
        config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=kind == "qwen2",
                              **ids)
        model = model_class(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def build(root: Path) -> Path:
    """The mirror under `root` (models and datasets), once per directory."""
    if (root / "COMPLETE").exists():
        return root
    for name in MODELS:
        tiny_model(name, root / name)
    for name, splits in DATASETS.items():
        directory = root / "datasets" / name
        directory.mkdir(parents=True, exist_ok=True)
        for split, fixture in splits.items():
            lines = (REAL / fixture).read_text().splitlines()
            copies = COPIES if split == "train" else 1
            (directory / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines * copies))
    (root / "COMPLETE").write_text("")
    return root

