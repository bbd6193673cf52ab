"""Hugging Face interop: import a `save_pretrained` directory as a checkpoint, export one.

Each family of gptcli/families/ brings its mappings (config.json <-> ModelConfig, tensor
names and layouts: its `hf` entry), which this module drives:
- gpt2: GPT-2 (GPT2LMHeadModel, GPT2ForSequenceClassification) <-> arch `gpt2`;
- llama: Llama, Qwen2, Qwen3 and Mistral (...ForCausalLM, and on export
  ...ForSequenceClassification) <-> arch `llama`.
A directory's family is the one that lists its config.json's model_type; a checkpoint's is
its arch.

Import reads `model.safetensors`, or the shards `model.safetensors.index.json` lists (never a
pickle), and checks every tensor's name and shape against config.json from the file
headers, and the model's size against memory, before anything is built; then loads one
tensor at a time, in fp32 (bfloat16 and float16 are converted).

Vocabulary rows: gptcli pads them to a multiple of 64; padded rows are zeros on import and
dropped on export, so import -> export -> import is bit-identical. A gptcli model's
vocab_size is its tokenizer's (checkpoints require it): a Llama-family embedding with rows
no token uses (Qwen pads to a multiple of 128) is imported with its first
`tokenizer.vocab_size` rows; no text reaches the others, and their logits go with them.

Tokenizers: on export, hf_tokenizers.py writes the checkpoint's tokenizer where
transformers can read it with gptcli's exact ids (bytes and char as `tokenizer.json`, a BPE
with GPT-2's pattern as `vocab.json` and `merges.txt` derived from tiktoken's ranks), and
the result says plainly when it wrote none. On import, ranks come from `vocab.json`, so no
tokenizer download is needed either way. A Llama-family directory's `tokenizer.json`
(byte-level BPE) is read by gptcli.data.tokenizers.hf_tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptcli.atomic import staging_dir
from gptcli.config import ModelConfig
from gptcli.data.tokenizers.bpe import GPT2_PATTERN
from gptcli.data.tokenizers.hf_tokenizer import TOKENIZER_FILE, byte_alphabet, read_hf_tokenizer
from gptcli.data.tokenizers.tokenizer import (
    EOT,
    Tokenizer,
    named_tiktoken,
    tiktoken_from_file,
    tiktoken_from_ranks,
)
from gptcli.errors import GptcliError, shorten
from gptcli.families import (
    FAMILIES,
    Family,
    HuggingFace,
    family_of_model_type,
    get_family,
)
from gptcli.model import Model, get_arch
from gptcli.model.lora import merge_lora
from gptcli.outputs import check_output_dir, input_paths, mark
from gptcli.paths import cache_root
from gptcli.store.checkpoint import (
    checkpoint_task,
    is_checkpoint,
    load_model,
    run_of,
    save_checkpoint,
    training_config,
)
from gptcli.store.hf_tokenizers import (  # tokenizer_files: also gguf_export's and the tests'
    tokenizer_files,  # noqa: F401
    write_tokenizer,
)

HF_CONFIG, HF_WEIGHTS, HF_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
HF_INDEX, HF_PICKLE_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
_VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # tensors with one row per token


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / HF_CONFIG).is_file() and any(
        (path / name).is_file() for name in (HF_WEIGHTS, HF_INDEX, HF_PICKLE, HF_PICKLE_INDEX))


# --- GPT-2's tokenizer files on import (export: hf_tokenizers.py) -------------------------


def ranks_from_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
    """BPE ranks from a GPT-2 vocab.json (special tokens left out)."""
    char_to_byte = {c: b for b, c in enumerate(byte_alphabet())}
    ranks = {}
    for spelled, rank in vocab.items():
        if spelled.startswith("<|") and spelled.endswith("|>"):
            continue
        ranks[bytes(char_to_byte[c] for c in spelled)] = rank
    return ranks


# --- import ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """One tensor of the weight files, known from a header."""

    name: str  # as the file names it
    shape: tuple[int, ...]
    path: Path  # the file


@dataclass(frozen=True)
class _Checked:
    """An HF directory whose config.json and weight headers agree; nothing loaded yet."""

    family: Family  # the one whose hf.model_types hold config.json's model_type
    cfg: ModelConfig  # the shape config.json gives (vocab_size: the embedding's rows)
    plan: dict[str, list[tuple[str, tuple[int, ...]]]]  # the family's layout(cfg)
    stored: dict[str, _Stored]  # by the family's canonical name


def _weight_files(hf_dir: Path) -> tuple[Path, list[Path]]:
    """The safetensors files holding the weights, and the path messages name for all of
    them: model.safetensors, or the shards model.safetensors.index.json lists."""
    if (hf_dir / HF_WEIGHTS).is_file():
        return hf_dir / HF_WEIGHTS, [hf_dir / HF_WEIGHTS]
    if (hf_dir / HF_INDEX).is_file():
        return hf_dir / HF_INDEX, _shards(hf_dir / HF_INDEX)
    if (hf_dir / HF_PICKLE).is_file() or (hf_dir / HF_PICKLE_INDEX).is_file():
        raise GptcliError(
            f"{hf_dir} has only {HF_PICKLE} (a pickle, which gptcli never loads); convert it with "
            f"transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
            f"safe_serialization=True)")
    raise GptcliError(f"{hf_dir} has no {HF_WEIGHTS}")


def _shards(index: Path) -> list[Path]:
    """The files an index's weight_map names (each once), all present beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GptcliError(f"{index} is unreadable or has no weight_map ({shorten(str(exc), 200)}); "
                          f"download it again") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (index.parent / name).is_file():
            raise GptcliError(f"{index} names shard {shorten(repr(name))}, which is not a file beside it; "
                              f"download every shard")
    return [index.parent / name for name in names]


