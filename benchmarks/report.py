"""What every benchmark does with its results: name the machine, print, append to BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def describe_machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"Machine: {cpu} ({cpu_features()}), {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


# The instruction sets that decide which kernels torch's CPU matrix products run, widest first.
_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
# Environment variables that narrow those kernels (to reproduce an older CPU on a newer one).
_ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_features() -> str:
    """The CPU's vector and matrix instruction sets (from /proc/cpuinfo), any limit put on
    them through the environment, and whether bf16 products measured faster than fp32's
    here (gptcli's own probe): e.g. 'avx512_bf16 avx512f avx2; bf16 fast'."""
    import torch

    from gptcli.runtime import bf16_matmul_is_fast

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    named = " ".join(flag for flag in _ISA_FLAGS if flag in flags) or "flags unknown"
    limits = [f"{name}={os.environ[name]}" for name in _ISA_LIMITS if name in os.environ]
    if limits:
        named += f", limited by {' '.join(limits)}"
    speed = "bf16 fast" if bf16_matmul_is_fast(torch.device("cpu")) else "bf16 slow"
    return f"{named}; {speed}"


def publish(text: str, write: bool) -> None:
    """Print a report; with `write`, also append it to BENCHMARKS.md."""
    print(text)
    if write:
        with open(BENCHMARKS_MD, "a") as f:
            f.write("\n" + text)
