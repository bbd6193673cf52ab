"""One `Tokenizer` interface over tiktoken encodings, `.tiktoken` rank files, bytes and chars.

Every tokenizer can `save` itself into a directory (`tokenizer.json`, plus the BPE ranks
for tiktoken-based ones) and `load_tokenizer` rebuilds it from there alone. That is how
the tokenizer travels with tokenized data and with every checkpoint: sampling never needs
the original corpus or an internet connection.

Ids: `vocab_size` counts every id the tokenizer can emit, including `eot_id`, the
end-of-text token that separates documents.

A Hugging Face byte-level BPE (`gptcli.data.tokenizers.hf_tokenizer` reads one) runs on tiktoken too,
as `HFTokenizer`, which keeps the model's own ids, chat template and stop ids.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import regex

from gptcli.data.tokenizers.bpe import GPT2_PATTERN, write_tiktoken_file
from gptcli.errors import GptcliError

EOT = "<|endoftext|>"
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
SPEC_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"


class Tokenizer(ABC):
    vocab_size: int
    eot_id: int
    # What an imported chat model brings (gptcli's own tokenizers have none of it): its jinja
    # chat template, the ids that end a reply besides `eot_id`, and the special-token strings
    # the template reads (`bos_token`, `eos_token`, ...).
    chat_template: str | None = None
    stop_ids: tuple[int, ...] = ()
    template_tokens: Mapping[str, str] = MappingProxyType({})

    @property
    @abstractmethod
    def name(self) -> str:
        """Short human-readable name, e.g. `gpt2` or `char(65)`."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, treating special-token strings as plain text."""

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [self.encode(t) for t in texts]

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of `text` where special-token strings are the special ids (a rendered chat
        template holds them); the text between them encodes as `encode` does."""
        ids: list[int] = []
        for part in _split_on_tokens(text, self.special_tokens):
            ids += [part] if isinstance(part, int) else list(self.encode(part))
        return ids

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of `ids` (a token may end mid-character; join before decoding)."""

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def _spec(self) -> dict:
        """JSON-able description saved as tokenizer.json."""

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {**self._spec(), "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n")

    @property
    def spec(self) -> dict:
        """What the tokenizer is, without its (possibly large) vocabulary."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token strings and their ids (never produced by `encode`)."""
        return {EOT: self.eot_id}

    def fingerprint(self) -> str:
        """A digest of everything that decides the ids: equal fingerprints, equal encodings."""
        return hashlib.sha256(json.dumps(self._spec(), sort_keys=True).encode()).hexdigest()


