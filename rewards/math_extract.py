"""Finding the final answer in a completion, or in a gold written as a worked solution.

Runs in the caller's process, so everything here is linear-time string work (no backtracking
regexes over the whole completion); the sympy work happens in the worker pool (rewards/math_pool.py).
Surface normalisation of the answer found lives in rewards/math_normal.py.
"""

from __future__ import annotations

import functools
import re

from rewards.math_normal import normalise  # noqa: F401  (r1pipeline/evaluate.py imports it from here)

# Where a prediction's answer may be, tried in this order; the first that finds one wins.
EXTRACTORS = ("boxed", "answer_tag", "answer_is", "last_line")
MAX_ANSWER_CHARS = 400
MAX_BOXES = 64  # boxes looked at per text; a text with more is graded on its last ones only

_THINK_END = "</think>"
# A chat model's turn ends at its special tokens; what a sampler lets run on after them is not answer.
_STOP_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|eot_id|>")
# "The final answer is", "Answer:", "answer is", GSM8K's "####"; a bare "Answer" only before math.
_ANSWER_IS = re.compile(r"(?:answer|answer\s+should\s+be|correct\s+value)\s*(?:is|was|:)\s*:?|answer\s*(?=\$|\\\(|\\\[|\d)|####",
                        re.IGNORECASE)
