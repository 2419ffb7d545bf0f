"""The embedded default's pretraining corpus (stage 0, stages/base.py): plain text about numbers and
arithmetic, written from the training problems only, the way a web corpus would hold them, and never
in R1's template (no system prompt, no <think>/<answer> tags).

Five kinds of document, each a few problems long:
  worked      the question, its working line by line, "The answer is N."  (always right: no slips)
  statements  equations, one per line: "23 + 48 = 71"
  qa          "What is 23 + 48? 71"
  dialogue    chat transcripts, "User: What is 23 + 48?" then "Assistant: " and the working or the
              bare equation: a web corpus holds conversations, and they are what lets a base model
              answer R1's "User: ... Assistant:" prompt at all (R1-Zero starts there)
  counting    runs of consecutive numbers, and counting in tens

The problems come from the training split only, so no held-out problem is ever seen, in any form.
"""

from __future__ import annotations

import random

from data.synthetic import add_working, addition_terms
from data.template import ASSISTANT_PREFIX, USER_PREFIX

KINDS = {"worked": 0.35, "statements": 0.25, "qa": 0.15, "dialogue": 0.15, "counting": 0.1}


def _problems(train) -> list[tuple[str, str, str]]:
    """(question, right working, answer) of each distinct training problem. A slipped working
    (data.slip_fraction) is written again without its slip: the corpus is right where the
    cold-start data is not."""
    seen, out = set(), []
    for row in train:
        question = row["prompt"]
        if question in seen or len(row["reasoning"].splitlines()) < 2:  # answer-only rows repeat a problem
            continue
        seen.add(question)
        working = row["reasoning"]
        if (row.get("stated") or row["solution"]) != row["solution"]:
            working = add_working(*addition_terms(question))[1]
        out.append((question, working, row["solution"]))
    return out


def _counting(rng: random.Random, top: int) -> str:
    if rng.random() < 0.5:
        start = rng.randint(0, top)
        return ", ".join(str(n) for n in range(start, start + rng.randint(5, 12)))
    start = rng.randint(0, 9)
    return "Counting in tens: " + ", ".join(str(n) for n in range(start, top + 10, 10))


def pretraining_corpus(train, documents: int, problems_per_document: int, seed: int) -> list[str]:
    """`documents` texts, each of `problems_per_document` problems (or counting lines), the kinds
    mixed as KINDS weighs them; deterministic in `seed`."""
    if documents < 1 or problems_per_document < 1:
        raise ValueError(f"documents = {documents} and problems_per_document = {problems_per_document} "
                         "must be positive")
    problems = _problems(train)
    if not problems:
        raise ValueError("the training split has no worked-out problems to write a pretraining corpus from "
                         "(data.source: synthetic has them)")
    top = max((int(answer) for _, _, answer in problems if answer.lstrip("-").isdigit()), default=100)
    rng = random.Random(f"corpus:{seed}")
    kinds, weights = list(KINDS), list(KINDS.values())
    texts = []
    for _ in range(documents):
        kind = rng.choices(kinds, weights)[0]
        picked = [problems[rng.randrange(len(problems))] for _ in range(problems_per_document)]
        if kind == "worked":
            text = "\n\n".join(f"{q}\n{working}\nThe answer is {answer}." for q, working, answer in picked)
        elif kind == "statements":
            text = "\n".join(working.splitlines()[-1] for _, working, _ in picked)
        elif kind == "qa":
            text = "\n".join(f"{q} {answer}" for q, _, answer in picked)
        elif kind == "dialogue":
            text = "\n".join(f"{USER_PREFIX}{q}\n{ASSISTANT_PREFIX} " + (working if rng.random() < 0.5 else
                                                                        working.splitlines()[-1])
                             for q, working, _ in picked)
        else:
            text = "\n".join(_counting(rng, top) for _ in range(problems_per_document))
        texts.append(text)
    return texts
