"""`make serve` / `make chat`: an OpenAI-compatible server (transformers serve) over a stage's final
checkpoint, started on loopback, one chat completion, its reply's shape, and the terminal chat's
rendering of the reasoning."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, pipeline_env
from data import build_tokenizer
from r1pipeline import policy
from r1pipeline.chat import DIM, RESET, ask, format_reply


def test_reply_shows_reasoning_dimmed_and_the_answer_plainly():
    text = "<think>\n3 + 4 is 7\n</think>\n<answer>\n7\n</answer>"
    assert format_reply(text) == f"{DIM}3 + 4 is 7{RESET}\n7"
    assert format_reply(text, color=False) == "(thinking) 3 + 4 is 7\n7"
    assert format_reply("just 7") == "just 7"
    assert format_reply("<think>cut off mid-way") == f"{DIM}cut off mid-way{RESET}\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_checkpoint(tmp_path):
    """runs/demo/align/final: a tiny policy and its tokenizer, as a finished stage."""
    final = tmp_path / "runs" / "demo" / "align" / "final"
    tokenizer = build_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)])
    policy.build_from_preset("tiny", {}, tokenizer, seed=0).save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final.parent / "manifest.json").write_text("{}")
    return final


def wait_healthy(url, server, seconds):
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                assert json.loads(response.read())["status"] == "ok"
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.5)


@pytest.mark.slow
def test_server_over_a_stage_checkpoint_answers_a_chat_completion(tmp_path):
    final = stage_checkpoint(tmp_path)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "r1pipeline.serve", "--runs-dir", str(tmp_path / "runs"),
                               "--run", "demo", "--port", str(port), "--device", "cpu"], cwd=ROOT,
                              env={**pipeline_env(), "HF_HUB_CACHE": ""}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 180)
        reply = ask(url, str(final.resolve()), [{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8)
        assert isinstance(reply, str)
        assert (tmp_path / "runs" / "demo" / ".hf_cache").is_dir(), "the server's cache directory exists"
        chat = subprocess.run([sys.executable, "-m", "r1pipeline.chat", "--runs-dir", str(tmp_path / "runs"),
                               "--run", "demo", "--url", url, "--max-tokens", "8"], cwd=ROOT, env=pipeline_env(),
                              input="What is 2 + 3?\n", capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith(f"chatting with {final.resolve()}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_llama_cpp_server_over_a_stage_gguf_answers_a_chat_completion(tmp_path):
    """`make export` then `make serve GGUF=1`: llama.cpp's server on loopback over the GGUF."""
    final = stage_checkpoint(tmp_path)
    runs = ["--runs-dir", str(tmp_path / "runs"), "--run", "demo"]
    done = subprocess.run([sys.executable, "-m", "r1pipeline", "export", *runs, "--gguf", "--type", "q8_0"], cwd=ROOT,
                          env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    exported = final.parent / "export" / "demo-align-q8_0.gguf"
    assert exported.is_file() and (final.parent / "export" / "Modelfile").read_text().startswith("# Ollama")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "r1pipeline.serve", *runs, "--port", str(port), "--gguf"],
                              cwd=ROOT, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 120)
        reply = ask(url, "demo", [{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8)
        assert isinstance(reply, str)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0