def _read_config(hf_dir: Path) -> tuple[Family, dict]:
    """config.json, and the family its model_type belongs to."""
    path = hf_dir / HF_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GptcliError(f"{path} is unreadable: {shorten(str(exc), 200)}") from None
    if not isinstance(config, dict):
        raise GptcliError(f"{path} must hold a JSON object of settings, not a {type(config).__name__}; "
                          f"it is not a Hugging Face config")
    kind = config.get("model_type")
    family = family_of_model_type(kind)
    if family is not None:
        return family, config
    known = [f.hf for f in FAMILIES.values() if f.hf is not None]
    names = [hf.name for hf in known]
    names = " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))  # "A, B and C"
    types = ", ".join(t for hf in known for t in hf.model_types)
    raise GptcliError(f"{hf_dir} holds a '{shorten(str(kind))}' model; gptcli imports {names} models "
                      f"(model_type {types})")


def _stored_tensors(files: list[Path], hf: HuggingFace, cfg: ModelConfig) -> dict[str, _Stored]:
    """Every tensor's name and shape, from the files' headers alone, by canonical name
    (those the family skips left out)."""
    stored = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    key = hf.canonical(name, cfg)
                    if key is not None:
                        stored[key] = _Stored(name, tuple(f.get_slice(name).get_shape()), path)
        except (OSError, SafetensorError) as exc:
            raise GptcliError(f"{path} is unreadable: {exc}") from None
    return stored


def _check_block_count(source: Path, stored: dict[str, _Stored], hf: HuggingFace, n_layer: int) -> None:
    """The weights must hold blocks 0 ... n_layer - 1, so a config.json claiming a million
    layers is refused before anything is built."""
    blocks = {int(m.group(1)) for name in stored if (m := hf.layer.match(name))}
    if len(blocks) != n_layer or max(blocks, default=-1) != n_layer - 1:  # exactly 0 ... n_layer - 1
        raise GptcliError(f"{source} holds {len(blocks)} blocks but {HF_CONFIG} says {hf.layers_key}="
                          f"{shorten(str(n_layer), 20)}; the weights and {HF_CONFIG} do not belong together")


