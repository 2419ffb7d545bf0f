"""Reward-model rewards for stage 4 (DeepSeek-R1 §2.3.4), and training a tiny reward model.

R1 scores general prompts with reward models: helpfulness judged on the final answer only (the text
after </think>), harmlessness on the whole response, reasoning included. Both rewards return None on
rows whose `domain` is not "general": reasoning rows are scored by rule rewards, and TRL averages
each reward over the rows it applies to. A recipe binds the checkpoint:

    rewards:
      - {name: helpfulness, weight: 1.0, args: {path: runs/x/align/reward_model}}
      - {name: harmlessness, weight: 1.0, args: {path: runs/x/align/reward_model}}

`train_reward_model` trains one model on both aspects' preference pairs (data/chat.py), each pair
shown to it the way its reward will show completions, so one checkpoint serves both rewards.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, \
    LlamaForSequenceClassification

from rewards.registry import register
from rewards.text import completion_text

ASPECTS = ("helpful", "harmless")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "aspect")
MARKER = "reward_model.json"  # written last: its presence means the checkpoint is finished


def answer_part(completion: str) -> str:
    """What helpfulness judges: the text after the last </think>; all of it when there is none."""
    _, think_end, answer = completion.rpartition("</think>")
    return answer if think_end else completion


def judged_text(aspect: str, completion: str) -> str:
    return answer_part(completion) if aspect == "helpful" else completion


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str):
    """(model, tokenizer) of the sequence-classification checkpoint at `path`, in eval mode, loaded
    once per process."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"reward model path {path!r} is not a checkpoint directory (no config.json); give the "
                         f"directory train_reward_model wrote, or another sequence-classification checkpoint")
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward model {path!r} is not a one-label sequence-classification checkpoint "
                         f"(architectures={architectures}, num_labels={config.num_labels}); a reward model "
                         f"gives one score per text")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path)
    # The score is read at the last non-pad token, which needs the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    # Bare "cuda" is the process's current device, which accelerate sets per rank.
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def _scores(model, tokenizer, texts: list[str], batch_size: int) -> list[float]:
    # RewardTrainer appends EOS to every text it trains on, and the score is read at the last
    # token: a text scored without it would be read at a position the model never learnt.
    eos = tokenizer.eos_token or ""
    texts = [text if text.endswith(eos) else text + eos for text in texts]
    max_length = min(tokenizer.model_max_length,
                     getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              padding_side="right", truncation_side="right", return_tensors="pt")
            scores += model(**batch.to(model.device)).logits[:, 0].float().tolist()
    return scores


def score(path: str, texts: list[str], batch_size: int = 32) -> list[float]:
    """The reward model's score (logit 0) of each full text (prompt + completion)."""
    model, tokenizer = load_reward_model(str(path))
    return _scores(model, tokenizer, texts, batch_size)


def _score_general(name: str, aspect: str, path, prompts, completions, columns) -> list[float | None]:
    if not path:
        raise ValueError(f"{name}: no reward model path; give args.path in the recipe, e.g. "
                         f"{{name: {name}, weight: 1.0, args: {{path: runs/<run>/align/reward_model}}}}")
    if "domain" not in columns:
        raise ValueError(f"{name}: the dataset has no 'domain' column; it scores rows whose domain is 'general'")
    rows = [i for i, domain in enumerate(columns["domain"]) if domain == "general"]
    if not rows:  # a batch of reasoning prompts only: nothing to score, no model to load
        return [None] * len(completions)
    _, tokenizer = load_reward_model(str(path))
    texts = []
    for i in rows:
        prompt = prompts[i]
        if not isinstance(prompt, str):  # conversational: render as the reward model's tokenizer does
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts.append(prompt + judged_text(aspect, completion_text(completions[i])))
    scores = dict(zip(rows, score(path, texts)))
    _log_by_kind(name, scores, columns)
    return [scores.get(i) for i in range(len(completions))]


def _log_by_kind(name: str, scores: dict[int, float], columns: dict) -> None:
    """Under TRL (which passes `log_metric`), the batch's mean score per prompt kind as
    `rewards/<name>/<kind>/mean`. The per-step mean over all general prompts swings with which kinds
    a step drew (a refusal scores unlike a word task) more than a stage's trend; within a kind it
    does not (stages.grpo.reward_trend compares quarters within kinds)."""
    log_metric, kinds = columns.get("log_metric"), columns.get("kind")
    if not callable(log_metric) or kinds is None:
        return
    by_kind: dict[str, list[float]] = {}
    for i, value in scores.items():
        by_kind.setdefault(str(kinds[i]), []).append(value)
    for kind, values in sorted(by_kind.items()):
        log_metric(f"rewards/{name}/{kind}/mean", sum(values) / len(values))


@register("helpfulness", columns=("domain",))
def helpfulness(prompts, completions, completion_ids=None, *, path: str | None = None, **columns):
    """Reward-model score of the prompt and the answer after </think>; None on non-general rows."""
    return _score_general("helpfulness", "helpful", path, prompts, completions, columns)


