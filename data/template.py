"""The R1 plain-text template shared by SFT, GRPO and evaluation.

The prompt ends with "Assistant:" and every completion starts with the
added token "<think>", so the prompt/completion boundary is always a token
boundary (see data/tokenizer.py).
"""

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)

# The exact string every rendered prompt (and the chat template's generation
# prompt) ends with; completions are appended directly after it.
ASSISTANT_PREFIX = "Assistant:"
USER_PREFIX = "User: "


def render_prompt(question: str, system_prompt: str = R1_SYSTEM_PROMPT) -> str:
    # Must stay byte-identical to the chat template in data/tokenizer.py.
    system = f"{system_prompt}\n" if system_prompt else ""
    return f"{system}{USER_PREFIX}{question}\n{ASSISTANT_PREFIX}"


def render_completion(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"
