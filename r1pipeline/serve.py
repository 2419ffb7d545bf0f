"""`make serve RUN=... STAGE=...`: an OpenAI-compatible server on 127.0.0.1 over a stage's final
checkpoint, with transformers' own `transformers serve` (FastAPI + uvicorn: /health,
/v1/chat/completions, streaming too). With GGUF=1 (`--gguf`), the stage's GGUF export (`make export`)
served by llama.cpp's own server (the xllamacpp wheel), the same endpoints.

Our DeepSeek-V3-format checkpoints load there as transformers' DeepseekV3ForCausalLM (the MTP layer
is ignored); the tokenizer's chat template renders the conversation. Two pitfalls are handled here:
the server needs HF_HUB_CACHE to name an existing directory (it scans it for `/v1/models`), and a
server pinned to one model answers requests whose `model` is that model's path, printed at start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from r1pipeline.pipeline import STAGE_ORDER


def checkpoint_of(runs_dir: str, run: str, stage: str | None) -> Path:
    """The stage's final/ checkpoint; without a stage, the last finished one in R1's order."""
    run_dir = Path(runs_dir) / run
    stages = [stage] if stage else [name for name in reversed(STAGE_ORDER) if (run_dir / name / "manifest.json").is_file()]
    if stage is not None and stage not in STAGE_ORDER:
        raise SystemExit(f"r1pipeline serve: error: stage {stage!r}; allowed: {', '.join(STAGE_ORDER)}")
    for name in stages:
        final = run_dir / name / "final"
        if (final / "config.json").is_file():
            return final.resolve()
    raise SystemExit(f"r1pipeline serve: error: no finished stage {stage or ''} in {run_dir} (no final/config.json); "
                     f"run `make all RUN={run}` or name another run")


def server_command(checkpoint: Path, host: str, port: int, device: str) -> list[str]:
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    return [executable, "serve", str(checkpoint), "--host", host, "--port", str(port), "--device", device]


def server_env(checkpoint: Path) -> dict:
    cache = Path(os.environ.get("HF_HUB_CACHE") or checkpoint.parent.parent / ".hf_cache")
    cache.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m r1pipeline.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", default="default")
    parser.add_argument("--stage", default=None, help="a stage name (default: the last finished one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="cpu, cuda:0, or auto")
    parser.add_argument("--gguf", nargs="?", const="auto", default=None,
                        help="serve a GGUF with llama.cpp instead: a path, or (no value) the stage's `make export`")
    return parser.parse_args(argv)


def gguf_of(checkpoint: Path, given: str) -> Path:
    """The GGUF to serve: `given`, or the newest `make export` wrote for the checkpoint's stage."""
    if given != "auto":
        return Path(given)
    exported = sorted((checkpoint.parent / "export").glob("*.gguf"), key=lambda path: path.stat().st_mtime)
    if not exported:
        raise SystemExit(f"r1pipeline serve: error: no GGUF in {checkpoint.parent / 'export'}; run `make export` first")
    return exported[-1]


def serve_gguf(gguf: Path, host: str, port: int) -> int:
    """llama.cpp's server (llama-server's code, from the xllamacpp wheel) until SIGINT/SIGTERM."""
    import signal
    import threading

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.hostnames = [host]
    params.port = port
    params.cpuparams.n_threads = max(1, (os.cpu_count() or 2) // 2)
    server = xllamacpp.Server(params)
    print(f"[r1pipeline] serving {gguf} with llama.cpp on {server.listening_address}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    checkpoint = checkpoint_of(args.runs_dir, args.run, args.stage)
    if args.gguf:
        return serve_gguf(gguf_of(checkpoint, args.gguf), args.host, args.port)
    print(f"[r1pipeline] serving {checkpoint} on http://{args.host}:{args.port}/v1 (model name in requests: "
          f"{checkpoint}); `make chat` talks to it", flush=True)
    return subprocess.call(server_command(checkpoint, args.host, args.port, args.device), env=server_env(checkpoint))


if __name__ == "__main__":
    sys.exit(main())
