"""Grouped rollouts outside the GRPO trainer: `num_samples` completions for every prompt, as rejection
sampling (DeepSeek-R1 §2.3.3) and evaluation need them.

Two engines: transformers `generate` and vLLM (its CPU build, installed by `make install`, or the
CUDA one with `pip install -e .[gpu]`; r1pipeline/vllm_engine.py). With `out_path`, every finished
prompt is appended to a JSONL file that a re-run resumes from, so a rollout of hours survives being
killed. With `workers`, the transformers engine generates batches in that many processes at once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from data.template import rendered

BACKENDS = ("transformers", "vllm")


def rollout(rows: list[dict], *, model, tokenizer=None, num_samples: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
            out_path: str | Path | None = None, backend: str = "transformers", desc: str = "rollout",
            workers: "int | Workers" = 1) -> list[dict]:
    """`{**row, "completions": [str] * num_samples, "completion_lengths": [int] * num_samples}` for
    every row, in the order of `rows`.

    rows: dicts with a unique string "id" and a "prompt": R1's rendered text (ending with "Assistant:"),
    or a conversation (a list of {role, content}) that the tokenizer's chat template renders; other
    columns are carried over. Completions are decoded without special tokens; a length counts the
    completion's tokens up to and including EOS. `batch_size` counts sequences, so a batch holds
    max(1, batch_size // num_samples) prompts. temperature 0 is greedy decoding.

    model: a loaded causal LM (with its `tokenizer`) or a checkpoint path for either backend, or a
    `vllm.LLM`. With `out_path`, each batch's records are appended and synced as it finishes, and a
    re-run generates only the prompts missing there. Samples are reproducible for a fixed seed and
    batch_size: transformers seeds a batch from (seed, its first id), vLLM each prompt from (seed, id).

    workers: with the transformers backend (vLLM schedules its own work) and `model` a checkpoint path,
    batches are generated in this many processes at once (`Workers`), torch's threads shared out among
    them. Decoding a small model does not keep two threads busy: on 2 CPU cores, two one-thread processes
    sampled 2,000 prompts x 2 of the embedded default (16 batches) 1.33x faster than one two-thread
    process, its eval's 200 x 8 (7 batches) 1.38x (benchmarks/rollout_workers.py).
    The batches and their seeds stay the same, so do the samples. A `Workers` given here outlives the
    call (evaluation samples checkpoint after checkpoint). A single batch is generated in this process.
    """
    _check_arguments(rows, num_samples, max_new_tokens, temperature, top_p, batch_size, backend, workers)
    pooled = backend == "transformers" and (isinstance(workers, Workers) or workers > 1)
    if pooled and not isinstance(model, (str, Path)):
        raise ValueError(f"workers={workers} needs `model` as a checkpoint path, which each worker process loads "
                         f"(got a loaded {type(model).__name__}); pass the path, or workers=1")
    done = _resume(Path(out_path), rows, num_samples) if out_path is not None else {}
    # Each batch's rows not done yet (`_batches` cuts them from all rows: a resumed rollout meets the same).
    todos = [todo for batch in _batches(rows, max(1, batch_size // num_samples))
             if (todo := [row for row in batch if row["id"] not in done])]
    pooled = pooled and len(todos) > 1  # one batch has nothing to share out: generated here, no processes
    options = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if pooled:
        pool = workers if isinstance(workers, Workers) else Workers(workers)
        generate, close = pool.engine(str(model), tokenizer, options), (None if pool is workers else pool.close)
    elif backend == "transformers":
        generate, close = _engine_over_batches(_transformers_engine(model, tokenizer, **options)), None
    else:
        generate, close = _vllm_engine(model, **options)
        generate = _engine_over_batches(generate)
    try:
        _generate_all(todos, len(rows), done, generate, seed, out_path, desc)
    finally:
        if close is not None:
            close()
    return [{**row, "completions": done[row["id"]]["completions"],
             "completion_lengths": done[row["id"]]["completion_lengths"]} for row in rows]


def _generate_all(todos, total, done, generate, seed, out_path, desc) -> None:
    """Generate the batches `todos` (of `total` rows, the rest in `done`), appending each batch to `out_path`
    in order. `generate(jobs)` maps (prompts, seeds) jobs to their samples, in order, as they finish."""
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    jobs = [([row["prompt"] for row in todo], [_seed(seed, row["id"]) for row in todo]) for todo in todos]
    with (
        open(out_path, "a", encoding="utf-8") if out_path is not None else nullcontext() as out,
        tqdm(total=total, initial=len(done), desc=desc, unit="prompt") as progress,
    ):
        for todo, samples in zip(todos, generate(jobs), strict=True):
            records = [{**row, "completions": texts, "completion_lengths": lengths}
                       for row, (texts, lengths) in zip(todo, samples, strict=True)]
            if out is not None:
                out.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
                out.flush()
                os.fsync(out.fileno())
            done.update((record["id"], record) for record in records)
            progress.update(len(todo))


def read_samples(path) -> list[dict]:
    """The valid records of a samples JSONL; a torn last line (killed mid-write) is ignored."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[list[dict], int]:
    """(records, bytes they span). Every record is written with its newline, so a last line without
    one was cut short by a kill and is not a record."""
    records, end = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
            end += len(line)
    return records, end


def _resume(path: Path, rows: list[dict], num_samples: int) -> dict[str, dict]:
    """The records already in `path` by id, after truncating a torn last line away so that appends
    start on a fresh line. Records that cannot belong to this rollout are an error, not skipped."""
    if not path.is_file():
        return {}
    records, end = _read(path)
    if end < path.stat().st_size:
        os.truncate(path, end)
    prompts = {row["id"]: row["prompt"] for row in rows}
    for record in records:
        if record.get("id") not in prompts:
            raise ValueError(f"{path} holds id {record.get('id')!r}, which is not in rows: "
                             "it belongs to another rollout; use another out_path")
        if record.get("prompt") != prompts[record["id"]]:
            raise ValueError(f"{path}: the prompt of id {record['id']!r} differs from rows'; use another out_path")
        if len(record.get("completions", ())) != num_samples:
            raise ValueError(f"{path}: id {record['id']!r} has {len(record.get('completions', ()))} completions, "
                             f"this rollout asks for num_samples={num_samples}; use another out_path")
    return {record["id"]: record for record in records}


def _check_arguments(rows, num_samples, max_new_tokens, temperature, top_p, batch_size, backend, workers) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid: {', '.join(BACKENDS)}")
    for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("workers", 1 if isinstance(workers, Workers) else workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; it must be an integer >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}; it must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}; it must be in (0, 1]")
    seen = set()
    for index, row in enumerate(rows):
        missing = [key for key in ("id", "prompt") if key not in row]
        if missing:
            raise ValueError(f"rows[{index}] has no {' and no '.join(map(repr, missing))}; "
                             "each row needs a string 'id' and 'prompt'")
        conversation = isinstance(row["prompt"], list) and all(
            isinstance(turn, dict) and {"role", "content"} <= set(turn) for turn in row["prompt"])
        if not isinstance(row["id"], str) or not (isinstance(row["prompt"], str) or conversation):
            raise ValueError(f"rows[{index}]: id={row['id']!r}, prompt of type {type(row['prompt']).__name__}; "
                             "the id must be a string, the prompt a string or a list of {role, content} messages")
        if row["id"] in seen:
            raise ValueError(f"rows[{index}]: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])


def _batches(rows: list[dict], prompts_per_batch: int) -> list[list[dict]]:
    """Prompts of similar length share a batch to cut padding; the longest come first so that a batch
    too large for memory fails at once, not hours in. Batches are cut from all rows, done or not, so
    that a resumed rollout meets the same batches (and seeds) as an uninterrupted one."""
    ordered = sorted(rows, key=lambda row: len(json.dumps(row["prompt"])), reverse=True)
    return [ordered[i:i + prompts_per_batch] for i in range(0, len(ordered), prompts_per_batch)]


def _seed(seed: int, row_id: str) -> int:
    """A seed per (rollout seed, prompt id), stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:4], "little") >> 1


def _transformers_engine(model, tokenizer, *, num_samples, max_new_tokens, temperature, top_p):
    """generate(prompts, seeds) -> [(texts, lengths)] with transformers' batched `generate`."""
    from transformers import AutoTokenizer, GenerationConfig

    from r1pipeline.policy import load_pretrained

    if isinstance(model, (str, Path)):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        if tokenizer.pad_token is None:  # as stages.common.load_policy does
            tokenizer.pad_token = tokenizer.eos_token
        model = load_pretrained(str(model), "float32").to("cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        raise ValueError("backend='transformers' with a loaded model needs its tokenizer (tokenizer=None given)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad_token, which left padding needs; "
                         "set tokenizer.pad_token = tokenizer.eos_token")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = temperature > 0
    # Every sampling knob is explicit: generate fills unset ones from the checkpoint's
    # generation_config or its own defaults (top_k=50), and vLLM applies none of those. The KV cache
    # too: a checkpoint saved by a Trainer elsewhere has config.use_cache=False (ours keep it on,
    # stages/common.py generation_ready), and generating without a cache recomputes the whole sequence
    # at every step (11-15x slower at 96 tokens, tiny preset).
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, repetition_penalty=1.0,
                              use_cache=True, eos_token_id=eos, pad_token_id=pad,
                              **(dict(temperature=temperature, top_p=top_p, top_k=0) if sampling else {}))

    def generate(prompts: list, seeds: list[int]) -> list[tuple[list[str], list[int]]]:
        # A conversation is rendered by the chat template, which writes its own special tokens (BOS...).
        chat = not isinstance(prompts[0], str)
        inputs = tokenizer([rendered(prompt, tokenizer) for prompt in prompts], return_tensors="pt", padding=True,
                           padding_side="left", add_special_tokens=not chat).to(model.device)
        input_ids = inputs["input_ids"].repeat_interleave(num_samples, dim=0)            # [P*G, S]
        attention_mask = inputs["attention_mask"].repeat_interleave(num_samples, dim=0)
        training = model.training
        model.eval()
        # One RNG stream samples the whole batch, seeded by its first prompt; forking it leaves the
        # caller's RNG (a trainer's, say) where it was.
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seeds[0])
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        finally:
            model.train(training)
        completions = output[:, input_ids.shape[1]:].tolist()                              # [P*G, <= T]
        lengths = [_length(ids, eos) for ids in completions]
        texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(completions, lengths)], skip_special_tokens=True)
        return [(texts[i:i + num_samples], lengths[i:i + num_samples])
                for i in range(0, len(texts), num_samples)]

    return generate


