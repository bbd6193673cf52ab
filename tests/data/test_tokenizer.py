import hashlib
import os

import pytest
import tiktoken
from conftest import GPT2_TIKTOKEN, needs_gpt2_ranks

from gptcli.data.tokenizers.tokenizer import (
    BytesTokenizer,
    CharTokenizer,
    load_tokenizer,
    read_ranks,
    resolve_tokenizer,
)
from gptcli.errors import GptcliError

TEXTS = ["hello world", "naïve café — 日本語 ✓ 🚀", "  spaces\n\ttabs\r\n", "<|endoftext|> as text", ""]


def test_bytes_round_trip_and_ids():
    tok = BytesTokenizer()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("A") == [65]


def test_char_vocabulary_from_corpus():
    tok = resolve_tokenizer("char", iter(["hello", "world"]))
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == "dehlorw" and tok.vocab_size == 8 and tok.eot_id == 7
    assert tok.decode(tok.encode("hello world"[:5])) == "hello"
    with pytest.raises(GptcliError, match="character 'z' is not in the vocabulary"):
        tok.encode("zoo")


@pytest.mark.parametrize("make", [
    lambda: BytesTokenizer(),
    lambda: CharTokenizer("".join(TEXTS)),
])
def test_save_and_load_round_trip(tmp_path, make):
    tok = make()
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert (again.vocab_size, again.eot_id, again.name) == (tok.vocab_size, tok.eot_id, tok.name)
    for text in TEXTS:
        assert again.encode(text) == list(tok.encode(text))


def _r50k_offline(tmp_path, monkeypatch):
    """Seed tiktoken's download cache with the shared ranks file (identical to r50k_base)."""
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(GPT2_TIKTOKEN.read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))


@needs_gpt2_ranks
def test_tiktoken_file_matches_r50k_base(tmp_path, monkeypatch):
    _r50k_offline(tmp_path, monkeypatch)
    named = resolve_tokenizer("r50k_base")
    from_file = resolve_tokenizer(str(GPT2_TIKTOKEN))
    assert from_file.vocab_size == named.vocab_size == 50257
    assert from_file.eot_id == named.eot_id == 50256
    for text in TEXTS:
        assert from_file.encode(text) == named.encode(text)
        assert from_file.decode(from_file.encode(text)) == text


@needs_gpt2_ranks
def test_tiktoken_tokenizer_save_load_needs_no_original(tmp_path, monkeypatch):
    _r50k_offline(tmp_path, monkeypatch)
    tok = resolve_tokenizer("r50k_base")
    tok.save(tmp_path / "tok")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # no download possible
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode("Hello there, world!") == tok.encode("Hello there, world!")
    assert again.encoding.n_vocab == 50257


def test_named_encoding_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    # Any proxy setting that could reach the network is removed; this machine has none anyway.
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tiktoken.load, "read_file", lambda path: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(GptcliError, match="could not load tiktoken encoding 'cl100k_base'.*tiktoken"):
        resolve_tokenizer("cl100k_base")


def test_unknown_tokenizer():
    with pytest.raises(GptcliError, match="unknown tokenizer 'gpt5'"):
        resolve_tokenizer("gpt5")


def test_bad_tiktoken_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64!!! x\n")
    with pytest.raises(GptcliError, match="line 1"):
        read_ranks(bad)
    with pytest.raises(GptcliError, match="does not exist"):
        resolve_tokenizer(str(tmp_path / "missing.tiktoken"))


def test_rewritten_tiktoken_file_is_reread(tmp_path):
    """Loading goes through our own reader, not tiktoken's path-keyed cache."""
    import base64

    path = tmp_path / "t.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    assert resolve_tokenizer(str(path)).vocab_size == 257
    with open(path, "a") as f:
        f.write(f"{base64.b64encode(b'ab').decode()} 256\n")
    assert resolve_tokenizer(str(path)).vocab_size == 258


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(GptcliError, match="tokenizer is missing"):
        load_tokenizer(tmp_path)
    os.makedirs(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptcliError, match="not a valid tokenizer description"):
        load_tokenizer(tmp_path / "t")
