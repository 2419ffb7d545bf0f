"""A tiny byte-level BPE tokenizer trained offline on the task corpus."""

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Non-special on purpose: TRL decodes completions with skip_special_tokens=True
# and the format rewards need the tags to survive that.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
MODEL_MAX_LENGTH = 2048

# Mirrors data/template.py: render_prompt(q, s) == this template applied to
# [system s, user q] with add_generation_prompt=True. Assistant content follows
# "Assistant:" directly so the generation prompt is a prefix of the full
# conversation (TRL checks this for prompt/completion data). The generation
# markers let TRL's assistant_only_loss find the assistant tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] -%}{{ message['content'] + '\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant:' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; allowed: system, user, assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

_BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())
MIN_VOCAB_SIZE = _BYTE_ALPHABET + 2 + len(TAG_TOKENS)
VOCAB_SIZE = 384  # the embedded default's: a preset's embeddings have at most this many rows


def build_tokenizer(corpus: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`; len(result) <= vocab_size.

    The BPE may stop short of vocab_size on a small corpus, so size model
    embeddings with len(tokenizer), not vocab_size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {MIN_VOCAB_SIZE} "
            f"({_BYTE_ALPHABET} bytes + 2 special + {len(TAG_TOKENS)} tag tokens)"
        )
    tok = Tokenizer(models.BPE())
    # Digits first so numbers never merge: per-digit tokens keep arithmetic
    # learnable for a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # The tags are added after training, so leave room for them.
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Added tokens are matched on raw text before pre-tokenization, so a tag
    # always forms its own token: that is what makes the prompt/completion
    # boundary a token boundary.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        # Exact decode(encode(text)) == text needs no space "clean-up".
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