def _engine_over_batches(generate):
    """generate(prompts, seeds) as the jobs -> samples map `_generate_all` calls: one batch at a time, each
    generated only once the previous one has been written out."""
    return lambda jobs: (generate(prompts, seeds) for prompts, seeds in jobs)


class Workers:
    """`n` worker processes for `rollout(workers=...)`, torch's threads shared out among them, each keeping
    the last checkpoint it loaded. Spawned, not forked (a forked OpenMP runtime can hang), so starting
    them costs an import of torch each, in parallel (~5 s); used as a context manager, one set serves
    several rollouts."""

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers={n!r}; it must be an integer >= 1")
        self.n, self.threads = n, max(1, torch.get_num_threads() // n)
        # The processes start at the first batch submitted.
        self.executor = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.threads,))

    def __repr__(self) -> str:
        return f"Workers({self.n}, {self.threads} thread{'s' * (self.threads > 1)} each)"

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def engine(self, model: str, tokenizer, options: dict):
        """The jobs -> samples map of `_generate_all`: every batch submitted at once, its samples yielded
        in order as they come; the batches not started yet are cancelled if the caller stops early."""
        stamp = _checkpoint_stamp(model)

        def generate(jobs):
            futures = [self.executor.submit(_worker_generate, model, stamp, tokenizer, options, prompts, seeds)
                       for prompts, seeds in jobs]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()

        return generate


