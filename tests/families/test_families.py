"""The family table (gptcli/families/) is the one place a family is defined: every family
fills every entry, config's choices and the model registry are the table's names, Hugging
Face model_types lead back to their family, and a family added to the table (a toy one
here, with no Hugging Face or GGUF names) is loaded, pretrained, saved and refused for
export through it alone."""

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gptcli.config import (
    FinetuneModelConfig,
    ModelConfig,
    config_from_dict,
    load_config,
)
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.families import (
    COMPONENTS,
    DEFAULT_FAMILY,
    FAMILIES,
    Family,
    family_of_model_type,
    get_family,
)
from gptcli.model import get_arch
from gptcli.store.checkpoint import load_model, save_checkpoint
from gptcli.store.rundir import resolve_checkpoint

SHAPE = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 257}
# A third family: GPT-2's blocks with rotary positions and ReLU², its own defaults only.
TOY = Family(name="toy", summary="a test's own",
             defaults={"position": "rope", "norm": "layernorm", "mlp": "relu2", "bias": False,
                       "tie_embeddings": True, "zero_init": False})


def arch_choices(cls: type) -> tuple:
    """The values a config class's `arch` field accepts (None aside)."""
    hint = typing.get_type_hints(cls)["arch"]
    return tuple(choice for arg in typing.get_args(hint) for choice in (typing.get_args(arg) or (arg,))
                 if choice is not type(None))


def test_every_family_fills_every_entry():
    derived = {"vocab_size", "n_kv_head", "head_dim", "mlp_hidden"}  # from the shape, not the family
    assert set(COMPONENTS) == {f.name for f in dataclasses.fields(ModelConfig) if f.default is None} - derived
    assert DEFAULT_FAMILY in FAMILIES and ModelConfig().arch == DEFAULT_FAMILY == "gpt2"
    for name, family in FAMILIES.items():
        assert family.name == name and family.summary and get_family(name) is family
        assert set(family.defaults) == set(COMPONENTS)
        cfg = config_from_dict({"model": {**family.defaults, "arch": name}}).model  # valid choices, strictly
        assert {key: getattr(cfg, key) for key in COMPONENTS} == dict(family.defaults)
        assert load_config(None, [f"model.arch={name}"]).model == cfg  # and what the arch fills in
        assert family.gguf is None or family.hf is not None  # GGUF goes through the HF names


def test_config_choices_are_the_tables_names():
    assert arch_choices(ModelConfig) == arch_choices(FinetuneModelConfig) == tuple(FAMILIES) == ("gpt2", "llama")
    with pytest.raises(GptcliError, match=r"^model\.arch: expected one of gpt2, llama; got 'gpt3'$"):
        load_config(None, ["model.arch=gpt3"])
    with pytest.raises(GptcliError, match=r"^unknown model architecture 'gpt3'; gptcli knows gpt2, llama$"):
        get_arch("gpt3")


def test_hf_model_types_lead_back_to_their_family():
    seen = []
    for family in FAMILIES.values():
        if family.hf is None:
            continue
        seen += family.hf.model_types
        assert all(family_of_model_type(kind) is family for kind in family.hf.model_types)
        cfg = ModelConfig(arch=family.name, **SHAPE).resolved()
        assert family.hf.export_problems(cfg) == []  # a family's own defaults export
        written = family.hf.config(cfg)
        assert family_of_model_type(written["model_type"]) is family
        read = family.hf.settings({**written, "vocab_size": cfg.vocab_size}, Path("config.json"))
        assert ModelConfig(arch=family.name, **read).resolved() == cfg  # config.json both ways
    assert len(seen) == len(set(seen)), "a model_type in two families"
    assert family_of_model_type("phi3") is None


def test_gguf_architectures_are_ggufs():
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gptcli[gguf]')")
    for family in FAMILIES.values():
        if family.gguf is None:
            continue
        assert all(arch.upper() in gguf.MODEL_ARCH.__members__ for arch in family.gguf.archs)
        assert family.gguf.arch(ModelConfig(arch=family.name, **SHAPE).resolved()) in family.gguf.archs


def test_a_family_added_to_the_table_is_loaded_built_and_saved(monkeypatch, tmp_path):
    monkeypatch.setitem(FAMILIES, "toy", TOY)
    cfg = load_config(None, ["model.arch=toy", *(f"model.{k}={v}" for k, v in SHAPE.items())]).model
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("rope", "layernorm", "relu2", False, True)
    assert config_from_dict({"arch": "toy"}, FinetuneModelConfig).arch == "toy"  # a finetune config's model

    torch.manual_seed(0)
    model = get_arch("toy").model(cfg).eval()
    assert model.arch == "toy" and model.wpe is None and isinstance(model.h[0].ln_1, torch.nn.LayerNorm)
    path = save_checkpoint(tmp_path / "toy", model, BytesTokenizer(), "# toy\n")
    loaded, _ = load_model(path)  # its recorded arch leads back to the table
    idx = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        assert loaded.arch == "toy" and torch.equal(loaded(idx), model(idx))

    # What it has no names for is refused in one line.
    from gptcli.store.hf import export_hf

    with pytest.raises(GptcliError, match=r"cannot be exported: transformers has no class for arch toy$"):
        export_hf(path, tmp_path / "hf")
    if importlib.util.find_spec("gguf") is not None:
        from gptcli.store.gguf_export import export_gguf

        with pytest.raises(GptcliError, match=r"cannot be exported: llama.cpp has no architecture for arch toy$"):
            export_gguf(path, tmp_path / "toy.gguf")


def test_pretraining_builds_the_family_model_arch_names(monkeypatch, tmp_path, corpus_dir):
    from gptcli.tasks.pretrain import pretrain

    monkeypatch.setitem(FAMILIES, "toy", TOY)
    data = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=2, eval_every=2, save_every=2, log_every=1)
    data["model"]["arch"] = "toy"
    pretrain(config_from_dict(data))
    model, _ = load_model(resolve_checkpoint(tmp_path / "run"))
    assert model.arch == "toy" and model.config.mlp == "relu2" and model.wpe is None
