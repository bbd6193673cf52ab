"""Every config under configs/ runs as shipped, cut to two steps of a tiny model on CPU.

Paths inside the configs are relative to the working directory (the repository root, for a
user): `runs/demo` for the finetune configs, `../shared/data/tinyshakespeare.txt` for the
Shakespeare ones. Each test runs in `tmp_path/repo` beside a `tmp_path/shared` link to the
real shared folder, so those paths resolve unchanged.
"""

import shutil
from pathlib import Path

import pytest
from conftest import (
    GPT2_TIKTOKEN,
    SHAKESPEARE,
    SHARED,
    needs_gpt2_ranks,
    needs_shakespeare,
    run_cli,
)

from gptcli.config import load_config, read_yaml
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = "demo.yaml"
QUICK = ["train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", "train.save_every=2",
         "train.log_every=1", "train.device=cpu", "train.precision=fp32", "train.compile=off"]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]

# config -> (command, its own shortening on top of QUICK). A config added to configs/
# must be added here too (test_every_shipped_config_is_run_here).
SHIPPED = {
    DEMO: ("pretrain", TINY),
    "demo-draft.yaml": ("pretrain", TINY),
    "shakespeare-char.yaml": ("pretrain", TINY),
    "shakespeare-char-gpu.yaml": ("pretrain", [*TINY, "model.block_size=64", "train.batch_size=8"]),
    # data/openwebtext is the user's to make; tiktoken's own gpt2 files need a download, the
    # shared ranks file is the same encoding.
    "gpt2-124m.yaml": ("pretrain", [*TINY, "model.block_size=64", "train.batch_size=2",
                                    "train.grad_accum=1", f"data.inputs=[{SHAKESPEARE}]",
                                    f"data.tokenizer={GPT2_TIKTOKEN}"]),
    "shakespeare-char-modern.yaml": ("pretrain", TINY),
    "gpt2-124m-modern.yaml": ("pretrain", [*TINY, "model.block_size=64", "train.batch_size=2",
                                           "train.grad_accum=1", f"data.inputs=[{SHAKESPEARE}]",
                                           f"data.tokenizer={GPT2_TIKTOKEN}"]),
    "finetune-classify.yaml": ("finetune", []),
    "finetune-dpo.yaml": ("finetune", ["finetune.init_from=runs/demo"]),  # instruct's run is not made here
    "finetune-grpo.yaml": ("finetune", ["finetune.init_from=runs/demo"]),  # nor the SFT's
    "finetune-instruct.yaml": ("finetune", []),
    "finetune-lm.yaml": ("finetune", []),
    "finetune-sft-letters.yaml": ("finetune", []),
}
NEEDS = {  # shared data files the configs read
    "shakespeare-char.yaml": [needs_shakespeare],
    "shakespeare-char-gpu.yaml": [needs_shakespeare],
    "gpt2-124m.yaml": [needs_shakespeare, needs_gpt2_ranks],
    "shakespeare-char-modern.yaml": [needs_shakespeare],
    "gpt2-124m-modern.yaml": [needs_shakespeare, needs_gpt2_ranks],
    "finetune-lm.yaml": [needs_shakespeare],
}


def overrides(name: str) -> list[str]:
    return [*QUICK, *SHIPPED[name][1]]


def out_dir(name: str) -> str:
    return read_yaml(CONFIGS / name)["out_dir"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """configs/demo.yaml, shortened, trained once: the run the finetune configs start from."""
    work = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("GPTCLI_CACHE", str(work / "cache"))
        pretrain(load_config(CONFIGS / DEMO, overrides(DEMO)))
    return work / out_dir(DEMO)


@pytest.fixture
def repo(tmp_path, monkeypatch, demo_run) -> Path:
    """A working directory laid out like the repository: ../shared and runs/demo present."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work / out_dir(DEMO))
    (tmp_path / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    monkeypatch.chdir(work)
    return work


def test_every_shipped_config_is_run_here():
    shipped = sorted(p.name for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml"))
    assert shipped == sorted(SHIPPED), "add the new config to SHIPPED in this file"


def test_demo_config_trains(demo_run):
    assert resolve_checkpoint(demo_run).is_dir()


@pytest.mark.slow  # every shipped config a few steps: about 10 s
@pytest.mark.parametrize("name", [pytest.param(name, marks=NEEDS.get(name, []))
                                  for name in sorted(SHIPPED) if name != DEMO])
def test_shipped_config_runs(name, repo, capsys):
    command, _ = SHIPPED[name]
    args = [command, CONFIGS / name]
    for item in overrides(name):
        args += ["--set", item]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert resolve_checkpoint(repo / out_dir(name)).is_dir()
