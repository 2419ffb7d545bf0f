"""The machine a figure came from, named well enough to tell two hosts of one kind apart.

`platform.processor()` says "x86_64" on Linux; hosts of that one name differ 2-3x in speed here
(an AMD EPYC with AVX-512 against one with AVX2) and round GEMMs differently, so one seed's
trajectory differs between them. Manifests and benchmark results record `describe()`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The widest vector extension first: what MKL/oneDNN dispatch on, and what tells the CPU kinds apart.
_ISA = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "avx", "neon", "asimd")


def _cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def describe() -> dict:
    """CPU model, its widest vector ISA, cores, and the GPU when there is one."""
    try:
        model, flags = _cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = None, set()
    found = {"cpu": model or platform.processor() or platform.machine(),
             "isa": [name for name in _ISA if name in flags][:2], "cores": os.cpu_count(),
             "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        return found
    found["torch"] = torch.__version__
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def name(host: dict | None = None) -> str:
    """One line for logs and tables, of `host` (a `describe()` a manifest kept) or of this machine:
    'AMD EPYC (avx512_bf16, 2 cores)', or the GPU's name."""
    host = host or describe()
    if "gpu" in host:
        return host["gpu"]
    isa = host["isa"][0] if host.get("isa") else host.get("platform", "vector ISA unknown")
    return f"{host.get('cpu', '?')} ({isa}, {host.get('cores', '?')} cores)"
