"""Read a Hugging Face tokenizer directory into a gptcli `Tokenizer` (an `HFTokenizer`).

The directory holds `tokenizer.json` (the `tokenizers` library's format), and may hold
`tokenizer_config.json` (eos/bos tokens, the chat template), `chat_template.jinja` (where
transformers 5 writes the template instead) and `generation_config.json` (`eos_token_id`,
an int or a list: the ids that end a reply).

Only byte-level BPE is read, the kind GPT-2, Llama 3, Qwen2/3 and SmolLM2 ship: a BPE model
over GPT-2's byte alphabet, no normalizer or NFC, and a pre-tokenizer that ends with
ByteLevel after regex Split / Digits steps. Everything else (Unigram, WordPiece,
sentencepiece-style byte fallback and Metaspace, other normalizers, a prefix space) is
refused with a GptcliError that names what was found.

Conversion to tiktoken: the BPE's tokens become tiktoken's mergeable ranks, ranked in HF
merge order (tiktoken merges the pair whose joined token ranks lowest, HF the pair whose
merge comes first; for a trained merge list these agree). Where the HF ids are not already
in that order, `HFTokenizer` maps ranks to ids (see its docstring).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import regex
import tiktoken

from gptcli.data.tokenizers.bpe import GPT2_PATTERN
from gptcli.data.tokenizers.tokenizer import EOT, HFTokenizer
from gptcli.errors import GptcliError, shorten

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# Special-token strings a chat template may read, as transformers passes them.
TEMPLATE_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")
ONLY_BYTE_LEVEL = ("gptcli reads only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/3, SmolLM2 "
                   "style); import a model that has one")
# Text a tiktoken pattern is tried on for empty matches (tiktoken cannot encode those).
_PROBE = "Hello, World! it's 1234567 x\n\n\t  naïve café 日本語 🎉 \r\n  end  "


def read_hf_tokenizer(directory: Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face model directory, with its ids, template and stop ids."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise GptcliError(f"{directory} has no {TOKENIZER_FILE}; point at a Hugging Face model "
                          f"directory that ships its tokenizer")
    spec = _read_json(path)
    config = _read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    generation = _read_json(directory / GENERATION_FILE) if (directory / GENERATION_FILE).is_file() else {}
    try:
        return _tokenizer(directory, path, spec, config, generation)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        # The readers check what real files vary in; a value of the wrong JSON type lands here.
        raise GptcliError(f"{path} is damaged or not a tokenizer gptcli reads ({type(exc).__name__}: "
                          f"{shorten(str(exc), 120)})") from None


def _tokenizer(directory: Path, path: Path, spec: dict, config: dict, generation: dict) -> HFTokenizer:
    nfc = _is_nfc(spec.get("normalizer"), path)
    *presplit, last = [_compiled(p, path) for p in _split_patterns(spec.get("pre_tokenizer"), path)]
    _check_post_processor(spec.get("post_processor"), path)
    added, special = _added_tokens(spec.get("added_tokens") or [], path)
    vocab, merges = _bpe_model(spec.get("model"), path)
    ranks, ids = _ranks(vocab, merges, added, path)
    known = {**vocab, **added}  # token string -> id, to find the eos token
    eot_id, stop_ids = _end_ids(config, generation, known, directory)
    return HFTokenizer(
        directory.resolve().name, ranks, _tiktoken_pattern(last, path), added=added, special=special,
        eot_id=eot_id, ids=ids, presplit=[p.pattern for p in presplit], nfc=nfc, stop_ids=stop_ids,
        chat_template=_chat_template(directory, config),
        template_tokens=_template_tokens(config, directory / CONFIG_FILE),
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GptcliError(f"{path} is unreadable: {shorten(str(exc), 200)}") from None
    if not isinstance(value, dict):
        raise GptcliError(f"{path} is not a JSON object; restore the model's original file")
    return value


# --- normalizer, pre-tokenizer, post-processor ---------------------------------------------


def _is_nfc(normalizer: dict | None, path: Path) -> bool:
    """Whether text is NFC-normalized first: a normalizer of null, NFC, or a Sequence of NFC."""
    if normalizer is None:
        return False
    kind = normalizer.get("type")
    if kind == "NFC":
        return True
    if kind == "Sequence":
        steps = [_is_nfc(step, path) for step in normalizer.get("normalizers", [])]  # checks each
        return any(steps)
    raise GptcliError(f"{path}: normalizer {kind} is not supported (only none or NFC); {ONLY_BYTE_LEVEL}")


def _split_patterns(pre_tokenizer: dict | None, path: Path) -> list[str]:
    """The regexes of the pre-tokenizer's splitting steps, in order: each step cuts the
    pieces of the one before (Isolated: matches and the text between them are pieces).
    The last one is what tiktoken splits by; with none, the whole text is one piece."""
    if pre_tokenizer is None:
        raise GptcliError(f"{path} has no pre_tokenizer, so it is not byte-level; {ONLY_BYTE_LEVEL}")
    steps = (pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence"
             else [pre_tokenizer])
    if not steps or steps[-1].get("type") != "ByteLevel":
        kinds = ", ".join(str(step.get("type")) for step in steps) or "an empty Sequence"
        raise GptcliError(f"{path}: pre_tokenizer ({kinds}) does not end with ByteLevel; {ONLY_BYTE_LEVEL}")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise GptcliError(f"{path}: ByteLevel add_prefix_space=true is not supported (it adds a space "
                          f"before the text); {ONLY_BYTE_LEVEL}")
    patterns = [_step_pattern(step, path) for step in steps[:-1]]
    if byte_level.get("use_regex", True):
        patterns.append(GPT2_PATTERN)  # ByteLevel's own regex is GPT-2's
    return patterns or [r"[\s\S]+"]


def _step_pattern(step: dict, path: Path) -> str:
    """The regex of one splitting step before ByteLevel (Split or Digits)."""
    kind = step.get("type")
    if kind == "Split":
        if step.get("behavior") != "Isolated" or step.get("invert"):
            raise GptcliError(f"{path}: Split pre-tokenizer with behavior {step.get('behavior')} "
                              f"(invert={step.get('invert')}) is not supported (only Isolated, not "
                              f"inverted); {ONLY_BYTE_LEVEL}")
        pattern = step.get("pattern") or {}
        if isinstance(pattern.get("Regex"), str):
            return pattern["Regex"]
        if isinstance(pattern.get("String"), str):
            return regex.escape(pattern["String"])
        raise GptcliError(f"{path}: Split pre-tokenizer has no Regex or String pattern; restore the "
                          f"model's original {TOKENIZER_FILE}")
    if kind == "Digits":  # a digit is a Unicode number (Rust's char::is_numeric)
        return r"\p{N}" if step.get("individual_digits") else r"\p{N}+"
    if kind == "Metaspace":
        raise GptcliError(f"{path}: Metaspace pre-tokenizer (sentencepiece-style, e.g. Llama 2) is not "
                          f"supported; {ONLY_BYTE_LEVEL}")
    raise GptcliError(f"{path}: pre-tokenizer step {kind} is not supported (only Split, Digits, then "
                      f"ByteLevel); {ONLY_BYTE_LEVEL}")


def _compiled(pattern: str, path: Path) -> regex.Pattern:
    """A pre-tokenizer regex compiled by Python's `regex` (which runs the steps before the last)."""
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise GptcliError(f"{path}: pre-tokenizer regex {shorten(pattern)!r} does not compile in Python "
                          f"({exc}); gptcli cannot import this tokenizer") from None


