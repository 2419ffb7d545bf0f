"""`make chat RUN=... STAGE=...`: a terminal chat with the server `make serve` started. The reasoning
(`<think>…</think>`) is shown dimmed, the answer plainly (`<answer>` tags taken off)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request

from r1pipeline.serve import checkpoint_of

DIM, RESET = "\033[2m", "\033[0m"
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_ANSWER_TAGS = re.compile(r"</?answer>")


def format_reply(text: str, color: bool = True) -> str:
    """The reply for a terminal: its reasoning dimmed (or marked, without color), then the answer."""
    think = _THINK.search(text)
    reasoning = think.group(1).strip() if think else ""
    answer = _ANSWER_TAGS.sub("", _THINK.sub("", text)).strip()
    if not reasoning:
        return answer
    shown = f"{DIM}{reasoning}{RESET}" if color else f"(thinking) {reasoning}"
    return f"{shown}\n{answer}"


def ask(url: str, model: str, messages: list[dict], max_tokens: int = 512, timeout: float = 300.0) -> str:
    """One chat completion from an OpenAI-compatible server; the assistant's text."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    return reply["choices"][0]["message"]["content"]


def _lines():
    """The user's lines: typed at a prompt, or piped in."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1pipeline.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", default="default")
    parser.add_argument("--stage", default=None)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model = str(checkpoint_of(args.runs_dir, args.run, args.stage))
    color = sys.stdout.isatty()
    messages: list[dict] = []
    print(f"chatting with {model} at {args.url} (empty line or Ctrl-D to quit)")
    for line in _lines():
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        reply = ask(args.url, model, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": reply})
        print(format_reply(reply, color), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
