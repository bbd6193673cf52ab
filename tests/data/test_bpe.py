"""Tests for gptcli.data.tokenizers.bpe: byte-level BPE training and the .tiktoken writer."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest
import tiktoken
from conftest import SHAKESPEARE
from tiktoken.load import load_tiktoken_bpe

from gptcli.data.tokenizers.bpe import GPT2_PATTERN, train_bpe, write_tiktoken_file

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells. "
    "Peter Piper picked a peck of pickled peppers; where's the peck of pickled peppers "
    "Peter Piper picked? It's 2024 and we've got 1,000,000 reasons to test tokenizers.\n"
)
UNICODE = "Grüße aus Köln! Ça va? Привет, мир. 日本語のテキスト。 Emoji: 🎉👍🏽 👨‍👩‍👧 ok\n"
TRICKY_STRINGS = [
    "",
    " ",
    "\n\n\n",
    "   leading and trailing   ",
    "tabs\tand\r\nwindows\r\nnewlines\t\t",
    "naïve café — “quotes” … ½",
    "🎉🎉🎉👍🏽👨‍👩‍👧‍👦",
    "unseen script: ⅀ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff",
    "'s 're 've 'll 'd 'm 't ''' 12345 3.14159",
]


def synthetic_english(num_sentences: int, seed: int = 0) -> str:
    """Deterministic English-like prose: common function words plus invented words."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "th", "sh", "st"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai"]
    codas = ["", "", "n", "r", "s", "t", "nd", "ng", "ll", "ck"]

    def invented_word() -> str:
        syllables = rng.choice([1, 1, 2, 2, 3])
        return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))

    lexicon = [invented_word() for _ in range(1500)]
    function_words = ["the", "of", "and", "to", "in", "is", "that", "it", "was", "for"]
    sentences = []
    for _ in range(num_sentences):
        words = [
            rng.choice(function_words) if rng.random() < 0.3 else rng.choice(lexicon)
            for _ in range(rng.randint(4, 14))
        ]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?,") + " ")
    return "".join(sentences)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """A small mixed corpus, given as several pieces like a streamed file."""
    prose = synthetic_english(400)
    pieces = [prose[start : start + 5000] for start in range(0, len(prose), 5000)]
    return pieces + [ENGLISH] * 10 + [UNICODE] * 10


@pytest.fixture(scope="module")
def ranks(corpus: list[str]) -> dict[bytes, int]:
    return train_bpe(iter(corpus), 600)


def make_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="test-bpe",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


def test_gpt2_pattern_matches_tiktoken() -> None:
    from tiktoken_ext.openai_public import r50k_pat_str

    assert GPT2_PATTERN == r50k_pat_str


def test_rank_count_is_vocab_size_minus_one(ranks: dict[bytes, int]) -> None:
    assert len(ranks) == 600 - 1
    assert sorted(ranks.values()) == list(range(len(ranks)))


def test_first_256_ranks_are_single_bytes(ranks: dict[bytes, int]) -> None:
    for value in range(256):
        assert ranks[bytes([value])] == value
    assert all(len(token) >= 2 for token, rank in ranks.items() if rank >= 256)


@pytest.mark.parametrize("text", TRICKY_STRINGS + [ENGLISH, UNICODE])
def test_tiktoken_round_trip(ranks: dict[bytes, int], text: str) -> None:
    encoding = make_encoding(ranks)
    assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_end_of_text_token_takes_the_reserved_id(ranks: dict[bytes, int]) -> None:
    encoding = make_encoding(ranks)
    assert encoding.n_vocab == 600
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [599]


def test_training_is_deterministic(corpus: list[str], ranks: dict[bytes, int]) -> None:
    again = train_bpe(iter(corpus), 600)
    assert list(again.items()) == list(ranks.items())


def test_result_does_not_depend_on_piece_order(corpus: list[str], ranks: dict[bytes, int]) -> None:
    assert train_bpe(reversed(corpus), 600) == ranks


def test_merges_compress_english() -> None:
    text = synthetic_english(2000, seed=1)
    encoding = make_encoding(train_bpe([text], 1000))
    assert len(encoding.encode_ordinary(text)) < 0.6 * len(text.encode("utf-8"))


def test_first_merge_is_most_frequent_pair() -> None:
    # Chunks: "xyxyxy" (x,y)x3 (y,x)x2; "\n"; "zz" (z,z)x1 -> "xy" must come first.
    ranks = train_bpe(["xyxyxy\nzz"], 258)
    assert len(ranks) == 257
    assert ranks[b"xy"] == 256


def test_ties_break_to_lexicographically_smallest_pair() -> None:
    # Chunks "ab" and " ba": pairs (a,b), (" ",b), (b,a) each occur once and
    # (b" ", b"b") is the smallest.  That leaves (a,b) and (" b",a), once each,
    # and (b" b", b"a") < (b"a", b"b") because a space sorts before letters.
    ranks = train_bpe(["ab ba"], 260)
    new_tokens = sorted((rank, token) for token, rank in ranks.items() if rank >= 256)
    assert [token for _, token in new_tokens] == [b" b", b" ba", b"ab"]


def test_stops_early_when_no_pairs_are_left() -> None:
    ranks = train_bpe(["abc"], 1000)
    assert len(ranks) == 258
    assert ranks[b"abc"] == 257


def test_progress_is_reported() -> None:
    calls: list[tuple[int, int]] = []
    train_bpe([synthetic_english(100)], 457, on_progress=lambda done, total: calls.append((done, total)))
    assert calls
    assert all(total == 200 for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (200, 200)


def test_write_and_load_round_trip(ranks: dict[bytes, int], tmp_path: Path) -> None:
    path = tmp_path / "tok.tiktoken"
    write_tiktoken_file(ranks, path)
    assert load_tiktoken_bpe(str(path)) == ranks
    assert list(tmp_path.iterdir()) == [path]  # the temp file was renamed away


def test_written_file_format(tmp_path: Path) -> None:
    ranks = {bytes([b]): b for b in range(256)} | {b" the": 256}
    path = tmp_path / "tok.tiktoken"
    write_tiktoken_file(ranks, path)
    lines = path.read_text(encoding="ascii").splitlines()
    assert len(lines) == 257
    assert lines[0] == base64.b64encode(b"\x00").decode() + " 0"
    assert lines[-1] == base64.b64encode(b" the").decode() + " 256"


def test_write_replaces_existing_file(ranks: dict[bytes, int], tmp_path: Path) -> None:
    path = tmp_path / "tok.tiktoken"
    path.write_text("old contents\n")
    write_tiktoken_file(ranks, str(path))
    assert load_tiktoken_bpe(str(path)) == ranks


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_too_small_vocab_is_rejected(vocab_size: int) -> None:
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe([ENGLISH], vocab_size)


@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_corpus_is_rejected(texts: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        train_bpe(texts, 300)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared tinyshakespeare.txt not available")
def test_tiny_shakespeare() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ranks = train_bpe(text.splitlines(keepends=True), 2048)
    assert len(ranks) == 2047
    encoding = make_encoding(ranks)
    sample = text[:20000]
    tokens = encoding.encode_ordinary(sample)
    assert encoding.decode(tokens) == sample
    assert len(tokens) < 0.4 * len(sample.encode("utf-8"))
