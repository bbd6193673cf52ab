"""Every promised one-line error: mistakes that used to end in a traceback (or in an attempt
to allocate terabytes) are refused with exit code 2, one `error:` line, nothing written."""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptcli import runtime
from gptcli.config import SEED_RANGE, FinetuneRunConfig, ModelConfig, config_from_dict
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.data.tokenized.token_files import META_FILE
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.data.training import dataset as data_module
from gptcli.data.training.dataset import TokenDataset
from gptcli.errors import GptcliError, shorten
from gptcli.model.gpt import GPT, count_params
from gptcli.store.checkpoint import (
    build_model,
    load_model,
    save_checkpoint,
    write_manifest,
)

LONG = "x" * 5_000_000  # a value pasted by mistake: 5 MB


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """The error line, after checking the promise: exit 2, one `error:` line (last, after
    any progress lines), no traceback."""
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-2000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def write_config(tmp_path, data: dict, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- 1. a model too large to allocate ---------------------------------------------------


@pytest.mark.parametrize("shape", [
    dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=1, bias=True),
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, bias=False),
    dict(n_layer=3, n_head=4, n_embd=64, block_size=33, vocab_size=1000, bias=True),
    dict(n_layer=2, n_head=3, n_embd=48, block_size=7, vocab_size=64, bias=False),
], ids=str)
def test_count_params_is_the_models_count(shape):
    model = GPT(ModelConfig(**shape))
    assert count_params(model.config) == model.num_params() == sum(p.numel() for p in model.parameters())


def test_memory_check_counts_16_bytes_to_train_and_4_to_load(monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 8_000)
    cpu = torch.device("cpu")
    runtime.check_memory(2_000, cpu, training=False, what="m", fix="f")  # 8 KB of weights: fits
    runtime.check_memory(1_000, cpu, training=True, what="m", fix="f", shards=2)  # FSDP: 8 KB each
    with pytest.raises(GptcliError) as info:
        runtime.check_memory(1_000, cpu, training=True, what="model (n_layer=3)", fix="shrink it")
    assert str(info.value) == ("model (n_layer=3): about 1.0K parameters need at least 16.0 KB to train "
                               "(fp32 weights, gradients and AdamW moments); this machine has 8.0 KB "
                               "available; shrink it")


def test_sizes_read_in_thousands_even_past_float_range():
    assert runtime.human_count(1_234_567_890) == "1.2B"
    assert runtime.human_bytes(19_600_000_000_000) == "19.6 TB"
    assert runtime.human_count(10**400) == "1.0e+400"


def tokenized(corpus_dir, tmp_path):
    return tokenize_corpus([str(corpus_dir)], tmp_path / "tok", tokenizer="bytes", val_fraction=0.1, seed=0)


@pytest.mark.parametrize("override, fragments", [
    ("model.n_embd=1073741824", ["n_embd=1073741824", "to train", "available", "shrink model.n_layer"]),
    ("model.n_embd=1" + "0" * 400, ["n_embd=10000000000000000000...", "e+", "to train"]),
])
def test_pretrain_refuses_a_model_too_large_to_allocate(corpus_dir, tmp_path, capsys, override, fragments):
    config = write_config(tmp_path, tiny_config([str(corpus_dir)], tmp_path / "run"))
    code, _, err = run_cli(["pretrain", config, "--set", override], capsys)
    line = one_line_error(code, err, "parameters need at least", *fragments)
    assert len(line) < 500
    assert not (tmp_path / "run").exists()


def rewrite_model_config(checkpoint, **changes):
    """Change the model config stored in a checkpoint's weights (and its manifest to match)."""
    path = checkpoint / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(path)
    metadata["model_config"] = json.dumps({**json.loads(metadata["model_config"]), **changes})
    save_file(weights, path, metadata=metadata)
    write_manifest(checkpoint)


