"""Shared fixtures: tiny corpora, a tiny run config, the shared data files, an in-process CLI."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
from serving import chat_checkpoint, lm_checkpoint, serve_process  # noqa: F401  (fixtures for tests/serve)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
GPT2_TIKTOKEN = SHARED / "gpt2.tiktoken"

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data absent")
needs_gpt2_ranks = pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason="../shared/data absent")

PY_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nprint(os.getcwd())\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
    "# unicode: naïve café — 日本語 ✓\nname = 'ünïcödé'\n",
]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own tokenization cache and runs in its own working directory."""
    monkeypatch.setenv("GPTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def write_corpus(folder: Path) -> Path:
    """Write 40 small text documents (Python snippets repeated with variations) into `folder`."""
    (folder / "pkg").mkdir(parents=True)
    for i in range(40):
        text = "".join(PY_SNIPPETS[(i + j) % len(PY_SNIPPETS)] for j in range(6)) + f"# file {i}\n"
        sub = folder / "pkg" if i % 2 else folder
        (sub / f"mod_{i:02d}.py").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """This test's own copy of the 40-document corpus (see write_corpus)."""
    return write_corpus(tmp_path / "corpus")


@contextlib.contextmanager
def own_cache(folder: Path):
    """Run the block in `folder` with its own tokenization cache, whatever the test around
    it set: for fixtures that outlive one test (scope module or session)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTCLI_CACHE", str(folder / "cache"))
        patch.chdir(folder)
        yield folder


def tiny_config(inputs: list[str], out_dir: Path, **train) -> dict:
    """A run config (plain data) for a model small enough to train in seconds on CPU."""
    return {
        "out_dir": str(out_dir),
        "seed": 1234,
        "data": {"inputs": inputs, "tokenizer": "bytes", "val_fraction": 0.1},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0},
        "train": {"batch_size": 4, "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                  "eval_every": 10, "eval_batches": 2, "save_every": 10, "log_every": 5,
                  "precision": "fp32", "compile": "off", "device": "cpu", **train},
    }


def pretrained_base(root: Path, steps: int) -> Path:
    """A tiny byte-level model with a 64-token context pretrained `steps` steps on the test
    corpus, in `root/base`: the base run the post-training tests start from."""
    cfg = tiny_config([str(write_corpus(root / "corpus"))], root / "base", max_steps=steps)
    cfg["model"].update(block_size=64)
    with own_cache(root):
        from gptcli.config import config_from_dict
        from gptcli.tasks.pretrain import pretrain

        pretrain(config_from_dict(cfg))
    return root / "base"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `gptcli ARGS` in this process; return (exit code, stdout, stderr)."""
    from gptcli.cli.app import main

    old_argv = sys.argv
    sys.argv = ["gptcli", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def gpt2_shapes(n_layer: int, C: int, vocab_rows: int, block_size: int) -> dict[str, tuple[int, ...]]:
    """GPT-2's tensor names and shapes in gptcli's layout ((out, in) linear weights) for a
    model with biases: wte, wpe, every block, ln_f (no lm_head, which GPT-2 ties to wte)."""
    shapes = {"wte.weight": (vocab_rows, C), "wpe.weight": (block_size, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        shapes |= {f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
                   f"h.{i}.attn.c_attn.weight": (3 * C, C), f"h.{i}.attn.c_attn.bias": (3 * C,),
                   f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
                   f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
                   f"h.{i}.mlp.c_fc.weight": (4 * C, C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
                   f"h.{i}.mlp.c_proj.weight": (C, 4 * C), f"h.{i}.mlp.c_proj.bias": (C,)}
    return shapes


def pretrain_split_and_resumed(cfg: dict, out_dir: Path, first_steps: int) -> None:
    """Pretrain `cfg` into `out_dir` in two commands: its first `first_steps` steps, then
    --resume to its max_steps (to compare with a straight run of `cfg`)."""
    import json

    from gptcli.config import config_from_dict
    from gptcli.tasks.pretrain import pretrain

    split = json.loads(json.dumps(cfg))
    split["out_dir"] = str(out_dir)
    split["train"]["max_steps"] = first_steps
    pretrain(config_from_dict(split))
    split["train"]["max_steps"] = cfg["train"]["max_steps"]
    pretrain(config_from_dict(split), resume=True)



def nan_on_calls(monkeypatch, bad_calls: set[int]) -> None:
    """Make GPT.forward return NaN on the given (0-based) training calls."""
    from gptcli.model.gpt import GPT

    real = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        out = real(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] - 1 in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def step_losses(run_dir) -> dict[int, float]:
    """A run's logged training loss by step, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def write_json_config(path, cfg: dict):
    """`cfg` written to `path` as a config file (JSON is YAML); returns the path."""
    Path(path).write_text(json.dumps(cfg))
    return path