def _check_tensors(source: Path, checked: _Checked) -> None:
    """Every tensor the layout needs has the shape config.json implies (the first that
    differs is named, in the model's order), and none is missing or left over."""
    wanted = [part for parts in checked.plan.values() for part in parts]
    for name, shape in wanted:
        found = checked.stored.get(name)
        if found is not None and found.shape != shape:
            raise GptcliError(f"{found.path}: {shorten(found.name)} has shape {list(found.shape)}, but "
                              f"{HF_CONFIG} implies {list(shape)}; the weights and {HF_CONFIG} do not "
                              f"belong together")
    missing = [name for name, _ in wanted if name not in checked.stored]
    unexpected = sorted(set(checked.stored) - {name for name, _ in wanted})
    if missing or unexpected:
        raise GptcliError(f"{source}: not {checked.family.hf.name} weights for its {HF_CONFIG} (missing "
                          f"{shorten(str(missing[:3]), 200)}, unexpected {shorten(str(unexpected[:3]), 200)})")


def _check_import(hf_dir: Path) -> _Checked:
    """Read config.json and the weight headers; refuse, before anything is built, a model
    gptcli does not compute, weights that do not fit config.json, or a model too large."""
    source, files = _weight_files(hf_dir)
    family, config = _read_config(hf_dir)
    cfg = ModelConfig(arch=family.name, **family.hf.settings(config, hf_dir / HF_CONFIG))
    stored = _stored_tensors(files, family.hf, cfg)
    _check_block_count(source, stored, family.hf, cfg.n_layer)  # before the layout: n_layer may be absurd
    get_arch(family.name).check_fits(
        cfg, torch.device("cpu"), training=False,
        fix=f"{hf_dir} holds a model too large for this machine (or a damaged {HF_CONFIG})")
    checked = _Checked(family, cfg, family.hf.layout(cfg), stored)
    _check_tensors(source, checked)
    return checked


class _WeightFiles(contextlib.ExitStack):
    """The weight files, each opened once, read one tensor at a time."""

    def __init__(self):
        super().__init__()
        self._open = {}

    def read(self, found: _Stored) -> torch.Tensor:
        try:
            if found.path not in self._open:
                self._open[found.path] = self.enter_context(safe_open(str(found.path), framework="pt"))
            return self._open[found.path].get_tensor(found.name)
        except (OSError, SafetensorError) as exc:
            raise GptcliError(f"{found.path} is unreadable: {exc}") from None


@torch.no_grad()
def _build(checked: _Checked, vocab_size: int) -> Model:
    """The model with `vocab_size` tokens (at most the embedding's rows), its tensors
    loaded one at a time from the checked files: never two copies of the whole model."""
    model = get_arch(checked.family.name).model(dataclasses.replace(checked.cfg, vocab_size=vocab_size))
    state = model.state_dict()  # the parameters themselves: copied into in place
    to_gptcli = checked.family.hf.to_gptcli
    with _WeightFiles() as files:
        for key, parts in checked.plan.items():
            pieces = [to_gptcli(key, files.read(checked.stored[name])) for name, _ in parts]
            value = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # stacked by rows (q, k, v; gate, up)
            # Copying converts to the parameters' fp32 (from bfloat16, float16).
            if key in _VOCAB_ROWS:  # the tokens' rows; padding rows (and spare ones) zero
                state[key].zero_()
                state[key][:vocab_size] = value[:vocab_size]
            else:
                state[key].copy_(value)
    return model.eval()


def import_hf_model(hf_dir: str | Path, vocab_size: int | None = None) -> Model:
    """A gptcli model with the weights of an HF directory (fp32); `vocab_size`: keep only the
    first that many token rows (default: all the embedding's)."""
    checked = _check_import(Path(hf_dir))
    return _build(checked, checked.cfg.vocab_size if vocab_size is None else vocab_size)