def _tiktoken_pattern(compiled: regex.Pattern, path: Path) -> str:
    """The pattern for tiktoken, which keeps only the matches: text between them becomes a
    piece of its own here too (the covering branch eats characters while the pattern does
    not match), as in HF. tiktoken crashes on an empty match, so a pattern with one is refused."""
    pattern = compiled.pattern
    if any(match.start() == match.end() for match in compiled.finditer(_PROBE)):
        raise GptcliError(f"{path}: pre-tokenizer regex {shorten(pattern)!r} can match empty text, which "
                          f"tiktoken cannot split by; {ONLY_BYTE_LEVEL}")
    covering = pattern if pattern == GPT2_PATTERN else rf"(?:{pattern})|(?:(?!(?:{pattern}))[\s\S])+"
    try:  # tiktoken's regex engine (Rust fancy-regex) differs from Python's in places
        tiktoken.Encoding("probe", pat_str=covering, mergeable_ranks={b"a": 0}, special_tokens={})
    except ValueError as exc:
        raise GptcliError(f"{path}: pre-tokenizer regex {shorten(pattern)!r} does not compile in tiktoken "
                          f"({shorten(str(exc), 120)}); {ONLY_BYTE_LEVEL}") from None
    return covering


def _check_post_processor(processor: dict | None, path: Path) -> None:
    """Accept post-processors that add nothing gptcli keeps.

    gptcli encodes as `tokenizers`' `encode(text, add_special_tokens=False)`: a BOS that
    TemplateProcessing puts before the text is left out (gptcli separates documents with
    eot_id, and chat templates write `bos_token` themselves, as transformers renders them).
    Tokens it would add after or around the text (an EOS, Bert/Roberta separators) are
    refused instead of silently dropped.
    """
    if processor is None or processor.get("type") == "ByteLevel":  # ByteLevel: offsets only
        return
    kind = processor.get("type")
    if kind == "Sequence":
        for step in processor.get("processors", []):
            _check_post_processor(step, path)
        return
    if kind == "TemplateProcessing":
        single = [next(iter(item)) for item in processor.get("single", []) if isinstance(item, dict) and item]
        text_at = single.index("Sequence") if "Sequence" in single else len(single)
        if "SpecialToken" not in single[text_at:]:
            return
    raise GptcliError(f"{path}: post_processor {kind} adds tokens after the text, which gptcli does not "
                      f"do (only a BOS before it is accepted, and left out); {ONLY_BYTE_LEVEL}")


