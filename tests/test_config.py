import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import gptcli.config
from gptcli.config import (
    Bounds,
    FinetuneModelConfig,
    FinetuneRunConfig,
    ModelConfig,
    RunConfig,
    _field,
    apply_overrides,
    config_from_dict,
    field_docs,
    field_problems,
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


# --- Rules declared on the fields ------------------------------------------------------


@pytest.mark.parametrize("bounds, says", [
    ({"at_least": 1}, "at least 1"),
    ({"at_least": 0}, "0 or more"),
    ({"above": 0}, "greater than 0"),
    ({"at_most": 8}, "at most 8"),
    ({"below": 1}, "less than 1"),
    ({"at_least": 0, "below": 1}, "in [0, 1)"),
    ({"above": 0, "below": 1}, "in (0, 1)"),
    ({"above": 0, "at_most": 1}, "in (0, 1]"),
    ({"at_least": 0, "says": "0 (off) or more"}, "0 (off) or more"),
])
def test_a_fields_rule_is_worded_from_its_bounds(bounds, says):
    assert str(_field(0, "help", **bounds).metadata["rule"]) == says


def test_a_field_has_one_bound_on_each_side():
    with pytest.raises(TypeError):
        _field(0, "help", at_least=0, above=0)
    with pytest.raises(TypeError):
        _field(0, "help", at_most=1, below=1)
    with pytest.raises(TypeError):
        _field(0, "help", says="0 or more")  # wording without a bound
    assert "rule" not in _field(0, "help").metadata


@dataclass
class Inner:
    share: float = _field(0.5, "A share.", above=0, below=1)


@dataclass
class Outer:
    count: int = _field(1, "A count.", at_least=1)
    limit: int | None = _field(None, "Optional.", at_least=1)
    flag: bool = _field(False, "Never range-checked.")
    inner: Inner = field(default_factory=Inner)
    items: list[Inner | str] = field(default_factory=list)


def test_the_generic_checker_names_every_broken_field_by_its_dotted_path():
    cfg = Outer(count=0, inner=Inner(share=1.0), items=[Inner(0.5), "text", Inner(-2.0)])
    assert field_problems(cfg, "top") == [
        "top.count: must be at least 1, got 0",
        "top.inner.share: must be in (0, 1), got 1.0",
        "top.items[2].share: must be in (0, 1), got -2.0",
    ]
    assert field_problems(Outer()) == []  # an empty optional field (limit) is not judged
    assert field_problems(Outer(limit=0)) == ["limit: must be at least 1, got 0"]
    assert field_problems(Outer(count=10**400)) == []
    huge = f"-1{'0' * 58}... (402 characters)"  # shortened, as errors quote every number
    assert field_problems(Outer(count=-10**400)) == [f"count: must be at least 1, got {huge}"]


def ruled_fields(cls: type, prefix: str = ""):
    """(dotted key, rule) of every field of a config class (and its sections) with a rule."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from ruled_fields(hint, f"{prefix}{f.name}.")
        elif "rule" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["rule"]


def breaking(rule: Bounds) -> int | float:
    """A value just outside the rule."""
    if rule.low is not None:
        return rule.low if rule.low_open else rule.low - 1
    return rule.high if rule.high_open else rule.high + 1


@pytest.mark.parametrize("cls", [RunConfig, FinetuneRunConfig])
def test_every_rule_of_every_section_is_checked_on_loading(cls):
    rules = dict(ruled_fields(cls))
    assert {"seed", "data.val_fraction", "model.n_layer", "model.logit_softcap", "train.lr"} <= set(rules)
    for key, rule in rules.items():
        *sections, name = key.split(".")
        data = {name: breaking(rule)}
        for section in reversed(sections):
            data = {section: data}
        with pytest.raises(GptcliError) as info:
            config_from_dict(data, cls)
        assert str(info.value).startswith(f"{key}: must be {rule}, got "), key


def test_rules_in_lists_of_sections_are_checked():
    tasks = [{"data": "a.jsonl"}, {"data": "b.jsonl", "name": "b", "limit": 0}]
    with pytest.raises(GptcliError, match=r"^train\.eval_tasks\[1\]\.limit: must be at least 1, got 0$"):
        config_from_dict({"train": {"eval_tasks": tasks}})
    with pytest.raises(GptcliError, match=r"^data\.inputs\[1\]\.weight: must be greater than 0, got -2\.0$"):
        config_from_dict({"data": {"inputs": [{"path": "a", "weight": 1}, {"path": "b", "weight": -2}]}})


def test_generate_eval_tasks_rules():
    generate = {"task": "generate", "data": "qa.jsonl", "metrics": ["f1", "rougeL"], "stop": ["\n"]}
    task = config_from_dict({"train": {"eval_tasks": [generate]}}).train.eval_tasks[0]
    assert (task.metrics, task.stop, task.max_new_tokens, task.metric_name) == (["f1", "rougeL"], ["\n"], 64, "generate")
    for train, message in (
            ({"eval_tasks": [{"task": "choice", "data": "c.jsonl", "metrics": ["f1"]}]},
             "metrics and stop are for generate tasks"),
            ({"eval_tasks": [{**generate, "metrics": []}]}, r"eval_tasks\[0\]\.metrics: name at least one metric"),
            ({"eval_tasks": [generate], "parallel": "fsdp"}, "generate tasks do not run under train.parallel=fsdp")):
        with pytest.raises(GptcliError, match=message):
            config_from_dict({"train": train})
    with pytest.raises(GptcliError, match="train.eval_tasks: tasks are scored by language models"):
        config_from_dict({"finetune": {"task": "classify"}, "train": {"eval_tasks": [generate]}}, FinetuneRunConfig)


def test_field_and_cross_field_problems_are_reported_together_in_one_line():
    with pytest.raises(GptcliError) as info:
        config_from_dict({"seed": -1, "data": {"val_fraction": 0}, "model": {"n_embd": 100, "dropout": 1},
                          "train": {"beta1": 1, "lr": 1e-4, "min_lr": 1e-3}})
    expected = [  # fields' rules in field order, then the rules across fields
        "seed: must be in [0, 2**64 - 1] (what both torch and numpy accept), got -1",
        "data.val_fraction: must be in (0, 1), got 0.0",
        "model.dropout: must be in [0, 1), got 1.0",
        "train.beta1: must be in [0, 1), got 1.0",
        "model.n_embd: 100 is not divisible by model.n_head=12; change one, or set model.head_dim",
        "train.min_lr: must be in [0, train.lr=0.0001], got 0.001",
    ]
    assert str(info.value) == "; ".join(expected)


def test_a_model_config_alone_is_named_as_in_a_run_config():
    with pytest.raises(GptcliError, match=r"^model\.n_head: must be at least 1, got 0$"):
        config_from_dict({"n_head": 0}, ModelConfig)
    with pytest.raises(GptcliError, match=r"^model\.norm_eps: must be greater than 0, got 0\.0$"):
        config_from_dict({"norm_eps": 0}, FinetuneModelConfig)


# --- One definition per model setting ---------------------------------------------------


def optional(hint) -> set:
    """The types a hint allows, None among them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint)) | {type(None)}
    return {hint, type(None)}


