"""Hugging Face GPT-2 interop: import a `save_pretrained` directory, export one.

Weight layout differences, and nothing else:
- HF GPT-2 stores linear layers as `Conv1D`, weight (in, out): transposed here.
- Keys may carry a `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, as the hub's
  `gpt2` files); `lm_head.weight` is tied to `wte` and the `attn.bias`/`attn.masked_bias`
  buffers of old files are causal masks, so all three are ignored.
- gptcli pads the vocabulary to a multiple of 64; padded rows are zeros on import and
  dropped on export, so import -> export -> import is bit-identical.
A bias-free gptcli model exports with zero biases, which GPT-2 computes identically.

GPT-2's tokenizer files (`vocab.json`, `merges.txt`) are derived from tiktoken's BPE
ranks on export, and ranks are derived from `vocab.json` on import, so no tokenizer
download is needed either way.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptcli.atomic import staging_dir
from gptcli.config import ModelConfig
from gptcli.data.bpe import GPT2_PATTERN
from gptcli.data.tokenizer import (
    EOT,
    TiktokenTokenizer,
    Tokenizer,
    named_tiktoken,
    tiktoken_from_file,
    tiktoken_from_ranks,
)
from gptcli.errors import GptcliError, shorten
from gptcli.model.gpt import GPT, check_fits
from gptcli.model.lora import merge_lora
from gptcli.outputs import check_output_dir, input_paths, mark
from gptcli.paths import cache_root
from gptcli.store.checkpoint import CHECKPOINTS, checkpoint_task, is_checkpoint, load_model, save_checkpoint

HF_CONFIG, HF_WEIGHTS, HF_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFERS = (["attn", "bias"], ["attn", "masked_bias"])  # h.N.attn.bias: a causal mask, not a weight
GPT2_EOT_ID = 50256


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / HF_CONFIG).is_file() and ((path / HF_WEIGHTS).is_file() or (path / HF_PICKLE).is_file())


# --- GPT-2's byte <-> printable-character table (its vocab.json spells bytes this way) ----


def byte_to_char() -> dict[int, str]:
    """GPT-2 writes each byte as a printable character: the printable Latin-1 bytes stand
    for themselves, every other byte (controls, space, 0x7F-0xA0, 0xAD) takes the next code
    point from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def tokenizer_files(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt contents from BPE ranks: the merge that makes each
    multi-byte token is found by running BPE on its bytes with only lower ranks."""
    table = byte_to_char()
    vocab = {_spell(token, table): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, ranks)
            merges.append(f"{_spell(left, table)} {_spell(right, table)}")
    return vocab, merges


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins last when building `token` (merging lowest ranks first)."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        best, i = min(candidates)
        if best >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise GptcliError(f"token {token!r} cannot be built by BPE merges from its ranks")
    return parts[0], parts[1]


def ranks_from_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
    """BPE ranks from a GPT-2 vocab.json (special tokens left out)."""
    char_to_byte = {c: b for b, c in byte_to_char().items()}
    ranks = {}
    for spelled, rank in vocab.items():
        if spelled.startswith("<|") and spelled.endswith("|>"):
            continue
        ranks[bytes(char_to_byte[c] for c in spelled)] = rank
    return ranks


def _is_gpt2_tokenizer(tokenizer: Tokenizer) -> bool:
    return (isinstance(tokenizer, TiktokenTokenizer) and tokenizer.vocab_size == GPT2_EOT_ID + 1
            and tokenizer.eot_id == GPT2_EOT_ID and tokenizer.encoding._pat_str == GPT2_PATTERN)


# --- import ------------------------------------------------------------------------------


_HF_SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / HF_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GptcliError(f"{path} is unreadable: {shorten(str(exc), 200)}") from None
    if not isinstance(config, dict):
        raise GptcliError(f"{path} must hold a JSON object of settings, not a {type(config).__name__}; "
                          f"it is not a Hugging Face config")
    if config.get("model_type") != "gpt2":
        raise GptcliError(f"{hf_dir} holds a '{shorten(str(config.get('model_type')))}' model; only "
                          f"GPT-2 (model_type gpt2) can be imported")
    _check_hf_sizes(path, config)
    unsupported = {
        "activation_function": ("gelu_new", config.get("activation_function", "gelu_new")),
        "n_inner": (None, config.get("n_inner")),
        "scale_attn_by_inverse_layer_idx": (False, config.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": (False, config.get("reorder_and_upcast_attn", False)),
        "layer_norm_epsilon": (1e-5, config.get("layer_norm_epsilon", 1e-5)),
    }
    for name, (wanted, found) in unsupported.items():
        if found != wanted and not (name == "n_inner" and found == 4 * config["n_embd"]):
            raise GptcliError(f"{hf_dir}: {name}={shorten(repr(found))} is not supported (gptcli's GPT "
                              f"needs {wanted!r})")
    return config


def _check_hf_sizes(path: Path, config: dict) -> None:
    """The sizes GPT-2 is built from: each present, a whole number (not a boolean) of at
    least 1; n_head divides n_embd."""
    for name in _HF_SIZES:
        if name not in config:
            raise GptcliError(f"{path}: '{name}' is missing; a GPT-2 config names {', '.join(_HF_SIZES)}")
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GptcliError(f"{path}: {name} must be a whole number of at least 1, got "
                              f"{shorten(json.dumps(value))}")
    if config["n_embd"] % config["n_head"]:
        raise GptcliError(f"{path}: n_embd={shorten(str(config['n_embd']))} is not divisible by "
                          f"n_head={shorten(str(config['n_head']))}; the config is damaged")


def _gptcli_key(hf_key: str) -> str | None:
    """gptcli's name for an HF GPT-2 tensor; None for the ones import skips (the tied
    lm_head and old files' causal-mask buffers)."""
    key = hf_key.removeprefix("transformer.")
    if key == "lm_head.weight" or key.split(".")[-2:] in _MASK_BUFFERS:
        return None
    return key


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the weights file's header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise GptcliError(f"{path} is unreadable: {exc}") from None


def _check_block_count(path: Path, found: dict[str, tuple[int, ...]], n_layer: int) -> None:
    """The weights file must hold blocks h.0 ... h.{n_layer - 1}, so a config.json claiming
    a million layers is refused before anything is built."""
    blocks = {int(m.group(1)) for name in found if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", name))}
    if len(blocks) != n_layer or max(blocks, default=-1) != n_layer - 1:  # exactly 0 ... n_layer - 1
        raise GptcliError(f"{path} holds {len(blocks)} blocks but {HF_CONFIG} says n_layer="
                          f"{shorten(str(n_layer), 20)}; the weights and {HF_CONFIG} do not belong together")


def _check_weight_shapes(path: Path, found: dict[str, tuple[int, ...]], model: GPT) -> None:
    """Every tensor of the weights file must have the shape config.json implies, checked
    before any tensor is loaded; names the first that differs."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    hf_names = {_gptcli_key(name): name for name in found}  # the others are reported after loading
    for key, shape in expected.items():  # in the model's order: wte, wpe, h.0 ...
        if key not in hf_names:
            continue
        name = hf_names[key]
        want = shape[::-1] if key.endswith(_CONV1D) else shape  # Conv1D weights are (in, out)
        if key == "wte.weight":
            want = (model.config.vocab_size, model.config.n_embd)  # unpadded rows
        if found[name] != want:
            raise GptcliError(f"{path}: {shorten(name)} has shape {list(found[name])}, but config.json "
                              f"implies {list(want)}; the weights and config.json do not belong together")


def hf_tokenizer(hf_dir: Path, tokenizer_path: str | Path | None) -> Tokenizer:
    """The tokenizer of an HF GPT-2 directory: a given .tiktoken file, its vocab.json, or
    tiktoken's `gpt2` encoding (downloaded once by tiktoken)."""
    if tokenizer_path is not None:
        return tiktoken_from_file(tokenizer_path)
    if (hf_dir / "vocab.json").is_file():
        vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
        ranks = ranks_from_vocab(vocab)
        return tiktoken_from_ranks(ranks, "gpt2", GPT2_PATTERN, {EOT: vocab.get(EOT, len(ranks))})
    return named_tiktoken("gpt2")


def import_hf_model(hf_dir: str | Path) -> GPT:
    """A gptcli GPT with the weights of an HF GPT-2 directory (fp32)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / HF_WEIGHTS).is_file():
        if (hf_dir / HF_PICKLE).is_file():
            raise GptcliError(
                f"{hf_dir} has only {HF_PICKLE} (a pickle, which gptcli never loads); convert it with "
                f"transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, "
                f"safe_serialization=True)")
        raise GptcliError(f"{hf_dir} has no {HF_WEIGHTS}")
    config = _read_hf_config(hf_dir)
    cfg = ModelConfig(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                      block_size=config["n_positions"], vocab_size=config["vocab_size"], bias=True,
                      dropout=0.0)
    found = _header_shapes(hf_dir / HF_WEIGHTS)
    _check_block_count(hf_dir / HF_WEIGHTS, found, cfg.n_layer)  # before building: n_layer may be absurd
    check_fits(cfg, torch.device("cpu"), training=False,
               fix=f"{hf_dir} holds a model too large for this machine (or a damaged {HF_CONFIG})")
    model = GPT(cfg)
    _check_weight_shapes(hf_dir / HF_WEIGHTS, found, model)
    try:
        weights = load_file(hf_dir / HF_WEIGHTS)
    except (OSError, SafetensorError) as exc:
        raise GptcliError(f"{hf_dir / HF_WEIGHTS} is unreadable: {exc}") from None
    state = {}
    for hf_key, value in weights.items():
        key = _gptcli_key(hf_key)
        if key is None:
            continue
        if key.endswith(_CONV1D):
            value = value.t()
        if key == "wte.weight":  # pad to gptcli's vocabulary rows with zeros
            padded = torch.zeros(cfg.padded_vocab_size, cfg.n_embd, dtype=value.dtype)
            padded[: value.size(0)] = value
            value = padded
        state[key] = value.float().contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise GptcliError(f"{hf_dir / HF_WEIGHTS}: not GPT-2 weights (missing {sorted(missing)[:3]}, "
                          f"unexpected {shorten(str(unexpected[:3]), 200)})")
    return model.eval()


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer_path: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """`gptcli import-hf`: write an HF GPT-2 directory as a gptcli checkpoint directory
    (`overwrite`: replacing an earlier import)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise GptcliError(f"{hf_dir} is not a directory")
    target = check_output_dir(out, "checkpoint", replace=overwrite,
                              inputs=input_paths([hf_dir, tokenizer_path or ""]))
    model = import_hf_model(hf_dir)
    tokenizer = hf_tokenizer(hf_dir, tokenizer_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise GptcliError(f"the tokenizer has {tokenizer.vocab_size} ids but the model {model.config.vocab_size}")
    note = f"# imported from Hugging Face GPT-2 directory {hf_dir}\n"
    save_checkpoint(target, model, tokenizer, note, mark_as="checkpoint")
    return Path(out)


def cached_import(hf_dir: Path) -> Path:
    """An HF directory used where a checkpoint is expected: imported once into the cache,
    keyed by its path, size and modification time."""
    weights = hf_dir / HF_WEIGHTS
    if not weights.is_file():
        import_hf_model(hf_dir)  # raises the right error (pickle only, no weights)
    info = weights.stat()
    stamp = f"{hf_dir.resolve()}:{info.st_size}:{info.st_mtime_ns}"
    target = cache_root().parent / "hf" / hashlib.sha256(stamp.encode()).hexdigest()[:24]
    if not is_checkpoint(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        import_hf(hf_dir, target)
    return target


# --- export ------------------------------------------------------------------------------


def export_hf(source: Path, out: str | Path, overwrite: bool = False) -> Path:
    """`gptcli export-hf`: the checkpoint directory `source` as an HF directory that
    transformers loads (`overwrite`: replacing an earlier export). The export may not
    overlap the checkpoint nor the run that holds it."""
    run = source.parent.parent if source.parent.name == CHECKPOINTS else source
    target = check_output_dir(out, "hf-export", replace=overwrite, inputs=input_paths([run, source]))
    model, tokenizer = load_model(source)
    classifier = checkpoint_task(source) == "classify"
    if model.lora_spec is not None:
        merge_lora(model)
    cfg = model.config
    state = model.state_dict()  # GPT-2's names (plus `score.weight` for a classifier)
    weights = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        if key == "wte.weight":
            value = value[: cfg.vocab_size]
        if key.endswith(_CONV1D):
            value = value.t()
        prefix = "" if key.startswith("score.") else "transformer."
        weights[prefix + key] = value.contiguous()
    if not cfg.bias:  # GPT-2 always has biases: zeros compute the same function
        for key, value in state.items():
            layer = key.removesuffix(".weight")  # a linear layer or LayerNorm, unless an embedding or head
            if key.endswith(".weight") and layer not in ("wte", "wpe", "lm_head", "score"):
                weights[f"transformer.{layer}.bias"] = torch.zeros(value.shape[0])  # (out,) or (C,)
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification" if classifier else "GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": True, "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
        "torch_dtype": "float32",
    }
    if classifier:
        config.update(num_labels=len(model.labels), pad_token_id=tokenizer.eot_id,
                      id2label={str(i): name for i, name in enumerate(model.labels)},
                      label2id={name: i for i, name in enumerate(model.labels)})
    with staging_dir(target) as work:
        mark(work, "hf-export")
        save_file(weights, work / HF_WEIGHTS, metadata={"format": "pt"})
        (work / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if _is_gpt2_tokenizer(tokenizer):
            vocab, merges = tokenizer_files(tokenizer.encoding._mergeable_ranks)
            vocab[EOT] = tokenizer.eot_id
            (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            (work / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT,
                 "unk_token": EOT, "model_max_length": cfg.block_size, "add_prefix_space": False}))
    return Path(out)


