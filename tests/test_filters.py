"""data.filters: R1's readability filters for rejection sampling, each with samples it must keep and
samples it must drop, and apply_filters' order, counts and config checks."""

import pytest

from data.filters import (FILTERS, apply_filters, code_in_math, dedupe, long_paragraph, max_per_prompt,
                          mixed_language, over_long)


def answer(reasoning: str, final: str = "42") -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{final}\n</answer>"


def sample(id="p1", reasoning="Add the tens, then the units.", length=20, correct=True, **extra):
    return {"id": id, "completion": answer(reasoning), "length": length, "correct": correct, **extra}


def test_mixed_language():
    assert mixed_language(answer("First add the tens, 然后加个位数, and we are done."))
    assert not mixed_language(answer("First add the tens, then the units, and we are done."))
    assert not mixed_language(answer("12 + 30 = 42, 42 - 0 = 42"))  # no words: nothing to mix
    assert not mixed_language(answer("先加十位，再加个位。"), language="zh")
    # Only the reasoning counts: a Chinese answer after English thinking is not mixing.
    assert not mixed_language(answer("Add the tens then the units.", final="四十二"))
    one_in_twenty = " ".join(["word"] * 19 + ["слово"])  # 95% English
    assert not mixed_language(answer(one_in_twenty), min_share=0.95)
    assert mixed_language(answer(one_in_twenty), min_share=0.96)
    with pytest.raises(ValueError, match="language='xx'; valid: en, ru, zh"):
        mixed_language("text", language="xx")


def test_over_long():
    assert over_long(97, max_tokens=96)
    assert not over_long(96, max_tokens=96)


def test_long_paragraph_at_the_limit():
    assert not long_paragraph(answer("a" * 100), max_chars=100)
    assert long_paragraph(answer("a" * 101), max_chars=100)
    # Blank lines split paragraphs; single newlines do not.
    assert not long_paragraph(answer("a" * 60 + "\n\n" + "b" * 60), max_chars=100)
    assert not long_paragraph(answer("a" * 60 + "\n  \n" + "b" * 60), max_chars=100)
    assert long_paragraph(answer("a" * 60 + "\n" + "b" * 60), max_chars=100)
    # Only the reasoning counts.
    assert not long_paragraph(answer("short", final="x" * 500), max_chars=100)


@pytest.mark.parametrize("reasoning", [
    "Compute it:\n```python\nprint(6 * 7)\n```",
    "Let me check.\ndef f(x):\n    return 6 * x",
    "import math\nmath.prod([6, 7])",
    "from fractions import Fraction\nFraction(84, 2)",
    "Try it:\n    print(6 * 7)",
])
def test_code_in_math_drops_code(reasoning):
    assert code_in_math(answer(reasoning))


@pytest.mark.parametrize("reasoning", [
    "6 times 7 is 42.",
    "We define f(x) = 6x, so f(7) = 42.",
    "Import duties aside, print the result: 42.",
    "The important step: 6 * 7 = 42.",
])
def test_code_in_math_keeps_prose(reasoning):
    assert not code_in_math(answer(reasoning))


def test_code_in_math_looks_at_the_reasoning_only():
    assert not code_in_math(answer("6 times 7.", final="```python\nprint(42)\n```"))


def test_dedupe_drops_whitespace_variants_of_one_prompt_only():
    samples = [sample(reasoning="Add  the tens,\nthen the units."), sample(reasoning="Add the tens, then the units. "),
               sample(reasoning="Add the units first."), sample(id="p2", reasoning="Add the tens, then the units.")]
    assert dedupe(samples) == [samples[0], samples[2], samples[3]]


def test_max_per_prompt_keeps_the_first_per_id():
    samples = [sample(id=id, reasoning=str(i)) for i, id in enumerate(["a", "b", "a", "a", "b", "a"])]
    assert [s["completion"] for s in max_per_prompt(samples, 2)] == [answer(str(i)) for i in (0, 1, 2, 4)]


CONFIG = {"mixed_language": {"language": "en", "min_share": 0.95}, "over_long": {"max_tokens": 96},
          "long_paragraph": {"max_chars": 600}, "code_in_math": True, "dedupe": True, "max_per_prompt": 2}


def test_apply_filters_order_and_counts():
    code = "Compute:\n```python\nprint(6 * 7)\n```"
    samples = [
        sample(id="a", domain="math"),                                             # kept
        sample(id="a", correct=False),                                             # incorrect
        sample(id="a", reasoning="Add 十位 then 个位 now."),                          # mixed_language
        sample(id="a", length=97, reasoning="Add 十位."),                            # first failing step wins
        sample(id="a", length=200),                                                # over_long
        sample(id="a", reasoning="x" * 601),                                       # long_paragraph
        sample(id="a", reasoning=code, domain="math"),                             # code_in_math
        sample(id="b", reasoning=code, domain="code"),                             # kept: code is the task
        sample(id="b", reasoning=code + "  ", domain="code"),                      # dedupe
        sample(id="a", reasoning="Tens first."),                                   # kept: second of a
        sample(id="a", reasoning="Units first."),                                  # max_per_prompt
    ]
    kept, removed = apply_filters(samples, CONFIG)
    assert kept == [samples[0], samples[7], samples[9]]
    assert removed == {"incorrect": 1, "mixed_language": 2, "over_long": 1, "long_paragraph": 1, "code_in_math": 1,
                       "dedupe": 1, "max_per_prompt": 1}
    assert list(removed) == ["incorrect", *FILTERS, "dedupe", "max_per_prompt"]


def test_switched_off_filters_do_not_run():
    samples = [sample(reasoning="Add 十位 then 个位.", length=500), sample(), sample()]
    kept, removed = apply_filters(samples, {"mixed_language": False, "over_long": None, "dedupe": False,
                                            "max_per_prompt": False})
    assert kept == samples and removed == {"incorrect": 0}
    assert apply_filters(samples, {"mixed_language": True})[1] == {"incorrect": 0, "mixed_language": 1}


@pytest.mark.parametrize("config, message", [
    ({"mixed_languages": True, "code": True}, "unknown filter.*'code', 'mixed_languages'; allowed: mixed_language, "
                                              "over_long, long_paragraph, code_in_math, dedupe, max_per_prompt"),
    ({"over_long": True}, "over_long: .*max_tokens"),
    ({"long_paragraph": {"max_words": 5}}, "long_paragraph: .*its options: max_chars"),
    ({"long_paragraph": 600}, "long_paragraph=600; it must be true, false or a dict"),
    ({"max_per_prompt": 0}, "max_per_prompt=0"),
    ({"dedupe": "yes"}, "dedupe='yes'"),
    ({"code_in_math": True}, "domain='maths'; valid: math, code, general"),
])
def test_bad_config_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        apply_filters([sample(domain="maths")], config)
