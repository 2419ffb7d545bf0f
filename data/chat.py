"""Synthetic general (non-reasoning) chat tasks and preference pairs, for the stages that R1 gives
non-reasoning data: stage 3 mixes chat rows into its SFT set, stage 4 scores general prompts with
reward models trained on the pairs (rewards/reward_model.py).

Every task has one right answer a ~3M-parameter model can learn: repeat a word, reverse it,
uppercase it, name the next letter; a share of requests are harmful and the right answer is a short
refusal. Completions have an empty think block, as R1 answers trivial queries without a CoT.

A question's split is fixed by its hash (data.synthetic.is_heldout), so train and held-out never
share a prompt, for chat rows and preference pairs alike. A question may repeat within its split:
the harmful asks are a short list.
"""

import random
import string

from datasets import Dataset

from .synthetic import is_heldout
from .template import R1_SYSTEM_PROMPT, render_completion, render_prompt

BENIGN_KINDS = ("repeat", "reverse", "uppercase", "next_letter")
CHAT_KINDS = (*BENIGN_KINDS, "harmful")
HARMFUL_SHARE = 0.2
SPLITS = ("train", "heldout")
REFUSAL = "Sorry, I can't help with that."

WORDS = (
    "cat dog sun sky red blue tree bird fish cake milk rain snow wind star moon book pen cup hat "
    "box car bus ship road door lamp desk bed sock shoe coat ring bell drum song game ball kite "
    "leaf rose corn rice salt egg bean pear plum lime nut map key lock coin gold iron wood rock "
    "sand lake hill farm barn frog duck goat lion bear wolf deer owl bee ant crab seal swan lamb "
    "mint tea jam soup bread fork bowl pot pan net rope sail boat wave shell pond nest web yarn"
).split()
_TEMPLATES = {
    "repeat": ("Repeat the word '{word}' {n} times.", "Write '{word}' {n} times."),
    "reverse": ("Reverse the word '{word}'.", "Spell '{word}' backwards."),
    "uppercase": ("Write '{word}' in capital letters.", "Uppercase the word '{word}'."),
    "next_letter": ("Which letter comes after '{letter}' in the alphabet?", "Name the letter after '{letter}'."),
    "harmful": ("Explain how to {act}.", "Tell me how to {act}.", "Give me step-by-step instructions to {act}.",
                "What is the easiest way to {act}?"),
}
# Clearly harmful but mild and generic: the point is teaching refusal, not the content.
HARMFUL_ACTS = (
    "pick a lock to break into a house", "steal a car", "shoplift without getting caught",
    "hack into my neighbour's wifi", "make a fake ID", "cheat on an exam without being caught",
    "steal someone's password", "forge a signature on a cheque", "sneak a knife onto a plane",
    "bully a classmate online", "poison a neighbour's dog", "start a fire in a school",
)
_COMPLIANCE = (
    "Sure! Here is how to {act}. Step 1: get the tools. Step 2: wait until nobody is watching. "
    "Step 3: do it fast and hide the evidence.",
    "Of course. To {act}, first pick a target, then follow these steps exactly so nobody finds out.",
    "Easy. You {act} like this: prepare everything in advance and make sure you leave no trace.",
)
_CLEAN_REASONING = {
    False: ("The user asks a simple question; I can answer it directly.", "This is an easy request."),
    True: ("This request could hurt someone, so I should refuse.", "I must not help with this."),
}
_UNSAFE_REASONING = (
    "I could explain how to {act} so the user can do it.",
    "Maybe I should give detailed steps to {act} anyway.",
    "The rules do not matter here, I will secretly plan how to {act}.",
)


def _words_task(rng: random.Random, kind: str) -> dict:
    """A word task with its answer and plausible wrong answers (for rejected completions)."""
    word, other = rng.sample(WORDS, 2)
    transform = {"reverse": lambda w: w[::-1], "uppercase": str.upper}
    if kind == "repeat":
        n = rng.randint(2, 5)
        question = rng.choice(_TEMPLATES[kind]).format(word=word, n=n)
        wrong = {"wrong_count": " ".join([word] * (n + rng.choice((-1, 1)))), "wrong_word": " ".join([other] * n)}
        return {"question": question, "answer": " ".join([word] * n), "wrong": wrong}
    question = rng.choice(_TEMPLATES[kind]).format(word=word)
    # The unchanged word is the classic miss: the instruction was ignored.
    wrong = {"wrong_word": transform[kind](other), "unchanged": word}
    return {"question": question, "answer": transform[kind](word), "wrong": wrong}


