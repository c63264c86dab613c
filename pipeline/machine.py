"""What machine produced a result: CPU, its vector capability, cores, GPU and library versions.

Recorded in the committed metrics (``metrics/hpo.json``, ``metrics/eval.json``: the short
``machine`` and ``precision`` keys, so ``dvc metrics diff`` and ``dvc exp show`` show them) and in
every ``bench/results/*.json`` (the whole :func:`describe`). Numbers moved by the hardware rather
than by a change are then visible as such: the same code gives bf16 results on a CPU with bf16
units and fp32 results elsewhere (``train.precision: auto``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kind() -> str:
    """A short label for the CPU's class: what decides kernels and ``precision: auto`` here.

    ``amx`` (AMX tiles), ``avx512-bf16`` (AVX-512 with bf16 dot products), ``avx512``, ``avx2``,
    else the machine architecture."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine()


def gpu() -> dict[str, Any] | None:
    """The first CUDA device's name, capability and driver; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10).stdout.split()[0]
    return {"name": props.name, "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda}


def label(device: str = "cpu") -> str:
    """One line for tables and metrics: ``AMD EPYC (avx512-bf16, 2 cores)`` or the GPU's name."""
    if device == "cuda":
        info = gpu()
        if info is not None:
            return f"{info['name']} (x{info['count']})" if info["count"] > 1 else info["name"]
    return f"{cpu_model()} ({cpu_kind()}, {os.cpu_count()} cores)"


def describe() -> dict[str, Any]:
    """Everything a results file records about where it was measured."""
    import torch
    import transformers

    return {
        "label": label("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu": cpu_model(),
        "cpu_kind": cpu_kind(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def command() -> str:
    """The command line that is running, as a user would type it (for results files)."""
    return " ".join(["python", *sys.orig_argv[1:]])
