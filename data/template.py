"""How a question becomes a prompt, shared by SFT, GRPO, rejection sampling and evaluation.

`data.prompt_format`:
- r1 (the default): R1's plain-text template, for base models and R1-Zero. The prompt ends with
  "Assistant:" and every completion starts with the added token "<think>", so the prompt/completion
  boundary is always a token boundary (see data/tokenizer.py).
- chat: a conversation ([system,] user) in TRL's conversational format, which the tokenizer's own
  chat template renders (an instruct model's `<|im_start|>` turns); completions are assistant turns.
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


PROMPT_FORMATS = ("r1", "chat")


def prompt_for(question: str, system_prompt: str = R1_SYSTEM_PROMPT, prompt_format: str = "r1"):
    """The prompt of `question`: R1's text, or (chat) the [system,] user messages."""
    if prompt_format == "r1":
        return render_prompt(question, system_prompt)
    if prompt_format != "chat":
        raise ValueError(f"prompt_format={prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}]


def completion_for(text: str, prompt_format: str = "r1"):
    """A completion as its prompt format carries it: text, or (chat) one assistant turn."""
    return text if prompt_format == "r1" else [{"role": "assistant", "content": text}]


def rendered(prompt, tokenizer) -> str:
    """A prompt as the text the model sees: R1's as it is, a conversation through the tokenizer's
    chat template with the generation prompt (the assistant turn's opening) appended."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.prompt_format = 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use prompt_format: r1 for base models)")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
