"""The model families gptcli knows: one file each, one table of them.

A family (spec.py) is everything its name means: the components `model.arch` fills in
(config.py), its Hugging Face model_types, config.json and tensor names (store/hf.py), its
GGUF architectures (store/gguf_export.py). Every family is built as the one GPT of
model/gpt.py, its components chosen by the config, so a family holds no torch code and
config.py can read this table without importing torch.

Adding a family is a file here that defines `FAMILY` (copy llama.py), its module in the
table below, and its tests; a component the GPT does not have yet (a new norm, MLP or
position encoding) is a ModelConfig choice built in model/gpt.py first.
"""

from __future__ import annotations

from gptcli.errors import GptcliError, shorten
from gptcli.families import gpt2, llama
from gptcli.families.spec import COMPONENTS, GGUF, Family, HuggingFace, Layout

__all__ = ["COMPONENTS", "DEFAULT_FAMILY", "FAMILIES", "GGUF", "Family", "HuggingFace", "Layout",
           "family_of_model_type", "get_family"]

FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in (gpt2, llama)}
DEFAULT_FAMILY = "gpt2"  # model.arch's default, and what a checkpoint without `arch` holds


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise GptcliError(f"unknown model architecture '{shorten(name)}'; gptcli knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_model_type(model_type: object) -> Family | None:
    """The family a Hugging Face config.json's model_type belongs to; None if none does."""
    for family in FAMILIES.values():
        if family.hf is not None and model_type in family.hf.model_types:
            return family
    return None
