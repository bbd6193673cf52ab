"""The `gpt2` family: GPT-2 (2019) exactly, and its names in Hugging Face and llama.cpp.

Components: learned positions, pre-LayerNorm blocks, tanh-approximated GELU, biases, tied
input/output embeddings (model/gpt.py builds them; gptcli's parameter names are GPT-2's).

Hugging Face (GPT2LMHeadModel, GPT2ForSequenceClassification): weight layout differences,
and nothing else:
- HF GPT-2 stores linear layers as `Conv1D`, weight (in, out): transposed here.
- Keys may carry a `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, as the hub's
  `gpt2` files); `lm_head.weight` is tied to `wte` and the `attn.bias`/`attn.masked_bias`
  buffers of old files are causal masks, so all three are ignored.
GPT-2 always has biases: a gptcli model without some (`bias: false`, or q/k/v biases only)
exports with zeros in their place, which compute the same function. What GPT-2 has no
place for (rotary positions, RMSNorm, another MLP, grouped or resized heads, q/k norms, an
untied head, a logit soft-cap) is refused on export.

GGUF: architecture `gpt2`, its weights (out, in) again (Conv1D's transpose undone).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, shorten
from gptcli.families.spec import GGUF, Family, HuggingFace, Layout

if TYPE_CHECKING:
    from gptcli.config import ModelConfig

_SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFERS = (["attn", "bias"], ["attn", "masked_bias"])  # h.N.attn.bias: a causal mask, not a weight


# --- Hugging Face: config.json -> ModelConfig ----------------------------------------------


def settings(config: dict, path: Path) -> dict[str, Any]:
    """The gptcli shape of a GPT-2 config.json (at `path`), refusing settings gptcli's GPT
    does not compute."""
    _check_sizes(path, config)
    unsupported = {
        "activation_function": ("gelu_new", config.get("activation_function", "gelu_new")),
        "scale_attn_by_inverse_layer_idx": (False, config.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": (False, config.get("reorder_and_upcast_attn", False)),
    }
    for name, (wanted, found) in unsupported.items():
        if found != wanted:
            raise GptcliError(f"{path.parent}: {name}={shorten(repr(found))} is not supported (gptcli's GPT "
                              f"needs {wanted!r})")
    # The MLP width (n_inner; null: 4 x n_embd) and the LayerNorm epsilon are gptcli settings too.
    n_inner, eps = config.get("n_inner"), config.get("layer_norm_epsilon", 1e-5)
    if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int) or n_inner < 1):
        raise GptcliError(f"{path}: n_inner must be null or a whole number of at least 1, got "
                          f"{shorten(json.dumps(n_inner))}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise GptcliError(f"{path}: layer_norm_epsilon must be a number greater than 0, got "
                          f"{shorten(json.dumps(eps))}")
    return {"n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"],
            "block_size": config["n_positions"], "vocab_size": config["vocab_size"], "bias": True,
            "dropout": 0.0, "mlp_hidden": n_inner or 4 * config["n_embd"], "norm_eps": float(eps)}


def _check_sizes(path: Path, config: dict) -> None:
    """The sizes GPT-2 is built from: each present, a whole number (not a boolean) of at
    least 1; n_head divides n_embd."""
    for name in _SIZES:
        if name not in config:
            raise GptcliError(f"{path}: '{name}' is missing; a GPT-2 config names {', '.join(_SIZES)}")
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GptcliError(f"{path}: {name} must be a whole number of at least 1, got "
                              f"{shorten(json.dumps(value))}")
    if config["n_embd"] % config["n_head"]:
        raise GptcliError(f"{path}: n_embd={shorten(str(config['n_embd']))} is not divisible by "
                          f"n_head={shorten(str(config['n_head']))}; the config is damaged")


# --- Hugging Face: tensors -----------------------------------------------------------------


def canonical(name: str, cfg: ModelConfig) -> str | None:
    """The name `layout` gives a stored tensor (gptcli's); None for those import skips
    (the tied lm_head and old files' causal-mask buffers)."""
    key = name.removeprefix("transformer.")
    if key == "lm_head.weight" or key.split(".")[-2:] in _MASK_BUFFERS:
        return None
    return key


def layout(cfg: ModelConfig) -> Layout:
    """For each gptcli tensor, in the model's order, the HF tensor it is (canonical name
    and HF shape: Conv1D weights are (in, out)). The lm_head is wte."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in _block_shapes(C, cfg.mlp_hidden).items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return {key: [(key, shape)] for key, shape in shapes.items()}


def _block_shapes(C: int, H: int) -> dict[str, tuple[int, ...]]:
    """One block's HF tensors and shapes; H the MLP width."""
    return {"ln_1.weight": (C,), "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, H), "mlp.c_fc.bias": (H,),
            "mlp.c_proj.weight": (H, C), "mlp.c_proj.bias": (C,)}


def to_gptcli(key: str, value):
    """gptcli's tensor `key` from its one HF tensor: Conv1D weights transposed to (out, in)."""
    return value.t() if key.endswith(_CONV1D) else value


def export_problems(cfg: ModelConfig) -> list[str]:
    """The components of `cfg` (resolved) that GPT-2 has no place for, each with its reason."""
    problems = []
    if cfg.position != "learned":
        problems.append(f"model.position={cfg.position} (GPT-2 learns position embeddings)")
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm} (GPT-2 uses LayerNorm)")
    if cfg.mlp != "gelu":
        problems.append(f"model.mlp={cfg.mlp} (GPT-2's MLP is GELU)")
    if cfg.n_kv_head != cfg.n_head:
        problems.append(f"model.n_kv_head={cfg.n_kv_head} with n_head={cfg.n_head} (GPT-2 has no "
                        f"grouped-query attention)")
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        problems.append(f"model.head_dim={cfg.head_dim} (GPT-2's heads are n_embd / n_head = "
                        f"{cfg.n_embd / cfg.n_head:g} wide)")
    if cfg.qk_norm:
        problems.append("model.qk_norm (GPT-2 has no query/key norms)")
    if not cfg.tie_embeddings:
        problems.append("model.tie_embeddings=false (GPT-2's output head is wte)")
    if cfg.logit_softcap:
        problems.append(f"model.logit_softcap={cfg.logit_softcap} (GPT-2 does not cap logits)")
    return problems


def architecture(cfg: ModelConfig, classifier: bool) -> str:
    return "GPT2ForSequenceClassification" if classifier else "GPT2LMHeadModel"


def hf_config(cfg: ModelConfig) -> dict:
    """config.json's GPT-2 settings for `cfg` (hf.py adds vocabulary, tokens and dtype)."""
    return {
        # n_ctx too, as OpenAI's own GPT-2 configs carry it: llama.cpp's converter reads it.
        "model_type": "gpt2", "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_hidden == 4 * cfg.n_embd else cfg.mlp_hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": True,
    }


def hf_weights(state: dict, cfg: ModelConfig) -> dict:
    """HF GPT-2 tensors from gptcli's `state` (unpadded vocabulary rows, no lm_head; plus
    `score.weight` for a classifier)."""
    weights = {}
    for key, value in state.items():
        if key.endswith(_CONV1D):
            value = value.t()
        prefix = "" if key.startswith("score.") else "transformer."
        weights[prefix + key] = value.contiguous()
    for key, value in state.items():  # GPT-2 always has biases: zeros compute the same function
        layer = key.removesuffix(".weight")  # a linear layer or LayerNorm, unless an embedding or head
        if key.endswith(".weight") and layer not in ("wte", "wpe", "score"):
            # (out,) or (C,), fp32 as every exported tensor (load_model's weights are fp32)
            weights.setdefault(f"transformer.{layer}.bias", value.new_zeros(value.shape[0]))
    return weights


# --- GGUF ----------------------------------------------------------------------------------


def gguf_arch(cfg: ModelConfig) -> str:
    return "gpt2"  # whatever export-hf writes as GPT-2


def gguf_settings(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {"add_layer_norm_eps": cfg.norm_eps}


def gguf_tensors(weights: dict, cfg: ModelConfig, arch: str) -> dict:
    """GPT-2's HF tensors as GGUF lays them out: Conv1D weights back to (out, in)."""
    return {name: value.t() if name.endswith(_CONV1D) else value for name, value in weights.items()}


FAMILY = Family(
    name="gpt2",
    summary="GPT-2's, 2019",
    defaults={"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
              "tie_embeddings": True, "zero_init": False},
    hf=HuggingFace(
        name="GPT-2", model_types=("gpt2",), layers_key="n_layer", layer=re.compile(r"h\.(\d+)\."),
        spare_rows=False,  # GPT-2's embedding has exactly one row per token: the tokenizer must match it
        tokenizer="vocab.json",
        exportable="export-hf writes GPT-2 only for models with GPT-2's own components (the arch gpt2 defaults)",
        settings=settings, canonical=canonical, layout=layout, to_gptcli=to_gptcli,
        export_problems=export_problems, architecture=architecture, config=hf_config, weights=hf_weights,
    ),
    gguf=GGUF(archs=("gpt2",), arch=gguf_arch, settings=gguf_settings, tensors=gguf_tensors),
)