@register("harmlessness", columns=("domain",))
def harmlessness(prompts, completions, completion_ids=None, *, path: str | None = None, **columns):
    """Reward-model score of the prompt and the whole completion; None on non-general rows."""
    return _score_general("harmlessness", "harmless", path, prompts, completions, columns)


def _digest(value) -> str | None:
    """A fingerprint of the data a reward model is trained on, so a finished one is reused only for the same."""
    if value is None:
        return None
    if not isinstance(value, dict):  # a Dataset of pairs
        value = value.select_columns(list(PAIR_COLUMNS)).to_dict()
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _check_pairs(pairs, what: str) -> None:
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise ValueError(f"{what} lack column(s) {missing}; preference pairs need {list(PAIR_COLUMNS)}")
    unknown = sorted(set(pairs["aspect"]) - set(ASPECTS))
    if unknown:
        raise ValueError(f"{what} have unknown aspect(s) {unknown}; allowed: {list(ASPECTS)}")


def _as_judged(pairs):
    """The pairs as the rewards will show completions: a helpful pair without its reasoning."""
    return pairs.select_columns(list(PAIR_COLUMNS)).map(lambda row: {
        "chosen": judged_text(row["aspect"], row["chosen"]), "rejected": judged_text(row["aspect"], row["rejected"])})


def pairwise_accuracy(model, tokenizer, pairs) -> dict:
    """Per aspect, the share of pairs whose chosen completion scores above the rejected one."""
    judged = _as_judged(pairs)
    chosen = _scores(model, tokenizer, [p + c for p, c in zip(judged["prompt"], judged["chosen"])], 64)
    rejected = _scores(model, tokenizer, [p + r for p, r in zip(judged["prompt"], judged["rejected"])], 64)
    accuracy = {}
    for aspect in ASPECTS:
        wins = [c > r for c, r, a in zip(chosen, rejected, judged["aspect"]) if a == aspect]
        if wins:
            accuracy[aspect] = sum(wins) / len(wins)
    return accuracy


def train_reward_model(out_dir, pairs, tokenizer, *, heldout=None, max_steps: int = 200,
                       learning_rate: float = 1e-3, per_device_train_batch_size: int = 32, hidden_size: int = 64,
                       num_layers: int = 2, seed: int = 0, max_length: int = 256) -> dict:
    """Train a tiny Llama reward model on `pairs` (prompt, chosen, rejected, aspect) with TRL's
    RewardTrainer, save model and tokenizer to `out_dir`, and return its metrics, with the pairwise
    accuracy on `heldout` pairs per aspect. A finished `out_dir` trained with the same settings and
    data is reused; one trained otherwise is replaced."""
    from trl import RewardConfig, RewardTrainer

    out_dir = Path(out_dir)
    _check_pairs(pairs, "pairs")
    if heldout is not None:
        _check_pairs(heldout, "heldout pairs")
    settings = {"max_steps": max_steps, "learning_rate": learning_rate, "hidden_size": hidden_size,
                "num_layers": num_layers, "per_device_train_batch_size": per_device_train_batch_size,
                "seed": seed, "max_length": max_length, "tokenizer": _digest(tokenizer.get_vocab()),
                "pairs": _digest(pairs), "heldout": _digest(heldout)}
    if out_dir.exists():
        if not (out_dir / MARKER).is_file():
            raise ValueError(f"{out_dir} exists but holds no finished reward model (no {MARKER}); remove it or "
                             f"choose another out_dir")
        done = json.loads((out_dir / MARKER).read_text())
        if done["settings"] == settings:
            return done["metrics"]

    started = time.monotonic()
    tokenizer = copy.deepcopy(tokenizer)  # the trainer sets the pad token; the caller's stays as it was
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    heads = max(1, hidden_size // 16)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_length, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)

    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)  # left by a run killed mid-training
    args = RewardConfig(output_dir=str(staging), max_steps=max_steps, learning_rate=learning_rate,
                        per_device_train_batch_size=per_device_train_batch_size, seed=seed, max_length=max_length,
                        # fp32 and no recomputation: TRL's defaults suit big models on GPUs, not this one.
                        bf16=False, gradient_checkpointing=False,
                        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=_as_judged(pairs), processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(staging))

    model.eval()
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    metrics["train_pairs"] = len(trainer.train_dataset)  # after TRL drops pairs over max_length
    if heldout is not None:
        accuracy = pairwise_accuracy(model, tokenizer, heldout)
        metrics.update({f"heldout_accuracy_{aspect}": value for aspect, value in accuracy.items()})
    metrics["wall_time_s"] = time.monotonic() - started
    (staging / MARKER).write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    load_reward_model.cache_clear()  # a process that loaded the old checkpoint must not keep scoring with it
    return metrics
