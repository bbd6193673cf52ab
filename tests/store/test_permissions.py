"""What gptcli writes follows the umask, checkpoints included (issue 26, item 20): under
umask 022 other users of a shared machine can read a run, under 077 they cannot."""

import os
import stat

import pytest
from conftest import tiny_config

from gptcli.atomic import staging_dir
from gptcli.config import ModelConfig, config_from_dict
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import save_checkpoint
from gptcli.tasks.pretrain import pretrain

UMASKS = [0o022, 0o077]


@pytest.fixture
def umask(request):
    """Run the test under `request.param` as the process umask, restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes_under(root):
    """{path relative to root: permission bits} of every folder and file under root."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def assert_follow_umask(root, umask):
    folders, files = 0o777 & ~umask, 0o666 & ~umask
    wrong = {name: oct(mode) for name, mode in modes_under(root).items()
             if mode != (folders if (root / name).is_dir() else files)}
    assert not wrong, f"umask {oct(umask)}: folders should be {oct(folders)}, files {oct(files)}: {wrong}"


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_checkpoint_follows_umask(tmp_path, umask):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=257))
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000001", model, BytesTokenizer(), "# t\n")
    assert_follow_umask(tmp_path / "run", umask)


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_staged_folder_follows_umask_whatever_its_writers_did(tmp_path, umask):
    with staging_dir(tmp_path / "out") as work:
        (work / "private").write_text("x")
        os.chmod(work / "private", 0o600)  # as safetensors writes its files
        (work / "sub").mkdir(mode=0o700)
    assert_follow_umask(tmp_path, umask)


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_whole_run_follows_umask(tmp_path, corpus_dir, umask):
    pretrain(config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=4, save_every=2,
                                          eval_every=2, log_every=2)))
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    assert_follow_umask(tmp_path / "run", umask)