class BytesTokenizer(Tokenizer):
    """The 256 byte values, plus end-of-text as id 256."""

    vocab_size = 257
    eot_id = 256

    @property
    def name(self) -> str:
        return "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def _spec(self) -> dict:
        return {"type": "bytes"}


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus (sorted), plus end-of-text as the last id."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise GptcliError("char tokenizer: the corpus has no characters to build a vocabulary")
        self.vocab_size = len(self.chars) + 1
        self.eot_id = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        # Code point -> id through a sorted array, so whole texts encode with numpy.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    @property
    def name(self) -> str:
        return f"char({len(self.chars)})"

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [self._encode_array(t) for t in texts]

    def _encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, points)
        ids_in_range = np.minimum(ids, len(self._codepoints) - 1)
        unknown = self._codepoints[ids_in_range] != points
        if unknown.any():
            bad = chr(int(points[np.argmax(unknown)]))
            raise GptcliError(
                f"char tokenizer: character {bad!r} is not in the vocabulary "
                f"({len(self.chars)} characters learned from the training corpus)"
            )
        return ids.astype(np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return "".join(self.chars[i] for i in ids if i < len(self.chars)).encode("utf-8")

    def _spec(self) -> dict:
        return {"type": "char", "chars": self.chars}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE: a named encoding, a `.tiktoken` ranks file, or one gptcli trained."""

    def __init__(self, encoding, name: str):
        self.encoding = encoding
        self._name = name
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        """Straight to numpy arrays: no Python int lists to build and convert. One thread:
        `encode_to_numpy` holds the GIL (more cores take processes, data/tokenized/encoders.py)."""
        return [self.encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.encoding._special_tokens)

    def fingerprint(self) -> str:
        return _with_ranks(super().fingerprint(), self.encoding._mergeable_ranks)

    def _spec(self) -> dict:
        return {
            "type": "tiktoken",
            "name": self._name,
            "pattern": self.encoding._pat_str,
            "special_tokens": self.encoding._special_tokens,
        }

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        # The ranks travel too (tiktoken keeps them in a private attribute), so loading
        # never needs a download, even for named encodings.
        write_tiktoken_file(self.encoding._mergeable_ranks, Path(directory) / RANKS_FILE)


class WithAddedTokens(Tokenizer):
    """A tokenizer plus special tokens appended after its vocabulary (e.g. a chat template's).

    Text encodes exactly as with the base tokenizer; the added ids are inserted by the code
    that builds sequences, and decoding drops them.
    """

    def __init__(self, base: Tokenizer, names: Iterable[str]):
        self.base = base
        self.added = {name: base.vocab_size + i for i, name in enumerate(names)}
        self.vocab_size = base.vocab_size + len(self.added)
        self.eot_id = base.eot_id

    @property
    def name(self) -> str:
        return f"{self.base.name}+{len(self.added)} special"

    @property
    def special_tokens(self) -> dict[str, int]:
        return {**self.base.special_tokens, **self.added}

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return self.base.encode_batch(texts)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.base.decode_bytes(i for i in ids if i < self.base.vocab_size)

    def _spec(self) -> dict:
        return {**self.base._spec(), "added_tokens": list(self.added)}

    def fingerprint(self) -> str:
        return hashlib.sha256((self.base.fingerprint() + json.dumps(list(self.added))).encode()).hexdigest()

    def save(self, directory: str | Path) -> None:
        self.base.save(directory)  # the base's own files (a BPE's ranks)
        super().save(directory)  # then tokenizer.json again, with the added tokens


HF_TYPE = "hf-bpe"
# The constructor arguments of HFTokenizer that its tokenizer.json spec holds.
_HF_FIELDS = ("added", "special", "eot_id", "ids", "presplit", "nfc", "stop_ids", "chat_template",
              "template_tokens")


class HFTokenizer(Tokenizer):
    """A Hugging Face byte-level BPE run by tiktoken, giving the model's own ids.

    `encode(text)` equals `tokenizers`' `encode(text, add_special_tokens=False).ids` for text
    without special tokens: NFC first when `nfc`; then the non-special added tokens are cut
    out (the `tokenizers` library matches those even in plain text); then each `presplit`
    regex cuts the text further, in Python (the pre-tokenizer's steps before its last, e.g.
    Digits); then tiktoken splits by `pattern` (the last step) and applies the merges.

    `ranks` (token bytes -> tiktoken rank) rank multi-byte tokens in HF merge order, which is
    what makes tiktoken merge as HF does. `added` maps every added token to its HF id,
    `special` names those that are special. `ids` maps rank -> HF id (0 .. len(ranks) - 1;
    the added tokens take the ranks after them, in id order); None when every rank already
    is its HF id, as in GPT-2, Llama 3 and Qwen files.
    """

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, *, added: Mapping[str, int],
                 special: Iterable[str], eot_id: int, ids: Sequence[int] | None = None,
                 presplit: Sequence[str] = (), nfc: bool = False, stop_ids: Iterable[int] = (),
                 chat_template: str | None = None, template_tokens: Mapping[str, str] | None = None):
        import tiktoken

        self._name = name
        self._pattern = pattern
        self._added = dict(sorted(added.items(), key=lambda item: item[1]))
        self._special = sorted(special)
        self._ids_list = None if ids is None else [int(i) for i in ids]
        self._presplit = [regex.compile(p) for p in presplit]
        self._nfc = bool(nfc)
        self.eot_id = int(eot_id)
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.chat_template = chat_template
        self.template_tokens = MappingProxyType(dict(template_tokens or {}))
        self._text_tokens = {t: i for t, i in self._added.items() if t not in self._special}
        specials = self._tiktoken_specials(len(ranks))
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self._id_maps([*ranks.values(), *specials.values()])

    def _tiktoken_specials(self, n_ranks: int) -> dict[str, int]:
        """Every added token as a tiktoken special, so tiktoken decodes it: at its HF id, or
        with an id remap at the ranks after the BPE's."""
        if self._ids_list is None:
            return dict(self._added)
        return {token: n_ranks + i for i, token in enumerate(self._added)}

    def _id_maps(self, ranks: list[int]) -> None:
        """`_id_of_rank` (rank -> HF id; None: the same number), `_rank_of_id` (HF id ->
        rank, -1 where no token has the id) and `vocab_size`, from every tiktoken rank."""
        ranks = np.array(ranks, dtype=np.int64)
        self._id_of_rank = None
        if self._ids_list is not None:
            self._id_of_rank = np.array([*self._ids_list, *self._added.values()], dtype=np.int64)
        ids = ranks if self._id_of_rank is None else self._id_of_rank[ranks]
        self.vocab_size = int(ids.max()) + 1
        self._rank_of_id = np.full(self.vocab_size, -1, dtype=np.int64)
        self._rank_of_id[ids] = ranks

    @classmethod
    def from_spec(cls, spec: dict, ranks: dict[bytes, int]) -> HFTokenizer:
        return cls(spec["name"], ranks, spec["pattern"], **{key: spec[key] for key in _HF_FIELDS})

    @property
    def name(self) -> str:
        return self._name

    @property
    def special_tokens(self) -> dict[str, int]:
        return {token: self._added[token] for token in self._special}

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [self._encode_array(text) for text in texts]

    def _encode_array(self, text: str) -> np.ndarray:
        """HF ids of `text` (int64); non-special added tokens in it are their ids."""
        parts = _split_on_tokens(text, self._text_tokens)
        arrays = [np.array([p], np.int64) if isinstance(p, int) else self._encode_plain(p) for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)

    def _encode_plain(self, text: str) -> np.ndarray:
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        pieces = [text]
        for pattern in self._presplit:
            pieces = [cut for piece in pieces for cut in _isolate(pattern, piece)]
        ranks = [self.encoding.encode_to_numpy(piece, disallowed_special=()) for piece in pieces]
        joined = np.concatenate(ranks).astype(np.int64) if ranks else np.zeros(0, np.int64)
        return joined if self._id_of_rank is None else self._id_of_rank[joined]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of `ids`; an id no token has (a model's vocabulary padding) decodes to nothing."""
        ids = np.fromiter(ids, dtype=np.int64)
        ranks = self._rank_of_id[ids[(ids >= 0) & (ids < self.vocab_size)]]
        return self.encoding.decode_bytes(ranks[ranks >= 0].tolist())

    def _spec(self) -> dict:
        return {"type": HF_TYPE, "name": self._name, "pattern": self._pattern, "added": self._added,
                "special": self._special, "eot_id": self.eot_id, "ids": self._ids_list,
                "presplit": [p.pattern for p in self._presplit], "nfc": self._nfc,
                "stop_ids": list(self.stop_ids), "chat_template": self.chat_template,
                "template_tokens": dict(self.template_tokens)}

    def fingerprint(self) -> str:
        return _with_ranks(super().fingerprint(), self.encoding._mergeable_ranks)

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        write_tiktoken_file(self.encoding._mergeable_ranks, Path(directory) / RANKS_FILE)


def _split_on_tokens(text: str, tokens: Mapping[str, int]) -> list[str | int]:
    """`text` cut at every occurrence of `tokens`: the text between them (non-empty str) and
    each token's id (int). Leftmost match first, the longest where several start there (as
    the `tokenizers` library matches added tokens)."""
    if not tokens:
        return [text] if text else []
    return [tokens[piece] if matched else piece for piece, matched in _cut(_token_regex(tuple(tokens)), text)]


@functools.lru_cache(maxsize=16)
def _token_regex(tokens: tuple[str, ...]) -> regex.Pattern:
    """Alternatives longest first: the regex tries them in order, so the longest wins."""
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _isolate(pattern: regex.Pattern, text: str) -> list[str]:
    """`text` cut into the matches of `pattern` and the (non-empty) text between them, in
    order: the `tokenizers` Split pre-tokenizer with behavior Isolated."""
    return [piece for piece, _ in _cut(pattern, text) if piece]


def _cut(pattern: regex.Pattern, text: str) -> list[tuple[str, bool]]:
    """`text` in order as each match of `pattern` (True) and the non-empty text between
    matches (False)."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append((text[start:match.start()], False))
        pieces.append((match.group(), True))
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def _with_ranks(spec_digest: str, ranks: dict[bytes, int]) -> str:
    """`spec_digest` extended with every (rank, token) of a BPE, in rank order."""
    digest = hashlib.sha256(spec_digest.encode())
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        digest.update(rank.to_bytes(4, "little") + token)
    return digest.hexdigest()


def tiktoken_from_ranks(ranks: dict[bytes, int], name: str, pattern: str,
                        special_tokens: dict[str, int] | None = None) -> TiktokenTokenizer:
    """A tiktoken BPE from its ranks; `<|endoftext|>` follows the last rank unless given."""
    import tiktoken

    if special_tokens is None:
        special_tokens = {EOT: max(ranks.values()) + 1}
    encoding = tiktoken.Encoding(
        name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
    )
    return TiktokenTokenizer(encoding, name)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file (`base64(token) rank` per line).

    Not tiktoken's `load_tiktoken_bpe`: that caches local files by path name, so a file
    rewritten at the same path would load stale ranks.
    """
    path = Path(path)
    if not path.is_file():
        raise GptcliError(f"tokenizer file {path} does not exist")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise GptcliError(
                    f"tokenizer file {path} is not a .tiktoken ranks file (line {number} is not "
                    f"'base64-token rank')"
                ) from None
    if not ranks:
        raise GptcliError(f"tokenizer file {path} holds no tokens")
    return ranks


def tiktoken_from_file(path: str | Path) -> TiktokenTokenizer:
    """A `.tiktoken` ranks file with GPT-2's pre-tokenisation pattern and `<|endoftext|>` last."""
    return tiktoken_from_ranks(read_ranks(path), Path(path).stem, GPT2_PATTERN)


def named_tiktoken(name: str) -> TiktokenTokenizer:
    """A tiktoken named encoding (downloaded once and cached by tiktoken)."""
    import tiktoken

    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # network failures surface as many different exception types
        raise GptcliError(
            f"could not load tiktoken encoding '{name}' ({type(exc).__name__}); without internet "
            f"access pass a local ranks file instead, e.g. --tokenizer path/to/gpt2.tiktoken"
        ) from None
    return TiktokenTokenizer(encoding, name)


def is_corpus_dependent(spec: str) -> bool:
    """True when the tokenizer must first see the corpus (the `char` vocabulary)."""
    return spec == "char"


def resolve_tokenizer(spec: str, corpus_texts: Iterable[str] | None = None) -> Tokenizer:
    """Build a tokenizer from its config string (`data.tokenizer` / `--tokenizer`).

    `char` builds its vocabulary from `corpus_texts`, which must then be given.
    """
    if spec == "bytes":
        return BytesTokenizer()
    if spec == "char":
        if corpus_texts is None:
            raise ValueError("the char tokenizer needs the corpus to build its vocabulary")
        return CharTokenizer.from_texts(corpus_texts)
    if spec in TIKTOKEN_NAMES:
        return named_tiktoken(spec)
    if spec.endswith(".tiktoken") or Path(spec).is_file():
        return tiktoken_from_file(spec)
    raise GptcliError(
        f"unknown tokenizer '{spec}': use one of {', '.join(TIKTOKEN_NAMES)}, bytes, char, "
        f"or a path to a .tiktoken file"
    )


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer saved by `Tokenizer.save` (no network, no corpus)."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise GptcliError(f"{directory} has no {SPEC_FILE}: the tokenizer is missing")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        kind = spec["type"]
    except (ValueError, KeyError, TypeError):
        raise GptcliError(f"{spec_path} is not a valid tokenizer description") from None
    if kind == "bytes":
        base: Tokenizer = BytesTokenizer()
    elif kind == "char":
        base = CharTokenizer(spec["chars"])
    elif kind == "tiktoken":
        base = tiktoken_from_ranks(_saved_ranks(directory), spec["name"], spec["pattern"],
                                   spec["special_tokens"])
    elif kind == HF_TYPE:
        try:
            base = HFTokenizer.from_spec(spec, _saved_ranks(directory))
        except (KeyError, TypeError, ValueError):
            raise GptcliError(f"{spec_path} is not a valid description of an imported tokenizer; "
                              f"import the model's tokenizer again") from None
    else:
        raise GptcliError(f"{spec_path}: unknown tokenizer type '{kind}'")
    return WithAddedTokens(base, spec["added_tokens"]) if spec.get("added_tokens") else base


def _saved_ranks(directory: Path) -> dict[bytes, int]:
    ranks_path = directory / RANKS_FILE
    if not ranks_path.is_file():
        raise GptcliError(f"{directory} has no {RANKS_FILE}: the tokenizer is incomplete")
    return read_ranks(ranks_path)