@pytest.mark.parametrize("changes, message", [
    (dict(block_size=2**40), r"about .* parameters need at least .* to load"),
    (dict(n_layer=10**9), r"n_layer=1000000000.*parameters need at least"),
    (dict(n_head=0), r"invalid model config: model\.n_head: must be at least 1"),
    (dict(n_embd=10**400), r"n_embd=1000.*e\+"),
    (dict(vocab_size="many"), r"invalid model config: vocab_size: expected a whole number"),
])
def test_a_checkpoint_with_an_absurd_config_is_refused_before_allocating(tmp_path, changes, message):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=257))
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, BytesTokenizer(), "# t\n")
    rewrite_model_config(checkpoint, **changes)
    with pytest.raises(GptcliError, match=message):
        build_model(checkpoint)
    with pytest.raises(GptcliError, match=message):
        load_model(checkpoint)


def test_huge_numbers_in_any_field_are_errors_not_tracebacks():
    expected = r"train\.lr: expected a number, got 1000.*\(401 characters\) \(int\)"
    with pytest.raises(GptcliError, match=expected):
        config_from_dict({"train": {"lr": 10**400}})
    cfg = config_from_dict({"model": {"n_embd": 10**400, "n_head": 1}})  # left to the memory check
    assert cfg.model.n_embd == 10**400


# --- 2. seeds ---------------------------------------------------------------------------


def test_the_seed_range_is_what_torch_and_numpy_both_accept():
    low, high = SEED_RANGE
    torch.manual_seed(high)
    np.random.default_rng([high, 0, 1])
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(high + 1)
    with pytest.raises(ValueError):
        np.random.default_rng([low - 1, 0, 1])


@pytest.mark.parametrize("cls", [None, FinetuneRunConfig])
@pytest.mark.parametrize("seed", [-1, 2**64, 10**30])
def test_seeds_outside_64_bits_are_refused(cls, seed):
    with pytest.raises(GptcliError, match=r"seed: must be in \[0, 2\*\*64 - 1\]"):
        config_from_dict({"seed": seed}, *([cls] if cls else []))


def test_seed_edges_are_accepted():
    assert config_from_dict({"seed": 0}).seed == 0
    assert config_from_dict({"seed": 2**64 - 1}, FinetuneRunConfig).seed == 2**64 - 1


def test_pretrain_refuses_a_seed_beyond_64_bits(corpus_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_config([str(corpus_dir)], tmp_path / "run"))
    code, _, err = run_cli(["pretrain", config, "--set", f"seed={2**64}"], capsys)
    one_line_error(code, err, "seed: must be in [0, 2**64 - 1]", str(2**64))
    assert not (tmp_path / "run").exists()


# --- 3. token ids the tokenizer does not have --------------------------------------------