_WORKER_ENGINE: dict = {}  # in a worker process: the engine of the checkpoint it last loaded


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_generate(model: str, stamp: tuple, tokenizer, options: dict, prompts: list, seeds: list[int]):
    """One batch in a worker process, with the checkpoint loaded once (again if its files changed)."""
    key = (model, stamp, json.dumps(options, sort_keys=True))
    if _WORKER_ENGINE.get("key") != key:
        _WORKER_ENGINE.clear()  # one checkpoint in memory at a time
        _WORKER_ENGINE.update(key=key, generate=_transformers_engine(model, tokenizer, **options))
    return _WORKER_ENGINE["generate"](prompts, seeds)


def _checkpoint_stamp(path: str) -> tuple:
    """The checkpoint's files with their sizes and modification times: a worker reloads a path rewritten
    since it loaded it."""
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _length(ids: list[int], eos: int | None) -> int:
    """Tokens up to and including the first EOS; every token when the sequence never stopped (what
    follows EOS is padding)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)


def _vllm_engine(model, *, num_samples, max_new_tokens, temperature, top_p):
    """(generate(prompts, seeds) -> [(texts, lengths)], close) with vLLM's offline `LLM.generate`;
    close() frees an engine built here from a checkpoint path (None for a given `vllm.LLM`)."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("backend='vllm' needs vLLM: `make install` installs its CPU build, "
                          "`pip install -e .[gpu]` the CUDA one (or use backend='transformers')") from error
    from r1pipeline import vllm_engine

    if isinstance(model, (str, Path)):
        llm = vllm_engine.build_llm(str(model), seed=0)
        close = lambda: vllm_engine.shutdown(llm)  # noqa: E731
    else:
        llm, close = model, None

    def generate(prompts: list, seeds: list[int]) -> list[tuple[list[str], list[int]]]:
        # A seed per prompt: vLLM seeds each request's own generator, so one seed shared by the batch
        # would give every prompt the same random draws.
        params = [vllm.SamplingParams(n=num_samples, temperature=temperature, top_p=top_p,
                                      max_tokens=max_new_tokens, seed=seed) for seed in seeds]
        if not isinstance(prompts[0], str):  # a conversation: the chat template's tokens, no extra BOS
            tokenizer = llm.get_tokenizer()
            prompts = [{"prompt_token_ids": tokenizer(rendered(prompt, tokenizer), add_special_tokens=False)["input_ids"]}
                       for prompt in prompts]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [([sample.text for sample in request.outputs], [len(sample.token_ids) for sample in request.outputs])
                for request in outputs]

    return generate, close
