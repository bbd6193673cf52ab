"""export-hf writes a tokenizer transformers reads with gptcli's exact ids, or says plainly
that it wrote none (issue 26, item 15). Checked against transformers itself."""

import random

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.bpe import GPT2_PATTERN, train_bpe
from gptcli.data.tokenizers.tokenizer import (
    BytesTokenizer,
    CharTokenizer,
    WithAddedTokens,
    tiktoken_from_ranks,
)
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import save_checkpoint
from gptcli.store.hf import export_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def random_texts(seed: int = 0, count: int = 150) -> list[str]:
    """Arbitrary UTF-8 text: ASCII with control characters, 2-, 3- and 4-byte characters,
    whitespace runs, CRLF, and the empty string."""
    rng = random.Random(seed)
    ranges = [(0, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    texts = ["", "hello world", "  leading and trailing  ", "a . b , c 's", "\r\n\n\t\x00\x7f",
             "naïve café — 日本語 🎉 e\u0301"]
    for _ in range(count):
        texts.append("".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(1, 40))))
    return texts


def checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tokenizer.vocab_size))
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, "# test\n")


def export(tmp_path, tokenizer):
    """The export's folder (export_hf, as every caller uses it)."""
    return export_hf(checkpoint(tmp_path, tokenizer), tmp_path / "hf")


def export_result(tmp_path, tokenizer):
    """The export's result, which says what became of the tokenizer."""
    from gptcli.store.hf import export_hf_model

    return export_hf_model(checkpoint(tmp_path, tokenizer), tmp_path / "hf")


def assert_same_ids(hf, ours, texts, encode=None):
    encode = encode or ours.encode
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids == list(encode(text)), repr(text)
        assert hf.decode(ids) == text, repr(text)


def test_bytes_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    ours = BytesTokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(export(tmp_path, ours))
    assert len(hf) == 257 and hf.eos_token_id == 256
    assert_same_ids(hf, ours, random_texts())


def test_char_tokenizer_round_trips_and_refuses_unknown_characters(tmp_path):
    texts = random_texts(seed=1, count=40)
    ours = CharTokenizer("".join(texts))
    hf = transformers.AutoTokenizer.from_pretrained(export(tmp_path, ours))
    assert len(hf) == ours.vocab_size and hf.eos_token_id == ours.eot_id
    assert_same_ids(hf, ours, texts)
    assert_same_ids(hf, ours, ["".join(reversed(t)) for t in texts])
    unknown = next(chr(c) for c in range(0x4E00, 0x9FFF) if chr(c) not in ours.chars)
    with pytest.raises(Exception):  # never silently some id, as gptcli refuses it too
        hf(texts[1] + unknown)


def test_chat_special_tokens_keep_their_ids(tmp_path):
    ours = WithAddedTokens(BytesTokenizer(), CHAT_TOKENS)
    hf = transformers.AutoTokenizer.from_pretrained(export(tmp_path, ours))
    rendered = "<|system|>be brief<|end|><|user|>2 + 2? naïve<|end|><|assistant|>4<|end|>"
    assert_same_ids(hf, ours, [rendered, *random_texts(seed=2, count=20)], encode=ours.encode_with_specials)
    assert hf.convert_tokens_to_ids(CHAT_TOKENS) == [257, 258, 259, 260]


def test_trained_bpe_round_trips(tmp_path):
    corpus = "".join(random_texts(seed=3, count=50)) + "the cat sat on the mat. " * 50 + "def f(x):\n    return x\n" * 30
    ranks = train_bpe([corpus], 400)
    ours = tiktoken_from_ranks(ranks, "trained", GPT2_PATTERN)
    hf = transformers.AutoTokenizer.from_pretrained(export(tmp_path, ours))
    assert_same_ids(hf, ours, [*random_texts(seed=4, count=60), "the cat sat on the mat.  \n\n  x"])


@pytest.mark.parametrize("name", ["bytes", "char"])
def test_result_says_which_tokenizer_was_written(tmp_path, name):
    ours = BytesTokenizer() if name == "bytes" else CharTokenizer("abc ")
    result = export_result(tmp_path, ours)
    assert result.tokenizer_written and (result.path / "tokenizer.json").is_file()
    assert f"tokenizer '{ours.name}' written as tokenizer.json" in result.tokenizer_note


def test_tokenizer_without_exact_form_is_not_claimed(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ours = tiktoken_from_ranks(ranks, "other-pattern", r"\S+|\s+")
    result = export_result(tmp_path, ours)
    assert not result.tokenizer_written
    assert result.tokenizer_note.startswith("no tokenizer written") and "other-pattern" in result.tokenizer_note
    written = {p.name for p in result.path.iterdir()}
    assert not written & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}