def put_token(tok_dir, split: str, position: int, token: int) -> None:
    """Overwrite one id of a split and record the new checksum in meta.json, so that only
    a range check can tell the file is wrong."""
    meta = json.loads((tok_dir / META_FILE).read_text())
    (shard,) = meta["splits"][split]["shards"]
    file = tok_dir / shard["file"]
    ids = np.fromfile(file, dtype=meta["dtype"])
    ids[position] = token
    ids.tofile(file)
    shard["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    (tok_dir / META_FILE).write_text(json.dumps(meta))


def test_pretrain_refuses_token_ids_beyond_the_vocabulary(corpus_dir, tmp_path, capsys):
    tokenized(corpus_dir, tmp_path)
    TokenDataset.open(tmp_path / "tok")  # verified once, as a dataset in use would be
    put_token(tmp_path / "tok", "train", 100, 300)  # the bytes tokenizer has ids 0..256
    config = write_config(tmp_path, tiny_config([str(tmp_path / "tok")], tmp_path / "run"))
    code, _, err = run_cli(["pretrain", config], capsys)
    one_line_error(code, err, "train-00000.bin holds token id 300", "has 257 ids", "tokenize the corpus again")
    assert not (tmp_path / "run").exists()


def test_largest_id_is_remembered_with_the_checksum(corpus_dir, tmp_path, monkeypatch):
    tokenized(corpus_dir, tmp_path)
    put_token(tmp_path / "tok", "val", 0, 999)
    with pytest.raises(GptcliError, match="val-00000.bin holds token id 999"):
        TokenDataset.open(tmp_path / "tok")

    def read_again(*args):
        raise AssertionError("a verified file was read again")

    monkeypatch.setattr(data_module, "_digest_and_largest", read_again)
    with pytest.raises(GptcliError, match="val-00000.bin holds token id 999"):
        TokenDataset.open(tmp_path / "tok")  # refused again from .verified.json alone
    put_token(tmp_path / "tok", "val", 0, 5)  # a new version of the file is read
    with pytest.raises(AssertionError, match="read again"):
        TokenDataset.open(tmp_path / "tok")


# --- 4. import-hf ---------------------------------------------------------------------------

HF_SHAPE = dict(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=10)


def hf_dir(tmp_path, **shape):
    """A tiny Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**{**HF_SHAPE, **shape})
    path = tmp_path / "hf"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def edit_config(path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(change(config)))


def setting(**values):
    return lambda config: {**config, **values}


def without(name):
    return lambda config: {k: v for k, v in config.items() if k != name}


@pytest.mark.parametrize("change, message", [
    (setting(n_head=0), "n_head must be a whole number of at least 1, got 0"),
    (setting(n_head=3), "n_embd=8 is not divisible by n_head=3"),
    (lambda config: [config], "must hold a JSON object of settings, not a list"),
    (setting(n_layer="2"), 'n_layer must be a whole number of at least 1, got "2"'),
    (setting(n_embd=8.0), "n_embd must be a whole number of at least 1, got 8.0"),
    (setting(vocab_size=True), "vocab_size must be a whole number of at least 1, got true"),
    (setting(n_positions=-1), "n_positions must be a whole number of at least 1, got -1"),
    (without("vocab_size"), "'vocab_size' is missing"),
    (setting(n_layer=10**9), "n_layer=1000000000"),
    (setting(n_embd=2**30, n_head=1), "parameters need at least"),
    (setting(n_embd=16), "has shape [10, 8], but config.json implies [10, 16]"),
], ids=["n_head=0", "indivisible", "list", "string", "float", "bool", "negative", "missing",
        "deep", "wide", "contradicts weights"])
def test_import_hf_refuses_bad_configs(tmp_path, capsys, change, message):
    path = hf_dir(tmp_path)
    edit_config(path, change)
    code, _, err = run_cli(["import-hf", path, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_import_hf_names_the_first_weight_that_contradicts_the_config(tmp_path, capsys):
    path = hf_dir(tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(8, 16)  # config: (8, 4 * 8)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(["import-hf", path, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "transformer.h.0.mlp.c_fc.weight has shape [8, 16], but config.json "
                              "implies [8, 32]")
    assert not (tmp_path / "out").exists()


# --- 5. no error line quotes megabytes -------------------------------------------------------


def test_shorten_keeps_the_start_and_says_how_long():
    assert shorten("short") == "short"
    assert shorten("y" * 1000) == "y" * 60 + "... (1,000 characters)"


@pytest.mark.parametrize("text", [
    f"train:\n  precision: {LONG}\n",  # a choice
    f"model:\n  n_layer: {LONG}\n",  # a number
    f"data:\n  inputs: {{a: {LONG}}}\n",  # a list
    f"train:\n  ? {LONG}\n  : 1\n",  # an unknown key
    f"seed: {'9' * 4000}\n",  # a number of 4,000 digits
], ids=["choice", "number", "list", "key", "digits"])
def test_config_errors_quote_long_yaml_values_briefly(tmp_path, capsys, text):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, _, err = run_cli(["pretrain", config], capsys)
    assert len(one_line_error(code, err, "characters")) < 500


@pytest.mark.parametrize("override", [
    f"train.precision={LONG}", f"model.n_layer={LONG}", f"train.{LONG}=1", LONG, f"out_dir.{LONG}=1",
    "model.n_layer=" + "9" * 5000,  # more digits than Python turns into a number
])
def test_set_errors_quote_long_values_briefly(tmp_path, capsys, override):
    config = write_config(tmp_path, tiny_config(["corpus"], tmp_path / "run"))
    code, _, err = run_cli(["pretrain", config, "--set", override], capsys)
    assert len(one_line_error(code, err, "characters")) < 500
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("seed: " + "9" * 5000 + "\n", "invalid YAML value"),
    ("seed: 2024-13-45\n", "invalid YAML value"),
    ("? [a, b]\n: 1\n", "a key must be a plain value"),
])
def test_yaml_values_python_cannot_build_are_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, _, err = run_cli(["pretrain", config], capsys)
    assert len(one_line_error(code, err, message)) < 500