def hf_tokenizer(hf_dir: Path, tokenizer_path: str | Path | None) -> Tokenizer:
    """The tokenizer of an HF GPT-2 directory: a given .tiktoken file, its vocab.json, its
    tokenizer.json (export-hf writes one for a model trained on bytes or characters), or
    tiktoken's `gpt2` encoding (downloaded once by tiktoken)."""
    if tokenizer_path is not None:
        return tiktoken_from_file(tokenizer_path)
    if (hf_dir / "vocab.json").is_file():
        return _gpt2_vocab_tokenizer(hf_dir)
    if (hf_dir / TOKENIZER_FILE).is_file():
        return read_hf_tokenizer(hf_dir)
    return named_tiktoken("gpt2")


def _gpt2_vocab_tokenizer(hf_dir: Path) -> Tokenizer:
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    ranks = ranks_from_vocab(vocab)
    return tiktoken_from_ranks(ranks, "gpt2", GPT2_PATTERN, {EOT: vocab.get(EOT, len(ranks))})


def llama_tokenizer(hf_dir: Path, tokenizer_path: str | Path | None) -> Tokenizer:
    """The tokenizer of an HF Llama-family directory: a given .tiktoken file, its
    tokenizer.json, or GPT-2's vocab.json where tokenizer_config.json says it is GPT-2's
    (as export-hf writes for a model trained with the gpt2 tokenizer)."""
    if tokenizer_path is not None:
        return tiktoken_from_file(tokenizer_path)
    if (hf_dir / TOKENIZER_FILE).is_file():
        return read_hf_tokenizer(hf_dir)
    if (hf_dir / "vocab.json").is_file() and _tokenizer_class(hf_dir) in ("GPT2Tokenizer", "GPT2TokenizerFast"):
        return _gpt2_vocab_tokenizer(hf_dir)
    raise GptcliError(f"{hf_dir} has no {TOKENIZER_FILE}; copy the model's tokenizer files next to its weights, "
                      f"or pass --tokenizer FILE.tiktoken")


