"""The tokenizer files `gptcli export-hf` writes beside the weights, so that transformers'
`AutoTokenizer.from_pretrained` gives exactly gptcli's ids, or a plain note that none was
written and why. An export never claims a tokenizer it does not hold.

    gptcli tokenizer                     written as                        transformers reads it as
    bytes (id i is byte i, 256 is EOT)   tokenizer.json: byte-level BPE     PreTrainedTokenizerFast
                                         with 256 tokens and no merges
    char (one id per character)          tokenizer.json: WordLevel over     PreTrainedTokenizerFast
                                         single characters
    tiktoken BPE with GPT-2's pattern    vocab.json + merges.txt            GPT2Tokenizer
    and <|endoftext|> after its ranks
    (gpt2, a .tiktoken file, --train-bpe)

Special tokens a finetune added (a chat template's) are written as special added tokens of
the same ids. transformers matches special-token strings inside text, as gptcli does where
it reads special tokens (`encode_with_specials`, used for rendered chat templates);
gptcli's plain `encode` reads them as text.

Other tokenizers (tiktoken's cl100k_base and o200k_base, whose patterns and specials
differ; a Llama-family tokenizer imported from Hugging Face, whose original files export
cannot rebuild exactly) are not written: the result says so, and which files to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptcli.data.tokenizers.bpe import GPT2_PATTERN
from gptcli.data.tokenizers.hf_tokenizer import TOKENIZER_FILE, byte_alphabet
from gptcli.data.tokenizers.tokenizer import (
    EOT,
    BytesTokenizer,
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    WithAddedTokens,
)
from gptcli.errors import GptcliError

CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class TokenizerExport:
    """What export-hf did with the checkpoint's tokenizer."""

    written: bool  # whether AutoTokenizer.from_pretrained(out) gives gptcli's ids
    note: str  # one sentence for the user: what was written, or why nothing was


def write_tokenizer(work: Path, tokenizer: Tokenizer, block_size: int, truncation_side: str) -> TokenizerExport:
    """Write `tokenizer` into the export folder `work` in a form transformers reads with the
    same ids, or nothing (and say why) where no exact form is known."""
    base, added = _base_and_added(tokenizer)
    settings = {"model_max_length": block_size, "truncation_side": truncation_side}
    if isinstance(base, BytesTokenizer):
        _write_tokenizer_json(work, _bytes_model(), _BYTE_LEVEL, _BYTE_LEVEL, base, added, settings)
        return _written(tokenizer, TOKENIZER_FILE)
    if isinstance(base, CharTokenizer):
        _write_tokenizer_json(work, _char_model(base), _EACH_CHARACTER, _JOIN, base, added, settings)
        return _written(tokenizer, TOKENIZER_FILE, " (a character outside its vocabulary is refused, as in gptcli)")
    reason = _not_gpt2_style(base)
    if reason is None:
        try:
            vocab, merges = tokenizer_files(base.encoding._mergeable_ranks)
        except GptcliError as exc:  # ranks that no merge list can build
            reason = str(exc)
        else:
            _write_vocab_and_merges(work, vocab, merges, base, added, settings)
            return _written(tokenizer, "vocab.json and merges.txt")
    return TokenizerExport(False, f"no tokenizer written: gptcli knows no tokenizer files with which "
                                  f"transformers gives the ids of '{tokenizer.name}' ({reason}); copy the "
                                  f"tokenizer files of the model it came from, or encode text with gptcli "
                                  f"(the checkpoint's tokenizer/ folder)")


def _written(tokenizer: Tokenizer, files: str, extra: str = "") -> TokenizerExport:
    return TokenizerExport(True, f"tokenizer '{tokenizer.name}' written as {files}: "
                                 f"AutoTokenizer.from_pretrained gives gptcli's ids{extra}")


def _base_and_added(tokenizer: Tokenizer) -> tuple[Tokenizer, dict[str, int]]:
    """The tokenizer that encodes text, and the special tokens a finetune appended to it."""
    if isinstance(tokenizer, WithAddedTokens):
        return tokenizer.base, dict(tokenizer.added)
    return tokenizer, {}


def _not_gpt2_style(tokenizer: Tokenizer) -> str | None:
    """Why `tokenizer` cannot be written as GPT-2's vocab.json and merges.txt (None if it
    can): GPT2Tokenizer pre-tokenizes with GPT-2's pattern and knows one special token."""
    if isinstance(tokenizer, HFTokenizer):
        return "it came from a Hugging Face model, whose own tokenizer files are the exact ones"
    if not isinstance(tokenizer, TiktokenTokenizer):
        return f"{type(tokenizer).__name__} is not a BPE with GPT-2's pattern"
    encoding = tokenizer.encoding
    if encoding._pat_str != GPT2_PATTERN:
        return "its pre-tokenization pattern is not GPT-2's"
    ranks = sorted(encoding._mergeable_ranks.values())
    if ranks != list(range(len(ranks))) or encoding._special_tokens != {EOT: len(ranks)}:
        return f"its ids are not the BPE ranks followed by {EOT} alone"
    return None


# --- tokenizer.json (the `tokenizers` library's format) ----------------------------------

# Text to bytes and back, one token per byte: GPT-2's byte alphabet without its regex.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
# One piece per character (code point); [\s\S] also matches line breaks, which `.` may not.
_EACH_CHARACTER = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}
# Decoding joins the characters as they are (without it, `tokenizers` puts spaces between them).
_JOIN = {"type": "Fuse"}


def _bytes_model() -> dict:
    """A BPE with the 256 byte tokens, spelled in GPT-2's byte alphabet, and no merges: the
    token of byte i has id i, as in gptcli's bytes tokenizer."""
    alphabet = byte_alphabet()
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {alphabet[b]: b for b in range(256)}, "merges": []}


def _char_model(tokenizer: CharTokenizer) -> dict:
    """Each character its gptcli id. The unknown-token name is deliberately not in the
    vocabulary: `tokenizers` then refuses an unknown character instead of mapping it to
    some id, as gptcli refuses it."""
    return {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tokenizer.chars)}, "unk_token": EOT}


def _write_tokenizer_json(work: Path, model: dict, pre_tokenizer: dict, decoder: dict, base: Tokenizer,
                          added: dict[str, int], settings: dict) -> None:
    specials = {EOT: base.eot_id, **added}
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [_added_token(token, i) for token, i in sorted(specials.items(), key=lambda t: t[1])],
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder,
            "model": model}
    (work / TOKENIZER_FILE).write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n")
    # clean_up_tokenization_spaces off: decoding must not drop the space in "a ." (the default may).
    _write_config(work, {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                         **settings})


def _added_token(token: str, token_id: int) -> dict:
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _write_config(work: Path, config: dict) -> None:
    config = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **config}
    (work / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n")


# --- GPT-2's vocab.json and merges.txt, spelled in the byte alphabet ---------------------


def _write_vocab_and_merges(work: Path, vocab: dict[str, int], merges: list[str], base: Tokenizer,
                            added: dict[str, int], settings: dict) -> None:
    vocab[EOT] = base.eot_id
    (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **settings}
    if added:  # GPT2Tokenizer learns tokens beyond vocab.json from here
        config["added_tokens_decoder"] = {str(i): _added_token(token, i) for token, i in added.items()}
    _write_config(work, config)


def _spell(token: bytes) -> str:
    return "".join(byte_alphabet()[b] for b in token)


def tokenizer_files(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt contents from BPE ranks: the merge that makes each
    multi-byte token is found by running BPE on its bytes with only lower ranks."""
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, ranks)
            merges.append(f"{_spell(left)} {_spell(right)}")
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
