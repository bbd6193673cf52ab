from pathlib import Path

import pytest

from gptcli.config import (
    FinetuneRunConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    field_docs,
    load_config,
    read_yaml,
)
from gptcli.errors import GptcliError


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_yaml_and_set_precedence(tmp_path):
    path = write(tmp_path, "train: {lr: 1.0e-3, batch_size: 8}\nmodel: {n_layer: 2}\n")
    cfg = load_config(path, ["train.lr=2e-4", "model.n_head=4", "model.n_embd=64"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 2e-4  # --set beats YAML
    assert cfg.train.batch_size == 8  # YAML beats defaults
    assert cfg.train.max_steps == 2000  # default
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 4, 64)


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 1e-3, min_lr: 1e-5}\n"))
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-5


def test_compile_accepts_yaml_booleans(tmp_path):
    assert load_config(write(tmp_path, "train: {compile: true}\n")).train.compile == "on"  # the old word
    assert load_config(write(tmp_path, "train: {compile: 'false'}\n")).train.compile == "off"  # saved by older runs
    assert load_config(None, ["train.compile=on"]).train.compile == "on"  # YAML's on is a boolean: read back


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(GptcliError, match=r"train\.learning_rat: unknown key"):
        load_config(write(tmp_path, "train: {learning_rat: 0.1}\n"))
    with pytest.raises(GptcliError, match=r"did you mean 'n_layer'"):
        load_config(write(tmp_path, "model: {n_layers: 2}\n"))


def test_wrong_types_name_the_dotted_path(tmp_path):
    with pytest.raises(GptcliError, match=r"train\.lr: expected a number, got 'abc'"):
        load_config(None, ["train.lr=abc"])
    with pytest.raises(GptcliError, match=r"model\.n_layer: expected a whole number"):
        load_config(None, ["model.n_layer=2.5"])
    with pytest.raises(GptcliError, match=r"model\.bias: expected true or false"):
        load_config(None, ["model.bias=maybe"])
    with pytest.raises(GptcliError, match=r"train\.precision: expected one of auto, fp32, bf16, fp16"):
        load_config(None, ["train.precision=fp8"])


def test_all_problems_reported_at_once():
    with pytest.raises(GptcliError) as info:
        config_from_dict({"train": {"lr": "x", "bogus": 1}, "model": {"n_layer": "y"}})
    message = str(info.value)
    assert "train.lr" in message and "train.bogus" in message and "model.n_layer" in message
    assert "\n" not in message


@pytest.mark.parametrize("cls", [RunConfig, FinetuneRunConfig])
def test_type_and_range_problems_reported_together(cls):
    """A wrong type elsewhere used to hide range problems until the next try."""
    with pytest.raises(GptcliError) as info:
        config_from_dict({"train": {"lr": "abc", "batch_size": -3, "warmup_steps": -1}}, cls)
    problems = str(info.value).split("; ")
    assert problems[0] == "train.lr: expected a number, got 'abc'"
    assert "train.batch_size: must be at least 1, got -3" in problems
    assert "train.warmup_steps: must be 0 or more, got -1" in problems
    assert sum(p.startswith("train.lr") for p in problems) == 1  # the defaulted lr is not re-judged


@pytest.mark.parametrize("override, message", [
    ("model.n_embd=100", r"model\.n_embd: 100 is not divisible by model\.n_head=12"),
    ("model.block_size=0", r"model\.block_size: must be at least 1"),
    ("train.lr=0", r"train\.lr: must be greater than 0"),
    ("train.lr=-1", r"train\.lr: must be greater than 0"),
    ("data.val_fraction=1.0", r"data\.val_fraction: must be in \(0, 1\)"),
    ("data.val_fraction=0", r"data\.val_fraction: must be in \(0, 1\)"),
    ("train.batch_size=-2", r"train\.batch_size: must be at least 1"),
    ("train.grad_accum=0", r"train\.grad_accum: must be at least 1"),
    ("model.dropout=1.5", r"model\.dropout: must be in \[0, 1\)"),
])
def test_out_of_range_values(override, message):
    with pytest.raises(GptcliError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("just a string\n", "top level must be a mapping"),
    ("train:\n\tlr: 1\n", "invalid YAML"),
    ("train: {lr: 1\n", "invalid YAML"),
    ("train:\n  lr: 1\n  lr: 2\n", "duplicate key 'lr'"),
    ("train: 5\n", r"train: expected a mapping"),
])
def test_malformed_yaml(tmp_path, text, message):
    with pytest.raises(GptcliError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(GptcliError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.lr", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("out_dir.x=1", "'out_dir' is not a section"),
])
def test_bad_set_syntax(override, message):
    with pytest.raises(GptcliError, match=message):
        apply_overrides({"out_dir": "runs/x"}, [override])


def test_set_unknown_key():
    with pytest.raises(GptcliError, match=r"train\.nope: unknown key"):
        load_config(None, ["train.nope=1"])


def test_list_values_and_single_string_inputs():
    cfg = load_config(None, ["data.inputs=[a.txt, b.txt]"])
    assert cfg.data.inputs == ["a.txt", "b.txt"]
    assert load_config(None, ["data.inputs=stdlib"]).data.inputs == ["stdlib"]


def test_padded_vocab_and_head_dim():
    cfg = load_config(None, ["model.vocab_size=50257"])
    assert cfg.model.padded_vocab_size == 50304 and cfg.model.head_dim == 64


def test_every_field_is_documented():
    docs = field_docs()
    assert {"train.lr", "data.tokenizer", "model.n_layer", "out_dir"} <= {k for k, _, _ in docs}
    assert all(help_text for _, _, help_text in docs)


def test_shipped_configs_load():
    from pathlib import Path

    from gptcli.config import FinetuneRunConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in configs.glob("*.yaml"):
        load_config(path, cls=FinetuneRunConfig if path.name.startswith("finetune-") else RunConfig)


def test_readme_config_reference_lists_every_key():
    from pathlib import Path

    from gptcli.config import FinetuneRunConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    keys = {key for key, _, _ in field_docs()} | {key for key, _, _ in field_docs(FinetuneRunConfig)}
    missing = sorted(key for key in keys if f"| `{key}` |" not in readme)
    assert not missing, f"README config reference lacks {missing}"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from gptcli.config import FinetuneRunConfig

    kind = FinetuneRunConfig if path.name.startswith("finetune-") else RunConfig
    cfg = load_config(path, [], kind)
    assert cfg.out_dir.startswith("runs/")
