"""The `llama` family: Llama, Qwen2, Qwen3 and Mistral, and their names in Hugging Face and
llama.cpp.

Components: rotary positions, RMSNorm, a SwiGLU MLP, no biases, untied embeddings, output
projections started at zero; a config may add grouped-query attention (n_kv_head), q/k
RMSNorm (qk_norm), q/k/v biases (attn_bias), ReLU² or a logit soft-cap (model/gpt.py builds
them, under GPT-2's parameter names).

Hugging Face: Llama, Qwen2, Qwen3 and Mistral are one decoder (pre-RMSNorm blocks, rotary
positions, a SwiGLU MLP, grouped-query attention) with a few switches apart:

    class    model_type  q/k/v biases                 q/k RMSNorm  sliding window
    Llama    llama       attention_bias (o_proj too)  -            -
    Qwen2    qwen2       always (q/k/v only)          -            use_sliding_window
    Qwen3    qwen3       attention_bias (o_proj too)  always       use_sliding_window
    Mistral  mistral     -                            -            sliding_window
(Llama's mlp_bias biases gate, up and down.) gptcli's components choose the class on
export: qk_norm is Qwen3, q/k/v-only biases (attn_bias) Qwen2, biases on every linear layer
(bias) Llama with attention_bias and mlp_bias, and a plain model Llama, or Mistral (with no
window) when n_embd is not a multiple of n_head, a shape LlamaConfig refuses. Import maps
back the same way and refuses what gptcli does not compute: RoPE scaling, an active sliding
window, another activation, biases on part of the layers.

Tensors: gptcli's `attn.c_attn` is HF's q_proj, k_proj and v_proj stacked by rows, its
`mlp.c_fc` gate_proj then up_proj; both sides rotate in the "rotate half" layout (rope.py),
so query and key rows need no permutation. Everything else is a rename.

config.json is read as transformers 4.x writes it (`rope_theta` at the top, `rope_scaling`)
and as 5.x does (`rope_parameters: {rope_type, rope_theta}`), and written with both.

GGUF: `llama`, `qwen2` or `qwen3`, the class export-hf would pick (Mistral's shape, n_embd
not a multiple of n_head, is refused, as is `llama` with biases: llama.cpp's has no MLP
biases). llama.cpp's `llama` rotates query and key in interleaved pairs, where gptcli and HF
rotate the two halves of each head: its export reorders the rows of q and k so that pairs
(i, i + d/2) sit side by side (Qwen's GGUF classes rotate halves, as gptcli does).
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

_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "max_position_embeddings")
_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6}  # every class's, where config.json omits them
# Where config.json omits these, transformers takes the class's default (written as null, it
# derives them: the head count, hidden_size / heads); Llama has no default and derives them.
_CLASS_DEFAULTS = {"qwen2": {"num_key_value_heads": 32}, "qwen3": {"num_key_value_heads": 32, "head_dim": 128},
                   "mistral": {"num_key_value_heads": 8}}


# --- Hugging Face: config.json -> ModelConfig ----------------------------------------------


def settings(config: dict, path: Path) -> dict[str, Any]:
    """The gptcli shape of a Llama-family config.json (at `path`, its model_type one of
    FAMILY.hf.model_types), refusing what gptcli's GPT does not compute."""
    _check_sizes(config, path)
    _refuse_activation(config, path)
    _refuse_sliding_window(config, path)
    heads = config["num_attention_heads"]
    kv_heads = _optional_size(config, "num_key_value_heads", heads, path)
    if heads % kv_heads:
        raise GptcliError(f"{path}: num_key_value_heads={kv_heads} does not divide num_attention_heads="
                          f"{heads}; the config is damaged")
    bias, attn_bias = _biases(config, path)
    return {
        "n_layer": config["num_hidden_layers"], "n_head": heads, "n_embd": config["hidden_size"],
        "block_size": config["max_position_embeddings"], "vocab_size": config["vocab_size"], "dropout": 0.0,
        "n_kv_head": kv_heads, "head_dim": _head_dim(config, path), "rope_theta": _rope_theta(config, path),
        "norm_eps": _positive(config.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"]), "rms_norm_eps", path),
        "bias": bias, "attn_bias": attn_bias, "qk_norm": config["model_type"] == "qwen3",
        "mlp_hidden": config["intermediate_size"], "tie_embeddings": _flag(config, "tie_word_embeddings", path),
    }


def _check_sizes(config: dict, path: Path) -> None:
    """The sizes every class needs: each present, a whole number (not a boolean) of at least 1."""
    kind = config["model_type"]
    for name in _SIZES:
        if name not in config:  # "holds a ... model": the words GPT-2 import used to refuse these with
            raise GptcliError(f"{path.parent} holds a '{kind}' model but {path.name} lacks '{name}'; a "
                              f"{kind} config names {', '.join(_SIZES)}")
        _check_whole(config[name], name, path)


def _check_whole(value, name: str, path: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GptcliError(f"{path}: {name} must be a whole number of at least 1, got "
                          f"{shorten(json.dumps(value))}")


def _optional_size(config: dict, name: str, derived: int, path: Path) -> int:
    """A size config.json may leave out (the class's default, else `derived`) or write as
    null (`derived`)."""
    value = config.get(name, _CLASS_DEFAULTS.get(config["model_type"], {}).get(name))
    if value is None:
        return derived
    _check_whole(value, name, path)
    return value


def _head_dim(config: dict, path: Path) -> int:
    """head_dim as given, else hidden_size / num_attention_heads (Qwen3: its default)."""
    head_dim = _optional_size(config, "head_dim", config["hidden_size"] // config["num_attention_heads"], path)
    _check_whole(head_dim, "head_dim (hidden_size // num_attention_heads)", path)
    if head_dim % 2:
        raise GptcliError(f"{path}: head_dim={head_dim} is odd, but rotary embeddings rotate pairs of "
                          f"dimensions; the config is damaged")
    return head_dim


def _positive(value, name: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise GptcliError(f"{path}: {name} must be a number greater than 0, got {shorten(json.dumps(value))}")
    return float(value)


def _flag(config: dict, name: str, path: Path) -> bool:
    value = config.get(name, False)
    if not isinstance(value, bool):
        raise GptcliError(f"{path}: {name} must be true or false, got {shorten(json.dumps(value))}")
    return value


def _refuse_activation(config: dict, path: Path) -> None:
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # one function under two names
        raise GptcliError(f"{path}: hidden_act={shorten(json.dumps(act))} is not supported; gptcli's "
                          f"SwiGLU gates with silu")


def _refuse_sliding_window(config: dict, path: Path) -> None:
    """Refuse attention limited to a window shorter than the context: gptcli attends over
    all of it. (Mistral applies `sliding_window` whenever it is set; Qwen2/3 only with
    use_sliding_window, on the layers `layer_types` marks.)"""
    kind, context = config["model_type"], config["max_position_embeddings"]
    if kind == "mistral":
        window = config.get("sliding_window")
        if window is not None and not (isinstance(window, int) and window >= context):
            raise GptcliError(f"{path}: sliding_window={shorten(json.dumps(window))} is shorter than the "
                              f"context (max_position_embeddings={context}); gptcli has no sliding-window "
                              f"attention")
    if kind in ("qwen2", "qwen3"):
        if config.get("use_sliding_window"):
            raise GptcliError(f"{path}: use_sliding_window=true is not supported; gptcli has no "
                              f"sliding-window attention")
        layer_types = config.get("layer_types") or []
        if any(layer != "full_attention" for layer in layer_types):
            raise GptcliError(f"{path}: layer_types {shorten(json.dumps(layer_types))} has layers other "
                              f"than full_attention; gptcli has only full attention")


def _rope_theta(config: dict, path: Path) -> float:
    """The RoPE base, where transformers 5 looks for it: `rope_scaling` or `rope_parameters`
    (a dict with rope_type and rope_theta), else the top-level `rope_theta` (4.x)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(value, dict) for value in params.values()):
        raise GptcliError(f"{path}: rope_parameters {shorten(json.dumps(params))} is not one dict of "
                          f"settings (per-layer RoPE is not supported)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise GptcliError(f"{path}: RoPE scaling rope_type={shorten(json.dumps(rope_type))} is not "
                          f"supported; gptcli implements plain RoPE (rope_type \"default\")")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise GptcliError(f"{path}: partial_rotary_factor={shorten(json.dumps(partial))} is not supported; "
                          f"gptcli rotates every dimension of a head")
    theta = params.get("rope_theta", config.get("rope_theta", _DEFAULTS["rope_theta"]))
    return _positive(theta, "rope_theta", path)


def _biases(config: dict, path: Path) -> tuple[bool, bool]:
    """gptcli's (bias, attn_bias) for the class's bias switches: Qwen2's q/k/v biases are
    attn_bias; Llama's attention_bias with mlp_bias bias every linear layer, as gptcli's
    bias does. A switch alone biases layers gptcli leaves unbiased, and is refused."""
    kind = config["model_type"]
    if kind == "qwen2":
        return False, True
    attention = _flag(config, "attention_bias", path) if kind in ("llama", "qwen3") else False
    mlp = _flag(config, "mlp_bias", path) if kind == "llama" else False
    if attention == mlp:
        return attention, False
    if attention:
        fix = "(Qwen3 has no MLP biases)" if kind == "qwen3" else "without mlp_bias"
        raise GptcliError(f"{path}: attention_bias=true {fix} is not supported: it biases q/k/v and "
                          f"o_proj, while gptcli biases q/k/v only (attn_bias) or every linear layer (bias)")
    raise GptcliError(f"{path}: mlp_bias=true without attention_bias is not supported; gptcli biases "
                      f"every linear layer (bias) or q/k/v only (attn_bias)")


# --- Hugging Face: tensors -----------------------------------------------------------------


def canonical(name: str, cfg: ModelConfig) -> str | None:
    """A stored tensor's name for `layout`; None for those import skips: the lm_head of
    tied embeddings (transformers ties it to embed_tokens on loading too) and the
    `rotary_emb.inv_freq` buffers older files hold (derived from rope_theta)."""
    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
        return None
    return name


def layout(cfg: ModelConfig) -> Layout:
    """For each gptcli tensor, in the model's order, the HF tensors stacked by rows to make
    it, with their shapes. A tied lm_head is wte, so it has none."""
    C, V = cfg.n_embd, cfg.vocab_size
    plan: Layout = {"wte.weight": [("model.embed_tokens.weight", (V, C))]}
    for i in range(cfg.n_layer):
        plan.update(_block_layout(cfg, i))
    plan["ln_f.weight"] = [("model.norm.weight", (C,))]
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [("lm_head.weight", (V, C))]
    return plan


def _block_layout(cfg: ModelConfig, i: int) -> Layout:
    C, H, hs = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    q, kv = cfg.n_head * hs, cfg.n_kv_head * hs
    qk_norms = [("attn.q_norm", [("self_attn.q_norm", hs)], None, False),
                ("attn.k_norm", [("self_attn.k_norm", hs)], None, False)]
    # (gptcli module, [(HF module, its output rows)], input width (None: a norm's gain), has biases)
    modules = [
        ("ln_1", [("input_layernorm", C)], None, False),
        ("attn.c_attn", [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)], C,
         cfg.bias or cfg.attn_bias),
        *(qk_norms if cfg.qk_norm else []),
        ("attn.c_proj", [("self_attn.o_proj", C)], q, cfg.bias),
        ("ln_2", [("post_attention_layernorm", C)], None, False),
        ("mlp.c_fc", [("mlp.gate_proj", H), ("mlp.up_proj", H)], C, cfg.bias),
        ("mlp.c_proj", [("mlp.down_proj", C)], H, cfg.bias),
    ]
    plan: Layout = {}
    for module, parts, width, biased in modules:
        hf = [(f"model.layers.{i}.{name}", rows) for name, rows in parts]
        plan[f"h.{i}.{module}.weight"] = [(f"{name}.weight", (rows,) if width is None else (rows, width))
                                          for name, rows in hf]
        if biased:
            plan[f"h.{i}.{module}.bias"] = [(f"{name}.bias", (rows,)) for name, rows in hf]
    return plan


def to_gptcli(key: str, value):
    """An HF tensor in gptcli's orientation: the same (hf.py stacks q, k, v and gate, up by rows)."""
    return value


def export_problems(cfg: ModelConfig) -> list[str]:
    """What in `cfg` (resolved) no Llama-family class computes, each with its reason."""
    problems = []
    if cfg.position != "rope":
        problems.append(f"model.position={cfg.position} (the Llama family uses rotary positions)")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm} (the Llama family uses RMSNorm)")
    if cfg.mlp != "swiglu":
        problems.append(f"model.mlp={cfg.mlp} (the Llama family's MLP is SwiGLU)")
    if cfg.logit_softcap:
        problems.append(f"model.logit_softcap={cfg.logit_softcap} (no Llama-family class caps logits)")
    if cfg.qk_norm and cfg.bias:
        problems.append("model.qk_norm with model.bias (Qwen3, the class with q/k norms, has no MLP biases)")
    elif cfg.qk_norm and cfg.attn_bias:
        problems.append("model.qk_norm with model.attn_bias (Qwen3, the class with q/k norms, biases "
                        "o_proj whenever it biases q/k/v)")
    elif cfg.bias and cfg.n_embd % cfg.n_head:
        problems.append(f"model.bias with n_embd={cfg.n_embd} not a multiple of n_head={cfg.n_head} "
                        f"(LlamaConfig refuses that shape, and Mistral has no biases)")
    return problems


def model_type(cfg: ModelConfig) -> str:
    """The class that computes `cfg` (one export_problems accepts)."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.attn_bias and not cfg.bias:
        return "qwen2"
    if cfg.bias or cfg.n_embd % cfg.n_head == 0:
        return "llama"
    return "mistral"  # Llama without a window, and without LlamaConfig's n_embd % n_head check


def architecture(cfg: ModelConfig, classifier: bool) -> str:
    return f"{_CLASSES[model_type(cfg)]}For{'SequenceClassification' if classifier else 'CausalLM'}"


def hf_config(cfg: ModelConfig) -> dict:
    """config.json's settings for `cfg`, as transformers writes them (hf.py adds vocabulary,
    tokens and dtype); the RoPE base both as 4.x and as 5.x reads it."""
    kind = model_type(cfg)
    config = {
        "model_type": kind, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "dtype": "float32",
    }
    if kind == "llama":
        config.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if kind == "qwen3":
        config.update(attention_bias=False)
    if kind in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                      layer_types=["full_attention"] * cfg.n_layer)
    if kind == "mistral":
        config.update(sliding_window=None)
    return config


def hf_weights(state: dict, cfg: ModelConfig) -> dict:
    """HF tensors from gptcli's `state` (unpadded vocabulary rows, no lm_head when tied;
    plus `score.weight` for a classifier): fused projections split by rows, then renamed."""
    plan = layout(cfg)
    weights = {}
    for key, value in state.items():
        if key == "score.weight":  # the classifier head: the same name in both
            weights[key] = value.contiguous()
            continue
        parts = plan[key]
        for (name, _), piece in zip(parts, value.split([shape[0] for _, shape in parts])):
            weights[name] = piece.contiguous()
    return weights


# --- GGUF ----------------------------------------------------------------------------------


def gguf_arch(cfg: ModelConfig) -> str:
    """The GGUF architecture of the class export-hf writes, where llama.cpp computes it."""
    kind = model_type(cfg)
    if kind == "mistral":
        raise GptcliError(f"GGUF's llama needs n_embd ({cfg.n_embd}) to be a multiple of n_head ({cfg.n_head})")
    if kind == "llama" and cfg.bias:
        raise GptcliError("llama.cpp's llama has no MLP biases (model.bias)")
    return kind


def gguf_settings(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {"add_head_count_kv": cfg.n_kv_head, "add_layer_norm_rms_eps": cfg.norm_eps,
            "add_rope_freq_base": cfg.rope_theta, "add_rope_dimension_count": cfg.head_dim,
            "add_key_length": cfg.head_dim, "add_value_length": cfg.head_dim, "add_vocab_size": cfg.vocab_size}


def gguf_tensors(weights: dict, cfg: ModelConfig, arch: str) -> dict:
    """The HF tensors as GGUF lays them out: llama's q and k rows paired for interleaved
    rotation (qwen2 and qwen3 rotate halves, as HF does)."""
    if arch == "llama":
        for name in weights:
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                weights[name] = _pair_halves(weights[name], cfg.n_head)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                weights[name] = _pair_halves(weights[name], cfg.n_kv_head)
    return weights


def _pair_halves(rows, heads: int):
    """Reorder each head's rows (first half, second half) -> (h0[0], h1[0], h0[1], h1[1], ...):
    rotating pairs of neighbours then rotates the pairs (i, i + d/2) of the original.
    rows: (heads * d, ...) -> same shape."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


FAMILY = Family(
    name="llama",
    summary="the Llama/Qwen family: rotary positions, RMSNorm, SwiGLU, no biases, untied embeddings",
    defaults={"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
              "tie_embeddings": False, "zero_init": True},
    hf=HuggingFace(
        name="Llama-family", model_types=tuple(_CLASSES), layers_key="num_hidden_layers",
        layer=re.compile(r"model\.layers\.(\d+)\."),
        spare_rows=True,  # embeddings often have rows no token uses (Qwen pads to a multiple of 128)
        tokenizer="tokenizer.json",
        exportable=("export-hf writes the Llama family for models with rope, rmsnorm and swiglu (the arch "
                    "llama defaults) and no logit soft-cap"),
        settings=settings, canonical=canonical, layout=layout, to_gptcli=to_gptcli,
        export_problems=export_problems, architecture=architecture, config=hf_config, weights=hf_weights,
    ),
    gguf=GGUF(archs=("llama", "qwen2", "qwen3"), arch=gguf_arch, settings=gguf_settings, tensors=gguf_tensors),
)