def test_the_finetune_model_section_is_derived_from_model_config():
    model, finetune = dataclasses.fields(ModelConfig), {f.name: f for f in dataclasses.fields(FinetuneModelConfig)}
    assert set(finetune) == {f.name for f in model}
    model_hints, finetune_hints = typing.get_type_hints(ModelConfig), typing.get_type_hints(FinetuneModelConfig)
    for f in model:
        assert optional(finetune_hints[f.name]) == optional(model_hints[f.name]), f.name  # its type, or empty
        assert finetune[f.name].default is None  # empty: the checkpoint's value
        assert finetune[f.name].metadata.get("rule") == f.metadata.get("rule"), f.name  # the same rule
        assert finetune[f.name].metadata["help"]
    assert FinetuneModelConfig() == FinetuneModelConfig(**{name: None for name in finetune})
    assert FinetuneRunConfig().model == FinetuneModelConfig()


def test_the_finetune_model_section_keeps_the_model_rules_and_the_checkpoints_values():
    cfg = config_from_dict({"model": {"dropout": 0.2, "block_size": 64}}, FinetuneRunConfig)
    assert (cfg.model.dropout, cfg.model.block_size, cfg.model.n_layer, cfg.model.arch) == (0.2, 64, None, None)
    with pytest.raises(GptcliError) as info:
        config_from_dict({"model": {"dropout": 1.5, "block_size": 0, "n_layer": 0, "logit_softcap": -1}},
                         FinetuneRunConfig)
    assert str(info.value).split("; ") == [
        "model.dropout: must be in [0, 1), got 1.5",
        "model.block_size: must be at least 1, got 0",
        "model.n_layer: must be at least 1, got 0",
        "model.logit_softcap: must be 0 (off) or more, got -1.0",
    ]


def test_each_model_setting_is_written_once():
    """ModelConfig's fields (with their rules) are the only place a model setting is written."""
    source = Path(gptcli.config.__file__).read_text()
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    written = {name: len(re.findall(rf"^    {name}\s*:", source, re.MULTILINE)) for name in names}
    assert written == {**{name: 1 for name in written}, "dropout": 2}  # and LoRAConfig's adapter dropout
    assert source.count("logit_softcap") == 1  # its definition, its rule on it, and nothing else
