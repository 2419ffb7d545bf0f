"""The run directory: manifests, content hashes, and which checkpoints are safe to resume from.

    runs/<run>/<stage>/
        stage_config.json   the resolved config and its hash, written when the stage starts
        checkpoint-N/       trainer checkpoints; COMPLETE is written only after everything else
        metrics.jsonl       one line per logged step
        final/              the HF checkpoint the next stage reads
        manifest.json       written last and atomically: the stage is done
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

COMPLETE = "COMPLETE"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Settings that change how fast a result comes, not the result: rollout's `workers` share the same
# batches (and seeds) out among processes. Left out of the hashes that decide whether a stage or an
# evaluation is done, so a run made with one count stays done for another.
SPEED_ONLY = ("workers",)


def result_settings(settings: dict) -> dict:
    """`settings` less the SPEED_ONLY keys."""
    return {key: value for key, value in settings.items() if key not in SPEED_ONLY}


def content_hash(path: Path, ignore: tuple[str, ...] = ()) -> str:
    """sha256 over the relative names and bytes of every file below `path`, less files named in `ignore`."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name not in ignore)
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / "manifest.json"
    return read_json(path) if path.is_file() else None


def mark_complete(checkpoint_dir: Path) -> None:
    atomic_write_text(Path(checkpoint_dir) / COMPLETE, f"{time.time()}\n")


def checkpoints(stage_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for each checkpoint-N, oldest first."""
    found = []
    for child in Path(stage_dir).glob("checkpoint-*"):
        match = CHECKPOINT.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, (child / COMPLETE).is_file()))
    return sorted(found)


def latest_complete_checkpoint(stage_dir: Path) -> Path | None:
    complete = [path for _, path, ok in checkpoints(stage_dir) if ok]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(stage_dir: Path) -> list[Path]:
    """Checkpoints killed while being written are never loaded; they are deleted so that the
    trainer can write the same step again."""
    removed = []
    for _, path, ok in checkpoints(stage_dir):
        if not ok:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def set_aside(stage_dir: Path, reason: str) -> Path:
    """Move a stage directory out of the way instead of deleting it: nothing is lost."""
    stage_dir = Path(stage_dir)
    target = stage_dir.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    stage_dir.rename(target)
    print(f"[r1pipeline] {stage_dir.name}: {reason}; moved the old outputs to {target}", flush=True)
    return target