_HOPE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_HOPE_INSIDE = re.compile(r"\.?\s*I hope it is correct", re.IGNORECASE)
# What may stand between two boxes (or two $…$ segments) that together form one answer; a rule
# drawn with one symbol (`++++++`, `---`) divides parts, it does not revise them.
_JOINER = re.compile(r"(?:\s|[,;.&$]|([-+=*~])\1{2,}|\\[()\[\]]|\\q?quad|\\[,;! ]|\\text\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b|\b[A-Za-z](?:_\{?\w+\}?)?\s*=)*")
# A number in prose: not glued to a word before it ("AZYUK2A" holds none), thousands or decimal comma.
_PROSE_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])-?\d+(?:,\d+)*(?:\.\d+)?(?:/\d+)?(?:\s?\\?%)?")
_WORDS = re.compile(r"[A-Za-z]{3,}")
# A short phrase that ends in "and" right before the next box joins it too: "\\boxed{1} papers and
# \\boxed{2} bins", "\\boxed{(3,3)} \\text{ for part (a) and } \\boxed{(1,1)}".
_AND_BEFORE = re.compile(r"[^\n]{0,40}\band\s*(?:\}|\$|\\[()\[\]]|\\q?quad|\s)*")
# Markdown bold around words or an answer, never Python's power (`x**2`): no word character outside.
_BOLD = re.compile(r"(?<![\w*])\*\*(?=\S)([^*\n]{1,200}?)(?<=\S)\*\*(?![\w*])")
# After the last box, these restate the answer, and win over the box ("… \\boxed{12}, a misprint; the
# correct value is 15").
_FINAL = re.compile(r"final answer\s*(?:is|:)|correct\s+(?:value|answer)\s+(?:is|was)", re.IGNORECASE)
# LaTeX escaped twice (`\\\\frac` as it comes out of a JSON string written from a Python literal):
# two backslashes before a letter are one command, not a row break followed by text.
_ESCAPED = re.compile(r"(?<!\\)\\\\(?=[a-zA-Z])")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the {...} group opening at text[start], and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "{" and text[i - 1:i] != "\\":
            depth += 1
        elif char == "}" and text[i - 1:i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _boxes(text: str) -> list[tuple[str, int, int]]:
    """(content, start, end) of the outermost \\boxed{…} / \\fbox{…} groups, left to right."""
    found, position = [], 0
    while len(found) < MAX_BOXES:
        start = min((i for i in (text.find("\\boxed", position), text.find("\\fbox", position)) if i != -1), default=-1)
        if start == -1:
            break
        after = start + (6 if text.startswith("\\boxed", start) else 5)
        rest = text[after:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            group = _braced(text, after + len(rest) - len(stripped))
            if group is None:  # an unclosed box: nothing after it can close either
                break
            found.append((group[0], start, group[1]))
            position = group[1]
        elif text.startswith("\\boxed ", start) and stripped:  # \boxed 5
            token = stripped.split("$")[0].split()[0]
            found.append((token, start, after + len(rest) - len(stripped) + len(token)))
            position = found[-1][2]
        else:
            position = after
    return found


def last_boxed(text: str) -> str | None:
    """The final boxed answer. Boxes that stand together, separated only by commas, "and"/"or",
    `\\quad` or math delimiters (`\\boxed{1}, \\boxed{2}`), form one answer, a list; a box followed by
    any other words is a revised answer, and only the last one counts (`\\boxed{3}, no wait: \\boxed{4}`),
    unless the words are a short phrase ending in "and" (`\\boxed{1} papers and \\boxed{2} bins`)."""
    boxes = _boxes(text)
    if not boxes:
        return None
    parts = [boxes[-1][0]]
    for (content, _, end), (_, next_start, _) in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        gap = text[end:next_start]
        if not (_JOINER.fullmatch(gap) or _AND_BEFORE.fullmatch(gap)):
            break
        parts.append(content)
    return ", ".join(part.strip() for part in reversed(parts))


_OPENER = re.compile(r"(?<!\\)(?:\$\$|\$|\\\[|\\\()")
_CLOSER = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}


def _math_segments(text: str) -> list[tuple[str, int, int]]:
    """(content, start, end) of $$…$$, $…$, \\[…\\] and \\(…\\) segments; an escaped \\$ is a dollar.
    Inline segments ($, \\() do not cross a line break."""
    found, i = [], 0
    while True:
        opener = _OPENER.search(text, i)
        if opener is None:
            return found
        left = opener.group()
        right, j = _CLOSER[left], opener.end()
        while True:
            j = text.find(right, j)
            if j == -1 or right != "$" or text[j - 1] != "\\":
                break
            j += 1
        if j == -1 or (left in ("$", "\\(") and "\n" in text[opener.end():j]):
            i = opener.end()
            continue
        found.append((text[opener.end():j], opener.start(), j + len(right)))
        i = j + len(right)


def answer_in(segment: str, marked: bool = False) -> str | None:
    """The answer inside an answer segment (an <answer> tag, the text after "the answer is", a last
    line): its box; else its math, several $…$ joined like boxes, unless a sentence after the math
    goes on to state its value ("The volume of $V$ is 120."); else the number prose states (see
    `_prose_answer`). `marked`: the segment follows an answer marker, so it opens with the answer."""
    segment = _HOPE.sub("", segment).strip()
    boxed = last_boxed(segment)
    if boxed is not None:
        return boxed
    # `$` before a number in prose is a currency sign: "$35.00 (or $25 with the coupon)" holds no math
    segments = [found for found in _math_segments(segment) if not _is_prose(found[0], words=2)]
    if segments:
        tail = segment[segments[-1][2]:]
        stated = _prose_answer(tail) if re.search(r"[A-Za-z]{2,}", tail) else None
        if stated is not None:
            return stated  # the sentence goes on to state its value: "The volume of $V$ is 120."
        gaps = [segment[:segments[0][1]]] + [segment[a[2]:b[1]] for a, b in zip(segments, segments[1:])]
        if all(_JOINER.fullmatch(gap) for gap in gaps[1:]):
            return ", ".join(content.strip() for content, _, _ in segments)
        return segments[-1][0].strip()
    if _is_prose(segment):
        stated = _prose_answer(segment, marked)
        if stated is not None:
            return stated or None
    return segment.strip().rstrip(".").strip() or None


def _is_prose(text: str, words: int = 1) -> bool:
    """More than `words - 1` words outside LaTeX commands and braces: a sentence, not a formula."""
    return len(set(_WORDS.findall(re.sub(r"\\[a-zA-Z]+|\{[^{}]*\}", " ", text))) - {"and"}) >= words


def _prose_answer(text: str, marked: bool = False) -> str | None:
    """The number a sentence states as its answer, with number words read as numerals where it writes
    no numeral ("two more cupcakes", "$1.5 million"): after an answer marker, a number that opens it ("The answer is 150
    minutes, which is 2.5 hours"); else its last number, or the enumeration that ends it ("x = 2 or
    x = -3", "7, 5, and 3": a list, which never meets a single value, so hedging scores nothing).
    "" when the sentence denies its number ("the answer is not 7"); None when it states none."""
    text = _numerals(text)
    numbers = list(_PROSE_NUMBER.finditer(text))
    if not numbers:
        return None
    if marked and not text[:numbers[0].start()].strip(" \t:$*"):
        listed = numbers[:1]
        for after in numbers[1:]:
            if not _ENUMERATION_GAP.fullmatch(text[listed[-1].end():after.start()]):
                break
            listed.append(after)
        return ", ".join(match.group() for match in listed)
    last = numbers[-1]
    if _NEGATION.search(text[:last.start()]):
        return ""
    listed = [last]
    for before in reversed(numbers[:-1]):
        if not _ENUMERATION_GAP.fullmatch(text[before.end():listed[0].start()]):
            break
        listed.insert(0, before)
    if len(listed) > 1:
        return ", ".join(match.group() for match in listed)
    return None if " or " in text else last.group()


# Between the items of an enumeration in prose: "1, 2, 3", "7, 5, and 3", "2 or x = -3".
_ENUMERATION_GAP = re.compile(r"\s*(?:,\s*(?:(?:and|or)\s+)?|\s(?:and|or)\s+)(?:[a-zA-Z]\s*=\s*)?")
_NEGATION = re.compile(r"\b(?:not|isn't|is\s+never|cannot\s+be)\s*\$?\s*$", re.IGNORECASE)
_SMALL = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {word: 10 * (i + 2) for i, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUMBER_WORDS = re.compile(
    r"(?<![\w.,])(?:(\d+(?:\.\d+)?)|(?:%s)(?:[\s-]+(?:%s))*)(?:[\s-]+(?:%s|and))*(?:[\s-]+(?:%s))?(?![\w-])"
    % ("|".join([*_SMALL, *_TENS, "a"]), "|".join([*_SMALL, *_TENS]), "|".join([*_SMALL, *_TENS, *_SCALES]),
       "|".join(_SCALES)), re.IGNORECASE)


def _numerals(text: str) -> str:
    """English number words as numerals: "two" -> 2, "one thousand" -> 1000, "1.5 million" -> 1500000;
    words only in a sentence that writes no numeral ("12 sequences meet the three conditions")."""
    return "".join(_NUMBER_WORDS.sub(functools.partial(_number_value, words_too=not re.search(r"\d", sentence)),
                                     sentence) for sentence in re.split(r"(?<=[.!?;])(?=\s)", text))


def _number_value(match, words_too: bool) -> str:
    """A number-word match as a numeral (or unchanged); see _numerals."""
    words = re.split(r"[\s-]+", match.group().lower())
    if match.group(1) is None and not words_too:
        return match.group()
    if match.group(1) is not None:  # digits followed by scale words only: "1.5 million"
        if len(words) == 1 or not all(word in _SCALES for word in words[1:]):
            return match.group()
        number = float(words[0])
        for word in words[1:]:
            number *= _SCALES[word]
        return str(int(number)) if number == int(number) else str(number)
    if words[0] == "a" and (len(words) == 1 or words[1] not in _SCALES):
        return match.group()  # the article, not "a hundred"
    if words == ["one"] and match.string[match.end():].strip(" .!)*") != "":
        return match.group()  # the pronoun ("as one might think"), unless it ends the sentence
    total = current = 0
    for word in words:
        if word == "and":
            continue
        if word in _SCALES:
            current = max(current, 1) * _SCALES[word]
            if _SCALES[word] > 100:
                total, current = total + current, 0
        else:
            current += _SMALL.get(word, _TENS.get(word, 1 if word == "a" else 0))
    return str(total + current)


def _answer_tag(text: str) -> str | None:
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    return text[start + len("<answer>"):end] if start != -1 else None


def _answer_is(text: str) -> str | None:
    """The text after the last answer marker that is followed by something: to the end of its line,
    or through a display-math block that opens right after it. A last line in Minerva's format
    ("… I hope it is correct.") is the answer's line whether or not it names the answer."""
    last = _last_line(text)
    if last is not None and _HOPE.search(last):
        marker = list(_ANSWER_IS.finditer(last))
        return last[marker[-1].end():] if marker else last
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        rest = text[match.end():].lstrip(" \t:")
        for left, right in (("$$", "$$"), ("\\[", "\\]")):
            if rest.startswith(left) and rest.find(right, len(left)) != -1:
                close = rest.find(right, len(left)) + len(right)
                return rest[:close] + rest[close:].split("\n")[0]
        line = _HOPE_INSIDE.split(rest.split("\n")[0])[0]  # Minerva's sentence closes the answer
        if line.strip(" .$"):
            return line
    return None


def _last_line(text: str) -> str | None:
    # "\n" (and "\r") end a line; str.splitlines would also split at form feeds and other controls
    lines = [line for line in text[-2000:].replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1] if lines else None


_EXTRACT = {"boxed": last_boxed, "answer_tag": _answer_tag, "answer_is": _answer_is, "last_line": _last_line}


def extract_prediction(completion: str, extractors: tuple[str, ...] = EXTRACTORS) -> str | None:
    """The final answer of a completion (a bare answer is its own final line), read after the last
    </think> when the completion has one, so that guesses inside the reasoning are never graded.
    A completion that opens <think> or <answer> and never closes it has no answer."""
    unknown = [name for name in extractors if name not in _EXTRACT]
    if unknown:
        raise ValueError(f"unknown answer extractor(s) {unknown}; valid: {list(_EXTRACT)}")
    end = completion.rfind(_THINK_END)
    if end == -1 and "<think>" in completion:
        return None  # the reasoning never ended (cut at the length limit): there is no final answer
    text = completion[end + len(_THINK_END):] if end != -1 else completion
    if "<answer>" in text and "</answer>" not in text[text.rfind("<answer>"):]:
        return None  # an answer cut off mid-way: its last number may be a prefix of the real one
    stops = [i for i in (text.find(token) for token in _STOP_TOKENS) if i != -1]
    text = _ESCAPED.sub(r"\\", text[:min(stops)] if stops else text)
    text = _BOLD.sub(r"\1", text)  # Markdown: "**Answer: 3**", "**72**"
    boxes = _boxes(text) if "boxed" in extractors and "answer_is" in extractors else []
    if boxes and _FINAL.search(text, boxes[-1][2]):  # "\boxed{255} … Final Answer: … is $10,455$."
        extractors = ("answer_is",) + tuple(name for name in extractors if name != "answer_is")
    for name in extractors:
        found = _EXTRACT[name](text)
        if found is not None and found.strip():
            answer = found.strip() if name == "boxed" else answer_in(found, marked=name == "answer_is")
            if answer:
                return answer
    return None


_SOLUTION_MARKS = ("\\boxed", "\\fbox", "####", "<answer>", "\n")
_ANSWER_WORD = re.compile(r"\banswer\b", re.IGNORECASE)


def unwrap_gold(gold: str) -> str:
    """The gold's answer. A bare answer (`7/12`, `$x \\le 3$`, `\\{1, 2\\}`) is taken whole, never
    searched for a number; a gold written as a worked solution (a box, GSM8K's `#### 18`, "the answer
    is", several lines) or as math in prose (`$1$ and $2$`, `$125$ miles`) is read like a completion."""
    gold = _ESCAPED.sub(r"\\", gold.strip())
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        inner = gold[len(left):-len(right)] if len(gold) > len(left) + len(right) else ""
        if gold.startswith(left) and gold.endswith(right) and left not in inner and right not in inner:
            gold = inner.strip()
    if any(mark in gold for mark in _SOLUTION_MARKS) or _ANSWER_WORD.search(gold) or \
            (("$" in gold or "\\(" in gold) and _math_segments(gold)):
        return extract_prediction(gold) or gold
    return gold