# --- vocabulary and merges -----------------------------------------------------------------


def _added_tokens(tokens: list, path: Path) -> tuple[dict[str, int], list[str]]:
    """Every added token's id (content -> id), and the contents of the special ones."""
    added: dict[str, int] = {}
    special = []
    for token in tokens:
        if not isinstance(token, dict) or not isinstance(token.get("content"), str) \
                or not isinstance(token.get("id"), int):
            raise GptcliError(f"{path}: an added token lacks its content or id; restore the model's "
                              f"original {TOKENIZER_FILE}")
        for flag in ("lstrip", "rstrip", "single_word"):
            if token.get(flag):
                raise GptcliError(f"{path}: added token {token['content']!r} has {flag}=true, which gptcli "
                                  f"does not implement; import a model whose added tokens have {flag}=false")
        added[token["content"]] = token["id"]
        if token.get("special"):
            special.append(token["content"])
    return added, special


def _bpe_model(model: dict | None, path: Path) -> tuple[dict[str, int], list]:
    """The vocab (spelled token -> id) and merges of a plain BPE model."""
    model = model if isinstance(model, dict) else {}
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise GptcliError(f"{path}: model type {kind} is not supported (only BPE); {ONLY_BYTE_LEVEL}")
    if model.get("byte_fallback"):
        raise GptcliError(f"{path}: BPE with byte_fallback (sentencepiece-style, e.g. Llama 2) is not "
                          f"supported; {ONLY_BYTE_LEVEL}")
    if model.get("dropout"):
        raise GptcliError(f"{path}: BPE dropout {model['dropout']} makes encoding random; set it to null")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise GptcliError(f"{path}: BPE {key} {model[key]!r} is not supported; {ONLY_BYTE_LEVEL}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise GptcliError(f"{path}: the BPE model lacks its vocab or merges; restore the model's "
                          f"original {TOKENIZER_FILE}")
    return vocab, merges