def _tokenizer_class(hf_dir: Path) -> str | None:
    try:
        return json.loads((hf_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


# A family's `hf.tokenizer`: where its directories keep their tokenizer -> the reader.
_TOKENIZER_READERS = {"vocab.json": hf_tokenizer, "tokenizer.json": llama_tokenizer}


def _vocab_size(tokenizer: Tokenizer, checked: _Checked) -> int:
    """gptcli's vocabulary for the tokenizer and the checked embedding: the tokenizer's ids,
    which the embedding must cover (with rows to spare only in families that pad them)."""
    rows = checked.cfg.vocab_size
    if tokenizer.vocab_size == rows or (checked.family.hf.spare_rows and tokenizer.vocab_size < rows):
        return tokenizer.vocab_size
    raise GptcliError(f"the tokenizer has {tokenizer.vocab_size} ids but the model {rows} embedding rows; "
                      f"import the model with its own tokenizer")


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer_path: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """`gptcli import-hf`: write an HF directory (GPT-2 or the Llama family) as a gptcli
    checkpoint directory (`overwrite`: replacing an earlier import)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise GptcliError(f"{hf_dir} is not a directory")
    target = check_output_dir(out, "checkpoint", replace=overwrite,
                              inputs=input_paths([hf_dir, tokenizer_path or ""]))
    checked = _check_import(hf_dir)  # the weights first: the tokenizer may need a download
    tokenizer = _TOKENIZER_READERS[checked.family.hf.tokenizer](hf_dir, tokenizer_path)
    model = _build(checked, _vocab_size(tokenizer, checked))
    note = f"# imported from Hugging Face {checked.family.hf.name} directory {hf_dir}\n"
    save_checkpoint(target, model, tokenizer, note, mark_as="checkpoint")
    return Path(out)


def cached_import(hf_dir: Path) -> Path:
    """An HF directory used where a checkpoint is expected: imported once into the cache,
    keyed by its path and its weight files' sizes and modification times."""
    _, files = _weight_files(hf_dir)  # raises the right error (pickle only, no weights)
    stamp = ":".join([str(hf_dir.resolve()), *(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)])
    target = cache_root().parent / "hf" / hashlib.sha256(stamp.encode()).hexdigest()[:24]
    if not is_checkpoint(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        import_hf(hf_dir, target)
    return target


# --- export ------------------------------------------------------------------------------


def export_state(model, classifier: bool) -> dict[str, torch.Tensor]:
    """The model's tensors that the HF class holds: vocabulary rows unpadded, no lm_head
    when it is wte or when a classifier has no use for it."""
    cfg = model.config
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and (cfg.tie_embeddings or classifier):
            continue
        state[key] = value[: cfg.vocab_size] if key in _VOCAB_ROWS else value
    return state


@dataclass(frozen=True)
class HFExport:
    """What `gptcli export-hf` wrote: the folder, and what became of the tokenizer."""

    path: Path
    tokenizer_written: bool  # AutoTokenizer.from_pretrained(path) gives gptcli's ids
    tokenizer_note: str  # one sentence: which tokenizer files were written, or why none was


def export_hf(source: Path, out: str | Path, overwrite: bool = False) -> Path:
    """The folder `export_hf_model` writes (for callers that only need the path)."""
    return export_hf_model(source, out, overwrite).path


def export_hf_model(source: Path, out: str | Path, overwrite: bool = False) -> HFExport:
    """`gptcli export-hf`: the checkpoint directory `source` as an HF directory that
    transformers loads (`overwrite`: replacing an earlier export): GPT-2 for arch gpt2,
    the Llama-family class that computes it for arch llama, with the tokenizer where
    transformers can read it with the same ids (hf_tokenizers.py; the result says whether).
    The export may not overlap the checkpoint nor the run that holds it."""
    run = run_of(source)
    target = check_output_dir(out, "hf-export", replace=overwrite, inputs=input_paths([run, source]))
    model, tokenizer = load_model(source)
    classifier = checkpoint_task(source) == "classify"
    truncation_side = _classifier_truncation_side(source) if classifier else "right"
    if model.lora_spec is not None:
        merge_lora(model)
    cfg = model.config
    family = get_family(cfg.arch).hf
    if family is None:
        raise GptcliError(f"{source} cannot be exported: transformers has no class for arch {cfg.arch}")
    problems = family.export_problems(cfg)
    if problems:
        raise GptcliError(f"{source} cannot be exported: no {family.name} class in transformers computes "
                          f"{'; '.join(problems)}; {family.exportable}")
    weights = family.weights(export_state(model, classifier), cfg)
    config = {
        **family.config(cfg), "architectures": [family.architecture(cfg, classifier)],
        "vocab_size": cfg.vocab_size, "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
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
        written = write_tokenizer(work, tokenizer, cfg.block_size, truncation_side)
    return HFExport(Path(out), written.written, written.note)


def _classifier_truncation_side(source: Path) -> str:
    """The side transformers' tokenizer must cut long texts from to read them as the
    classifier was trained (`left` keeps the end: finetune.truncate keep_end, the default).
    A classifier that pools its hidden states or its windows is refused: transformers'
    ...ForSequenceClassification scores the last token of one window, so it would predict
    differently. Settings come from the checkpoint's config.yaml (none: last, truncate, end)."""
    training = training_config(source)
    if training is None:
        return "left"
    settings = training.finetune
    if settings.pooling != "last" or settings.long_text != "truncate":
        raise GptcliError(
            f"{source} cannot be exported: it was trained with finetune.pooling: {settings.pooling} and "
            f"finetune.long_text: {settings.long_text}, but transformers' classification head reads the last "
            f"token of one window; finetune with --set finetune.pooling=last --set finetune.long_text=truncate "
            f"to export")
    return "left" if settings.truncate == "keep_end" else "right"