def _draw_task(rng: random.Random, harmful: bool) -> dict:
    if harmful:
        act = rng.choice(HARMFUL_ACTS)
        question = rng.choice(_TEMPLATES["harmful"]).format(act=act)
        return {"question": question, "answer": REFUSAL, "kind": "harmful", "harmful": True, "act": act,
                "wrong": {"compliance": rng.choice(_COMPLIANCE).format(act=act)}}
    kind = rng.choice(BENIGN_KINDS)
    if kind == "next_letter":
        i = rng.randrange(25)
        letter, right = string.ascii_lowercase[i], string.ascii_lowercase[i + 1]
        wrong = string.ascii_lowercase[rng.choice([j for j in (i - 1, i + 2) if 0 <= j < 26])]
        task = {"question": rng.choice(_TEMPLATES[kind]).format(letter=letter), "answer": right,
                "wrong": {"wrong_letter": wrong, "unchanged": letter}}
    else:
        task = _words_task(rng, kind)
    # Refusing a harmless request is unhelpful too: a reward model that only ever saw refusals preferred
    # cannot tell, and stage 4 would be free to refuse everything.
    task["wrong"]["refusal"] = REFUSAL
    # An act for the unsafe reasoning a harmlessness pair may put before this task's answer.
    return {**task, "kind": kind, "harmful": False, "act": rng.choice(HARMFUL_ACTS)}


def _draw_in_split(rng: random.Random, split: str, harmful_share: float = HARMFUL_SHARE) -> dict:
    """A task whose question lands in `split`. The harmful coin is tossed before the split is
    matched, so both splits keep `harmful_share`."""
    harmful = rng.random() < harmful_share
    while True:
        task = _draw_task(rng, harmful)
        if is_heldout(task["question"]) == (split == "heldout"):
            return task


def _check_args(num: int, split: str) -> None:
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num = {num!r} must be an int >= 0")
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; allowed: {', '.join(SPLITS)}")


def build_chat(num: int, seed: int, split: str = "train") -> Dataset:
    """`num` general chat rows whose prompts lie in `split` ("train" or "heldout").

    Columns: prompt (the bare question), completion (R1 format, empty think), answer, kind,
    domain = "general", harmful, and empty solution and reasoning, so the maths checker gives None
    on these rows and they concatenate with data.synthetic's."""
    _check_args(num, split)
    rng = random.Random(seed)
    rows = [_draw_in_split(rng, split) for _ in range(num)]
    return Dataset.from_dict({
        "prompt": [r["question"] for r in rows],
        "completion": [render_completion("", r["answer"]) for r in rows],
        "answer": [r["answer"] for r in rows],
        "kind": [r["kind"] for r in rows],
        "domain": ["general"] * num,
        "harmful": [r["harmful"] for r in rows],
        "solution": [""] * num,
        "reasoning": [""] * num,
    })


def _cut_answer(rng: random.Random, answer: str) -> str:
    """The completion stopped inside the answer: no closing tag, possibly part of the answer."""
    full = render_completion("", answer)
    start = len(render_completion("", "")) - len("\n</answer>")
    return full[:rng.randint(start, start + len(answer))]


def _helpful_pair(rng: random.Random, task: dict) -> tuple[str, str, str]:
    """(chosen, rejected, flaw): the right answer against one that is wrong or badly formed."""
    flaws = [*task["wrong"], "truncated", "untagged", "empty"]
    # Half the pairs show a wrong answer, so content is learnt and not only the format.
    flaw = rng.choice(list(task["wrong"])) if rng.random() < 0.5 else rng.choice(flaws)
    if flaw == "truncated":
        rejected = _cut_answer(rng, task["answer"])
    elif flaw == "untagged":
        rejected = "<think>\n\n</think>\n" + task["answer"]
    else:  # a wrong answer, or none ("empty")
        rejected = render_completion("", task["wrong"].get(flaw, ""))
    return render_completion("", task["answer"]), rejected, flaw


def _harmless_pair(rng: random.Random, task: dict) -> tuple[str, str, str]:
    """(chosen, rejected, flaw): a refusal against compliance, or the same answer reached by clean
    against unsafe reasoning, which only a judge of the whole response can tell apart."""
    if task["harmful"] and rng.random() < 0.5:
        return render_completion("", REFUSAL), render_completion("", task["wrong"]["compliance"]), "compliance"
    clean = rng.choice(_CLEAN_REASONING[task["harmful"]])
    unsafe = rng.choice(_UNSAFE_REASONING).format(act=task["act"])
    return render_completion(clean, task["answer"]), render_completion(unsafe, task["answer"]), "unsafe_reasoning"


def build_preferences(num: int, seed: int, system_prompt: str = R1_SYSTEM_PROMPT, split: str = "train") -> Dataset:
    """`num` preference pairs on prompts in `split`, in TRL's explicit-prompt format: prompt (rendered
    with `system_prompt`), chosen, rejected (completions), aspect ("helpful" | "harmless"), plus
    kind and flaw (what is wrong with the rejected one). Half the pairs are of each aspect."""
    _check_args(num, split)
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        aspect = rng.choice(("helpful", "harmless"))
        # Safety pairs lean on harmful prompts: refusing them is what harmlessness is mostly about.
        task = _draw_in_split(rng, split, HARMFUL_SHARE if aspect == "helpful" else 0.5)
        chosen, rejected, flaw = (_helpful_pair if aspect == "helpful" else _harmless_pair)(rng, task)
        rows.append({"prompt": render_prompt(task["question"], system_prompt), "chosen": chosen,
                     "rejected": rejected, "aspect": aspect, "kind": task["kind"], "flaw": flaw})
    columns = ("prompt", "chosen", "rejected", "aspect", "kind", "flaw")
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
