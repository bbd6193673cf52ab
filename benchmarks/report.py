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
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def publish(text: str, write: bool) -> None:
    """Print a report; with `write`, also append it to BENCHMARKS.md."""
    print(text)
    if write:
        with open(BENCHMARKS_MD, "a") as f:
            f.write("\n" + text)
