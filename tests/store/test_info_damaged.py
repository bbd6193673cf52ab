"""`gptcli info` describes a damaged checkpoint instead of failing (issue 26, item 18): a
truncated or otherwise unreadable weights file is a problem in the description, as a
checksum mismatch is."""

import json
import shutil

import pytest
from conftest import own_cache, run_cli, tiny_config, write_corpus

from gptcli.config import config_from_dict
from gptcli.store.info import checkpoint_info
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.pretrain import pretrain


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run, trained once for this module; tests damage copies of it."""
    root = tmp_path_factory.mktemp("info")
    with own_cache(root):
        pretrain(config_from_dict(tiny_config([str(write_corpus(root / "corpus"))], root / "run", max_steps=4,
                                              save_every=4, eval_every=4)))
    return root / "run"


@pytest.fixture
def damaged(tmp_path, trained_run):
    """A copy of the run and a function that damages its checkpoint's weights file."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    weights = resolve_checkpoint(run) / "model.safetensors"

    def damage(how: str) -> None:
        data = weights.read_bytes()
        if how == "truncate":  # cut inside the tensors: the header is intact
            weights.write_bytes(data[:-100])
        elif how == "cut_header":  # nothing left but part of the header
            weights.write_bytes(data[:20])
        elif how == "flip":
            weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
        else:  # the header's JSON broken
            weights.write_bytes(data[:8] + b"{" * 8 + data[16:])

    return run, damage


def test_truncated_weights_are_described_with_the_problem(damaged, trained_run):
    run, damage = damaged
    intact = checkpoint_info(trained_run)
    damage("truncate")
    info = checkpoint_info(run)
    assert info["model"] == intact["model"] and info["parameters"] == intact["parameters"]
    assert info["tokenizer"] == "bytes" and info["step"] == 4
    assert info["checksums"].startswith("FAILED") and "model.safetensors" in info["checksums"]
    assert any("model.safetensors is truncated" in p for p in info["problems"]), info["problems"]


@pytest.mark.parametrize("how", ["cut_header", "garbled_header"])
def test_unreadable_header_falls_back_to_the_run_config(damaged, trained_run, how):
    run, damage = damaged
    intact = checkpoint_info(trained_run)
    damage(how)
    info = checkpoint_info(run)
    assert info["model"] == intact["model"] and info["parameters"] == intact["parameters"]
    assert info["tokenizer"] == "bytes" and info["checksums"].startswith("FAILED")
    assert any("not a readable safetensors file" in p for p in info["problems"]), info["problems"]
    assert any("config.yaml" in p for p in info["problems"])


def test_bit_flip_is_reported_as_before(damaged):
    run, damage = damaged
    damage("flip")
    info = checkpoint_info(run)
    assert info["checksums"].startswith("FAILED") and "problems" not in info


def test_intact_checkpoint_has_no_problems(trained_run):
    info = checkpoint_info(trained_run)
    assert info["checksums"].startswith("ok") and "problems" not in info


def test_cli_info_on_truncated_weights_exits_0(damaged, capsys):
    run, damage = damaged
    damage("truncate")
    code, out, err = run_cli(["info", run, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["checksums"].startswith("FAILED")
    code, out, err = run_cli(["info", run], capsys)
    assert code == 0 and "FAILED" in out + err, err


def test_unreadable_weights_without_a_run_config_still_describe_the_rest(tmp_path):
    """An imported checkpoint's config.yaml gives no shape: the model is unknown (None),
    and everything else is still described."""
    from gptcli.config import ModelConfig
    from gptcli.data.tokenizers.tokenizer import BytesTokenizer
    from gptcli.model.gpt import GPT
    from gptcli.store.checkpoint import save_checkpoint

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=257))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, BytesTokenizer(), "# imported from Hugging Face x\n")
    (ckpt / "model.safetensors").write_bytes(b"\x05")
    info = checkpoint_info(ckpt)
    assert info["model"] is None and info["parameters"] is None and info["tokenizer"] == "bytes"
    assert info["checksums"].startswith("FAILED") and len(info["problems"]) == 2