def _ranks(vocab: dict[str, int], merges: list, added: dict[str, int], path: Path
           ) -> tuple[dict[bytes, int], list[int] | None]:
    """tiktoken's mergeable ranks and the rank -> HF id map (None when ranks are the ids).

    Order: the 256 bytes, then each merge's new token at its first merge (a token that
    several merges make, as in Llama 3's file, ranks at the first). Only the order of the
    multi-byte tokens matters to tiktoken, so when their HF ids rise in merge order the
    ids themselves serve as ranks.
    """
    order = _tokens_in_merge_order(vocab, merges, path)
    _refuse_unreachable(vocab, {token for token, _ in order}, added, path)
    _refuse_id_clashes(order, added, path)
    merged_ids = [i for _, i in order[256:]]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:])):
        return dict(order), None
    return {token: rank for rank, (token, _) in enumerate(order)}, [i for _, i in order]


def _tokens_in_merge_order(vocab: dict[str, int], merges: list, path: Path) -> list[tuple[bytes, int]]:
    """(token bytes, HF id) of the 256 bytes (in byte order), then of each merge's token."""
    order = []
    for byte, char in enumerate(byte_alphabet()):
        if char not in vocab:
            raise GptcliError(f"{path}: the vocabulary lacks byte {byte:#04x} (spelled {char!r}), so it is "
                              f"not a byte-level BPE; {ONLY_BYTE_LEVEL}")
        order.append((bytes([byte]), vocab[char]))
    seen = {token for token, _ in order}
    for number, merge in enumerate(merges):
        left, right = _merge_pair(merge, number, path)
        spelled = left + right
        if spelled not in vocab:
            raise GptcliError(f"{path}: merge {number} makes {spelled!r}, which is not in the vocabulary; "
                              f"restore the model's original {TOKENIZER_FILE}")
        token = _spelled_bytes(spelled, path)
        if token not in seen:
            seen.add(token)
            order.append((token, vocab[spelled]))
    return order


def _merge_pair(merge, number: int, path: Path) -> tuple[str, str]:
    """A merge as its two spelled tokens: `"a b"` (older files) or `["a", "b"]`."""
    pair = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
        raise GptcliError(f"{path}: merge {number} ({shorten(str(merge))}) is not a pair of tokens; "
                          f"restore the model's original {TOKENIZER_FILE}")
    return pair[0], pair[1]


def _refuse_unreachable(vocab: dict[str, int], made: set[bytes], added: dict[str, int], path: Path) -> None:
    """Refuse vocabulary tokens that are neither a byte, a merge's token nor an added token:
    tiktoken would build them from their bytes where HF's merges never do."""
    stray = [s for s in vocab if s not in added and _spelled_bytes(s, path) not in made]
    if stray:
        raise GptcliError(f"{path}: {len(stray)} vocabulary tokens (e.g. {shorten(stray[0])!r}) are not made "
                          f"by any merge nor listed as added tokens, so gptcli cannot encode as the tokenizers "
                          f"library does; list them in added_tokens or remove them")


def _refuse_id_clashes(order: list[tuple[bytes, int]], added: dict[str, int], path: Path) -> None:
    """An added token may share its id only with the BPE token of the same text."""
    owner = {i: token for token, i in order}
    for content, i in added.items():
        if owner.get(i, content.encode()) != content.encode():
            raise GptcliError(f"{path}: added token {content!r} has id {i}, which the vocabulary gives to "
                              f"{owner[i]!r}; restore the model's original {TOKENIZER_FILE}")


