"""benchmarks/gpu_check.py keeps working without a GPU: its --device cpu --tiny form runs
every correctness check and they pass (a failing check exits 1 and names itself)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_shakespeare

pytestmark = pytest.mark.slow  # the whole check on CPU: about 25 s

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@needs_shakespeare
def test_gpu_check_runs_its_correctness_checks_on_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    checks = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1] for line in table}
    for check in ("compiled vs eager training", "bf16 training", "fused AdamW equals unfused",
                  "torchrun ddp, 1 process", "torchrun fsdp, 1 process", "fp32 resume bit-identical"):
        assert checks[check] == "PASS", done.stdout
    assert set(checks.values()) <= {"PASS", "SKIP"}
