"""The one run skeleton: a finetune config's typed `model` section, TrainerState's fields in
trainer.json (and the old `extra` mapping still read), the named random streams."""

import json
import shutil

import pytest
from conftest import PY_SNIPPETS, run_cli, tiny_config

from gptcli.config import FinetuneRunConfig, config_from_dict
from gptcli.data.training.dataset import STREAMS
from gptcli.errors import GptcliError
from gptcli.store.checkpoint import (
    TrainerState,
    load_trainer_state,
    read_model_config,
    read_trainer_json,
)
from gptcli.store.rundir import read_pointer
from gptcli.tasks.finetune import finetune
from gptcli.tasks.pretrain import pretrain


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained run (context 32), trained once for this module."""
    root = tmp_path_factory.mktemp("skeleton")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text("".join(PY_SNIPPETS) * 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTCLI_CACHE", str(root / "cache"))
        pretrain(config_from_dict(tiny_config([str(corpus)], root / "run", max_steps=4, save_every=4,
                                              eval_every=4)))
    return root / "run"


def lm_finetune(tmp_path, base_run, model: dict) -> dict:
    text = tmp_path / "text.txt"
    text.write_text("".join(PY_SNIPPETS) * 40)
    return {"out_dir": str(tmp_path / "ft"), "finetune": {"task": "lm", "init_from": str(base_run)},
            "data": {"inputs": [str(text)], "tokenizer": "bytes"}, "model": model,
            "train": {"max_steps": 2, "eval_every": 2, "eval_batches": 1, "batch_size": 2,
                      "device": "cpu", "precision": "fp32", "compile": "off"}}


def test_model_section_is_typed_and_reports_every_problem_at_once(tmp_path, base_run):
    with pytest.raises(GptcliError, match=r"model.block_size: expected a whole number, got 'abc'"):
        config_from_dict(lm_finetune(tmp_path, base_run, {"block_size": "abc"}), FinetuneRunConfig)
    with pytest.raises(GptcliError) as info:
        config_from_dict(lm_finetune(tmp_path, base_run, {"blok_size": 8, "dropuot": 0.1}), FinetuneRunConfig)
    assert "model.blok_size: unknown key" in str(info.value) and "model.dropuot: unknown key" in str(info.value)
    cfg = config_from_dict(lm_finetune(tmp_path, base_run, {"n_layer": 6, "n_embd": 64}), FinetuneRunConfig)
    with pytest.raises(GptcliError) as info:
        finetune(cfg)
    assert "model.n_layer: the checkpoint has 2" in str(info.value)
    assert "model.n_embd: the checkpoint has 32" in str(info.value)
    assert not (tmp_path / "ft").exists()


def test_a_shorter_block_size_is_honoured(tmp_path, base_run):
    result = finetune(config_from_dict(lm_finetune(tmp_path, base_run, {"block_size": 16, "dropout": 0.1}),
                                       FinetuneRunConfig))
    saved = read_model_config(read_pointer(result.run_dir, "latest"))
    assert saved.block_size == 16 and saved.dropout == 0.1  # was silently dropped before


def test_trainer_state_fields_round_trip_and_old_checkpoints_still_read(tmp_path, base_run):
    checkpoint = read_pointer(base_run, "latest")
    state = load_trainer_state(checkpoint)
    assert state.global_batch == 4 and state.precision == "fp32" and len(state.val_sha256) == 64
    assert state.last_eval["step"] == 4
    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    info = json.loads((old / "trainer.json").read_text())
    moved = {key: info.pop(key) for key in ("global_batch", "precision", "val_sha256", "before", "last_eval")}
    (old / "trainer.json").write_text(json.dumps({**info, "extra": moved}))  # as written before
    from gptcli.store.checkpoint import write_manifest

    write_manifest(old)
    again = load_trainer_state(old)
    assert (again.global_batch, again.precision, again.val_sha256) == (4, "fp32", state.val_sha256)
    assert read_trainer_json(old)["precision"] == "fp32"
    assert "extra" not in TrainerState.__dataclass_fields__


def test_random_streams_are_named_and_distinct():
    assert set(STREAMS) == {"train", "val", "classify", "instruct", "dpo", "grpo"}
    assert len(set(STREAMS.values())) == len(STREAMS)


def test_finetune_without_config_has_a_builtin_example_for_classify_only(tmp_path, capsys):
    """lm and instruct take their data from --set (tasks/test_finetune.py); without it the
    config's own check names what is missing, after the base run is found."""
    code, _, err = run_cli(["finetune", "--task", "lm"], capsys)
    assert code == 2 and "no pretrained run found under runs/" in err