@functools.cache
def byte_alphabet() -> str:
    """The character that spells each byte (index = byte) in byte-level vocabularies (GPT-2's
    vocab.json and merges.txt, tokenizer.json): printable Latin-1 bytes spell themselves,
    the others (controls, space, 0x7F-0xA0, 0xAD) take code points 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelled, extra = [], 256
    for byte in range(256):
        if byte in printable:
            spelled.append(chr(byte))
        else:
            spelled.append(chr(extra))
            extra += 1
    return "".join(spelled)


@functools.cache
def _unspelling() -> dict[int, str]:
    """A str.translate table from the byte alphabet to Latin-1 (char i is byte i); the
    code points below 256 that spell no byte go to U+FFFF, which Latin-1 cannot encode."""
    table = {byte: "\uffff" for byte in range(256)}
    table.update({ord(char): chr(byte) for byte, char in enumerate(byte_alphabet())})
    return table


def _spelled_bytes(spelled: str, path: Path) -> bytes:
    """The bytes a vocabulary token spells (one alphabet character per byte)."""
    try:
        return spelled.translate(_unspelling()).encode("latin-1")
    except UnicodeEncodeError:
        raise GptcliError(f"{path}: vocabulary token {shorten(spelled)!r} is not spelled in the byte-level "
                          f"alphabet; {ONLY_BYTE_LEVEL}") from None


# --- end of text, stop ids, chat template --------------------------------------------------


def _end_ids(config: dict, generation: dict, known: dict[str, int], directory: Path) -> tuple[int, list[int]]:
    """`eot_id` (the eos token's id: tokenizer_config's eos_token, else generation_config's
    first eos_token_id, else `<|endoftext|>`) and the stop ids (all of generation_config's
    eos ids, and eot_id)."""
    eos = _token_text(config.get("eos_token"), "eos_token", directory / CONFIG_FILE)
    if eos is not None and eos not in known:
        raise GptcliError(f"{directory / CONFIG_FILE}: eos_token {eos!r} is not a token of "
                          f"{TOKENIZER_FILE}; set eos_token to one of its tokens")
    generated = _eos_ids(generation.get("eos_token_id"), set(known.values()), directory / GENERATION_FILE)
    if eos is not None:
        eot_id = known[eos]
    elif generated:
        eot_id = generated[0]
    elif EOT in known:
        eot_id = known[EOT]
    else:
        raise GptcliError(f"{directory}: no end-of-text token (no eos_token in {CONFIG_FILE}, no "
                          f"eos_token_id in {GENERATION_FILE}, no {EOT}); set eos_token in {CONFIG_FILE}")
    return eot_id, sorted({*generated, eot_id})


def _eos_ids(value, ids: set[int], path: Path) -> list[int]:
    """generation_config's eos_token_id as a list (it may be an int, a list or absent)."""
    found = [] if value is None else value if isinstance(value, list) else [value]
    for i in found:
        if not isinstance(i, int) or i not in ids:
            raise GptcliError(f"{path}: eos_token_id {i!r} is not the id of a token; set it to the id of "
                              f"the model's end-of-text token")
    return found


def _token_text(value, key: str, path: Path) -> str | None:
    """A special token as tokenizer_config writes it: a string, `{"content": ...}` or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise GptcliError(f"{path}: {key} must be a string or {{\"content\": string}}; restore the model's "
                          f"original {CONFIG_FILE}")
    return value


def _template_tokens(config: dict, path: Path) -> dict[str, str]:
    """The special-token strings a chat template reads (`bos_token`, ...), those that are set."""
    tokens = {key: _token_text(config.get(key), key, path) for key in TEMPLATE_VARIABLES}
    return {key: text for key, text in tokens.items() if text is not None}


def _chat_template(directory: Path, config: dict) -> str | None:
    """The chat template: chat_template.jinja (transformers 5) else tokenizer_config's
    chat_template (a string, or a list of named templates: the one named "default")."""
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise GptcliError(f"{directory / CONFIG_FILE}: chat_template lists templates "
                              f"({', '.join(map(str, named))}) but none named 'default'; name one 'default'")
    if template is not None and not isinstance(template, str):
        raise GptcliError(f"{directory / CONFIG_FILE}: chat_template must be a string; restore the model's "
                          f"original {CONFIG_FILE}")
    return template
