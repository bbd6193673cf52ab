"""Hugging Face tokenizer directories read into gptcli: tiny byte-level BPEs are trained here
with the `tokenizers` library in the styles real models ship, and gptcli's ids must equal
the library's own, through save/load and through the chat template."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from conftest import GPT2_TIKTOKEN, SHAKESPEARE, needs_gpt2_ranks

from gptcli.data.tokenizers.chat_format import (
    CHAT_TOKENS,
    chat_stop_ids,
    is_chat_model,
    prompt_ids,
)
from gptcli.data.tokenizers.hf_tokenizer import byte_alphabet, read_hf_tokenizer
from gptcli.data.tokenizers.tokenizer import (
    WithAddedTokens,
    load_tokenizer,
    read_ranks,
    tiktoken_from_file,
)
from gptcli.errors import GptcliError

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (  # noqa: E402
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # trained first: ids 0, 1, 2
# Llama 3's / Qwen2's split regex (cl100k-like): up to 3 digits, letters with one leading mark.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MIXED = (
    "naïve café — “quotes” … ½ Grüße aus Köln! Привет, мир. 日本語のテキスト。 Ελληνικά\n"
    "Emoji: 🎉👍🏽 👨‍👩‍👧 ok 🚀🚀🚀\n"
    "def add(a, b):\r\n\treturn a + b  # CRLF and a tab\r\n\t\t\tx = {'k': [1, 2]}\r\n"
    "Numbers: 3.14159 2024-05-01 1,000,000 12345678901234567890 ٣٤٥ Ⅳ Ⅻ ²³\n"
    "    indented    with   runs   of spaces   \n\n\n"
    "it's we'll they've I'M SHE'D\u00a0nbsp\u2003emspace\u200bzwsp\n"
    "e\u0301 decomposed vs é composed; A\u030a vs Å; ﬁ ligature\n"
)
EDGES = ["", " ", "\n", "\r\n\r\n", "   trailing   ", "\t\t", "x", "0" * 50, "🎉", "e\u0301", "'s", " 's'"]
QWEN_TEMPLATE = (  # ChatML with a default system turn, as Qwen2.5 writes it
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
BOS_TEMPLATE = (  # Llama-like: bos_token first, plain blocks that trim_blocks/lstrip_blocks tidy
    "{{ bos_token }}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n"
)


def corpus() -> list[str]:
    texts = [MIXED] * 30 + [fuzz(2000, seed) for seed in range(5)]
    return texts + ([SHAKESPEARE.read_text(encoding="utf-8")] if SHAKESPEARE.is_file() else [])


def fuzz(length: int, seed: int) -> str:
    """Random text over letters, marks, digits, whitespace kinds, punctuation and emoji."""
    pool = [*"abcxyz ABC éü日本🎉👍'’-_.,!?0123456789٣", "\n", "\r\n", "\t", "  ", "\u00a0", "e\u0301", "'s",
            "'LL", "\u2003", "\u200b"]
    rng = random.Random(seed)
    return "".join(rng.choice(pool) for _ in range(length))


def sample_texts() -> list[str]:
    """Several KB of varied text to compare encodings on."""
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")[:20000] if SHAKESPEARE.is_file() else ""
    return [shakespeare, MIXED, fuzz(5000, 99), *EDGES]


def train(style: str):
    """A tiny byte-level BPE in one of the styles real models ship."""
    tok = tokenizers.Tokenizer(models.BPE())
    if style == "gpt2":  # GPT-2: ByteLevel with its own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style in ("qwen", "remapped"):  # Llama 3 / Qwen2: NFC, a Split regex, then ByteLevel
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # smollm: every digit its own piece, then ByteLevel with GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return shuffle_ids(tok) if style == "remapped" else tok


def shuffle_ids(tok):
    """The same tokenizer with its ids out of merge order: the BPE's tokens shuffled, the
    special tokens moved after them (merges name tokens by text, so they still hold)."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    plain = [t for t in vocab if t not in SPECIALS]
    random.Random(0).shuffle(plain)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(plain + SPECIALS)}
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def write_dir(folder: Path, tok, config: dict | None = None, generation: dict | None = None,
              jinja: str | None = None) -> Path:
    """A model directory as Hugging Face ships one (tokenizer files only)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE} if config is None else config
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


STYLES = ["gpt2", "qwen", "smollm", "remapped"]


@pytest.fixture(scope="module")
def trained() -> dict:
    return {style: train(style) for style in STYLES}


@pytest.fixture(params=STYLES)
def pair(request, trained, tmp_path):
    """(the `tokenizers` tokenizer, gptcli's reading of its directory)."""
    tok = trained[request.param]
    return tok, read_hf_tokenizer(write_dir(tmp_path / request.param, tok))


def test_encode_equals_tokenizers(pair):
    tok, ours = pair
    texts = sample_texts()
    for text in texts:
        assert ours.encode(text) == tok.encode(text, add_special_tokens=False).ids, text[:40]
    assert [list(ids) for ids in ours.encode_batch(texts)] == [ours.encode(t) for t in texts]


def test_remapped_style_really_has_ids_out_of_merge_order(trained, tmp_path):
    """The id remap is exercised: without it the remapped style would encode differently."""
    ours = {s: read_hf_tokenizer(write_dir(tmp_path / s, trained[s])) for s in ("qwen", "remapped")}
    assert ours["qwen"]._spec()["ids"] is None
    assert ours["remapped"]._spec()["ids"] is not None
    size = trained["remapped"].get_vocab_size()
    assert ours["remapped"].special_tokens == {t: size - 3 + i for i, t in enumerate(SPECIALS)}
    assert ours["remapped"].fingerprint() != ours["qwen"].fingerprint()


def test_decode_round_trips(pair):
    tok, ours = pair
    special = tok.token_to_id("<|im_end|>")
    for text in sample_texts():
        ids = ours.encode(text)
        normal = tok.normalizer.normalize_str(text) if tok.normalizer else text
        assert ours.decode(ids) == normal
        assert ours.decode([*ids, special]) == tok.decode([*ids, special], skip_special_tokens=False)
    assert ours.decode([ours.vocab_size, 10**6]) == ""  # ids no token has (a model's padding)


def test_save_and_load_keep_ids_template_and_stops(pair, tmp_path):
    _, ours = pair
    ours.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint() == ours.fingerprint()
    assert (again.name, again.vocab_size, again.eot_id, again.stop_ids) == \
        (ours.name, ours.vocab_size, ours.eot_id, ours.stop_ids)
    assert (again.special_tokens, again.chat_template) == (ours.special_tokens, ours.chat_template)
    for text in sample_texts():
        assert again.encode(text) == ours.encode(text)


def test_with_gptcli_chat_tokens_round_trips(trained, tmp_path):
    """Finetuning adds gptcli's chat tokens after an imported vocabulary; that saves too."""
    tok = WithAddedTokens(read_hf_tokenizer(write_dir(tmp_path / "hf", trained["remapped"])), CHAT_TOKENS)
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint() == tok.fingerprint()
    assert again.special_tokens == tok.special_tokens and again.encode(MIXED) == tok.encode(MIXED)


def test_fingerprint_covers_the_chat_template(trained, tmp_path):
    first = read_hf_tokenizer(write_dir(tmp_path / "a", trained["gpt2"]))
    second = read_hf_tokenizer(write_dir(tmp_path / "a", trained["gpt2"], jinja=BOS_TEMPLATE))
    assert first.fingerprint() != second.fingerprint()


def test_special_strings_are_text_unless_asked(pair):
    tok, ours = pair
    text = "<|im_start|>user\nhi <|im_end|>\n<|endoftext|>x<|im_end|>"
    specials = set(ours.special_tokens.values())
    assert not specials & set(ours.encode(text))
    assert ours.decode(ours.encode(text)) == text
    assert ours.encode_with_specials(text) == tok.encode(text, add_special_tokens=False).ids


def test_non_special_added_tokens_match_in_plain_text(trained, tmp_path):
    """The `tokenizers` library matches added tokens that are not special even in plain text."""
    tok = tokenizers.Tokenizer.from_str(trained["qwen"].to_str())
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    ours = read_hf_tokenizer(write_dir(tmp_path / "tools", tok))
    text = "call <tool_call>{\"x\": 1}</tool_call> done"
    assert ours.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert "<tool_call>" not in ours.special_tokens
    assert ours.encode(text).count(tok.token_to_id("<tool_call>")) == 1


@pytest.mark.parametrize("style, config, jinja", [
    ("qwen", {"eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE}, None),
    ("remapped", {"eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},
                  "chat_template": [{"name": "default", "template": QWEN_TEMPLATE}]}, None),
    ("gpt2", {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}, BOS_TEMPLATE),  # transformers 5
    ("smollm", {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}, BOS_TEMPLATE),
])
def test_chat_prompt_equals_the_template_encoded_with_specials(trained, tmp_path, style, config, jinja):
    tok = trained[style]
    folder = write_dir(tmp_path / style, tok, {**config, "tokenizer_class": "PreTrainedTokenizerFast"},
                       jinja=jinja)
    ours = read_hf_tokenizer(folder)
    prompt = "What is 12345 + 678?\tAnswer in 日本語 🎉 "
    ids = prompt_ids(ours, prompt)
    assert is_chat_model(ours) and ours.decode(ids).count("<|im_start|>") >= 2
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    assert ids[-len(header):] == header
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    rendered = reference.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(rendered, add_special_tokens=False).ids
    expected = reference.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)


def test_end_of_text_and_stop_ids(trained, tmp_path):
    tok = trained["qwen"]
    end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    both = read_hf_tokenizer(write_dir(tmp_path / "a", tok, {"eos_token": {"content": "<|im_end|>"}},
                                       {"eos_token_id": [end, im_end]}))
    assert (both.eot_id, both.stop_ids, chat_stop_ids(both)) == (im_end, (end, im_end), {end, im_end})
    generated = read_hf_tokenizer(write_dir(tmp_path / "b", tok, {}, {"eos_token_id": im_end}))
    assert (generated.eot_id, generated.stop_ids) == (im_end, (im_end,))
    fallback = read_hf_tokenizer(write_dir(tmp_path / "c", tok, {}))
    assert (fallback.eot_id, fallback.stop_ids, fallback.chat_template) == (end, (end,), None)
    assert not is_chat_model(fallback)


def _split(pattern: dict) -> dict:
    return {"type": "Split", "pattern": pattern, "behavior": "Isolated", "invert": False}


DIGITS = {"type": "Digits", "individual_digits": True}
BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
OTHER_SPLITS = {  # pre-tokenizer steps before ByteLevel, run over the merges of the qwen style
    "regex leaving gaps": [_split({"Regex": r"\p{L}+|\p{N}"}), BYTES_ONLY],
    "lookahead leaving gaps": [_split({"Regex": r"'s|\s+(?=\p{L})"}), BYTES_ONLY],
    "string": [_split({"String": " "}), BYTES_ONLY],
    "string then gpt2": [_split({"String": "\n"}), {**BYTES_ONLY, "use_regex": True}],
    "digits": [DIGITS, {**BYTES_ONLY, "use_regex": True}],
    "digit runs": [{**DIGITS, "individual_digits": False}, {**BYTES_ONLY, "use_regex": True}],
    "split, digits, gpt2": [_split({"Regex": SPLIT}), DIGITS, {**BYTES_ONLY, "use_regex": True}],
    "split, digits": [_split({"Regex": SPLIT}), DIGITS, BYTES_ONLY],
}


@pytest.mark.parametrize("steps", OTHER_SPLITS.values(), ids=OTHER_SPLITS.keys())
def test_other_pre_tokenizer_steps(trained, tmp_path, steps):
    """Split and Digits steps in any order before ByteLevel, and regexes that leave text
    unmatched (those gaps are pieces too; tiktoken alone would drop them)."""
    spec = json.loads(trained["qwen"].to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    ours = read_hf_tokenizer(write_dir(tmp_path / "steps", tok))
    for text in sample_texts():
        assert ours.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_added_tokens_match_longest_first(trained, tmp_path):
    tok = tokenizers.Tokenizer.from_str(trained["qwen"].to_str())
    tok.add_special_tokens(["<|im_start|>assistant"])
    ours = read_hf_tokenizer(write_dir(tmp_path / "longest", tok))
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode_with_specials(text) == tok.encode(text, add_special_tokens=False).ids
    assert tok.token_to_id("<|im_start|>assistant") in ours.encode_with_specials(text)


def test_a_bos_template_processor_is_accepted_and_left_out(trained, tmp_path):
    tok = tokenizers.Tokenizer.from_str(trained["gpt2"].to_str())
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    ours = read_hf_tokenizer(write_dir(tmp_path / "bos", tok))
    assert ours.encode(MIXED) == tok.encode(MIXED, add_special_tokens=False).ids
    assert tok.encode(MIXED).ids[0] == tok.token_to_id("<|endoftext|>")  # the library adds it


def test_gptcli_own_chat_template_is_unchanged():
    from gptcli.data.tokenizers.tokenizer import BytesTokenizer

    tok = WithAddedTokens(BytesTokenizer(), CHAT_TOKENS)
    user, assistant, end = (tok.special_tokens[t] for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    assert prompt_ids(tok, "hi") == [user, 104, 105, end, assistant]
    assert is_chat_model(tok) and chat_stop_ids(tok) == {end}
    assert not is_chat_model(BytesTokenizer()) and chat_stop_ids(BytesTokenizer()) == frozenset()


def every_split_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """A merge for every split of every token into two tokens, by the joined token's rank:
    how transformers converts a tiktoken BPE (Llama 3's file has 280k merges for 128k tokens)."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def last_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per token, in rank order: the two parts BPE joins last when it builds the
    token from its bytes (GPT-2's own merges.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            _, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


@needs_gpt2_ranks
@pytest.mark.parametrize("merge_list", [last_merges, every_split_merges], ids=["gpt2 merges", "every split"])
def test_full_size_gpt2_equals_tokenizers_and_tiktoken(tmp_path, merge_list):
    ranks = read_ranks(GPT2_TIKTOKEN)
    def spell(token: bytes) -> str:
        return "".join(byte_alphabet()[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in merge_list(ranks)]
    tok = tokenizers.Tokenizer(models.BPE({**vocab, "<|endoftext|>": 50256}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    ours = read_hf_tokenizer(write_dir(tmp_path / "gpt2", tok, {"eos_token": "<|endoftext|>"}))
    reference = tiktoken_from_file(GPT2_TIKTOKEN)
    assert (ours.vocab_size, ours.eot_id, ours._spec()["ids"]) == (50257, 50256, None)
    for text in sample_texts():
        assert ours.encode(text) == tok.encode(text, add_special_tokens=False).ids == reference.encode(text)


# --- refused directories --------------------------------------------------------------------


def _set(path: str, value):
    """A change to tokenizer.json: set the value at a slash-separated key path."""
    def change(spec: dict) -> None:
        *parents, last = path.split("/")
        for key in parents:
            spec = spec[int(key)] if isinstance(spec, list) else spec[key]
        spec[last] = value
    return change


def _drop_byte(spec: dict) -> None:
    del spec["model"]["vocab"]["Ā"]  # byte 0x00, which no merge of this corpus uses


def _stray_token(spec: dict) -> None:
    spec["model"]["vocab"]["zqzq"] = len(spec["model"]["vocab"]) + 10


def _no_end_of_text(spec: dict) -> None:
    del spec["model"]["vocab"]["<|endoftext|>"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
METASPACE = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}  # Llama 2
NFC_LOWER = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
REFUSED = {
    "unigram": (_set("model", {"type": "Unigram", "unk_id": 0, "vocab": [["a", 0.0]]}), "model type Unigram"),
    "wordpiece": (_set("model", {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"a": 0}}),
                  "model type WordPiece"),
    "byte fallback": (_set("model/byte_fallback", True), "byte_fallback"),
    "dropout": (_set("model/dropout", 0.1), "dropout"),
    "metaspace": (_set("pre_tokenizer", METASPACE), "pre_tokenizer (Metaspace) does not end with ByteLevel"),
    "metaspace step": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [METASPACE, BYTE_LEVEL]}),
                       "Metaspace pre-tokenizer"),
    "whitespace step": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, BYTE_LEVEL]}), "pre-tokenizer step Whitespace"),
    "no pre-tokenizer": (_set("pre_tokenizer", None), "no pre_tokenizer"),
    "prefix space": (_set("pre_tokenizer/add_prefix_space", True), "add_prefix_space"),
    "split removed": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False}, BYTE_LEVEL]}),
        "behavior Removed"),
    "empty match": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"a*"}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]}), "can match empty"),
    "nfkc": (_set("normalizer", {"type": "NFKC"}), "normalizer NFKC"),
    "lowercase": (_set("normalizer", NFC_LOWER), "normalizer Lowercase"),
    "eos after": (_set("post_processor", {"type": "TemplateProcessing", "single": [
        {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
        "pair": [], "special_tokens": {}}), "post_processor TemplateProcessing adds tokens"),
    "roberta": (_set("post_processor", {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}),
                "post_processor RobertaProcessing"),
    "lstrip": (_set("added_tokens/2/lstrip", True), "'<|im_end|>' has lstrip=true"),
    "missing byte": (_drop_byte, "lacks byte 0x00"),
    "stray token": (_stray_token, "not made by any merge"),
}


@pytest.mark.parametrize("change, message", REFUSED.values(), ids=REFUSED.keys())
def test_refused_tokenizers_name_the_problem(trained, tmp_path, change, message):
    spec = json.loads(trained["gpt2"].to_str())
    change(spec)
    folder = write_dir(tmp_path / "bad", trained["gpt2"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GptcliError, match=re.escape(message)) as caught:
        read_hf_tokenizer(folder)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("config, generation, change, message", [
    ({"eos_token": "<|nope|>"}, None, None, "eos_token '<|nope|>' is not a token"),
    ({}, {"eos_token_id": [5000]}, None, "eos_token_id 5000 is not the id of a token"),
    ({}, None, _no_end_of_text, "no end-of-text token"),
    ({"eos_token": "<|im_end|>", "chat_template": [{"name": "tool_use", "template": "x"}]}, None, None,
     "none named 'default'"),
])
def test_refused_configs_name_the_problem(trained, tmp_path, config, generation, change, message):
    folder = write_dir(tmp_path / "bad", trained["gpt2"], config, generation)
    if change is not None:
        spec = json.loads(trained["gpt2"].to_str())
        change(spec)
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GptcliError, match=re.escape(message)):
        read_hf_tokenizer(folder)


def test_a_directory_without_tokenizer_json_is_refused(tmp_path):
    with pytest.raises(GptcliError, match="has no tokenizer.json"):
        read_hf_tokenizer(tmp_path)


@pytest.mark.parametrize("damage", [
    lambda spec: spec.__setitem__("normalizer", []),
    lambda spec: spec.__setitem__("pre_tokenizer", "ByteLevel"),
    lambda spec: spec.__setitem__("post_processor", "ByteLevel"),
    lambda spec: spec["model"]["vocab"].__setitem__("h", "seven"),
], ids=["normalizer-list", "pre-tokenizer-text", "post-processor-text", "id-not-a-number"])
def test_a_damaged_tokenizer_json_is_a_one_line_error(tmp_path, damage):
    """Values of the wrong JSON type: a one-line error naming the file, not a traceback."""
    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(["hello world, hello there"] * 10, trainer)
    trained.save(str(tmp_path / "tokenizer.json"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    damage(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GptcliError, match=r"tokenizer\.json is damaged or not a tokenizer gptcli reads"):
        read_hf_tokenizer(tmp_path)
