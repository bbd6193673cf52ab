import json

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, SHAKESPEARE, needs_gpt2_ranks, needs_shakespeare

from gptcli.data.text import corpus as corpus
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.data.tokenized.token_files import read_meta
from gptcli.data.tokenizers.tokenizer import load_tokenizer
from gptcli.data.training.dataset import TokenDataset
from gptcli.errors import GptcliError
from gptcli.events import Notice


def decode_split(out, split):
    tok = load_tokenizer(out / "tokenizer")
    ids = np.asarray(TokenDataset.open(out).splits[split]).tolist()
    docs, current = [], []
    for i in ids:
        if i == tok.eot_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    if current:  # only the train part of a one-file corpus ends without end-of-text
        docs.append(tok.decode(current))
    return docs


@pytest.mark.parametrize("tokenizer", ["bytes", "char", pytest.param(str(GPT2_TIKTOKEN), marks=needs_gpt2_ranks)])
def test_round_trip_to_original_documents(tmp_path, corpus_dir, tokenizer):
    out = tmp_path / "tok"
    result = tokenize_corpus([str(corpus_dir)], out, tokenizer=tokenizer, val_fraction=0.2)
    originals = {p.read_text() for p in corpus_dir.rglob("*.py")}
    train, val = decode_split(out, "train"), decode_split(out, "val")
    assert set(train) | set(val) == originals
    assert len(train) + len(val) == 40
    assert len(val) == 8  # exactly val_fraction of the documents
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == result.splits["train"].documents == 40 - len(val)
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val)
    assert len(meta["sources"]) == 40


def test_split_is_deterministic_and_seeded(tmp_path, corpus_dir):
    runs = [tokenize_corpus([str(corpus_dir)], tmp_path / f"t{i}", tokenizer="bytes", seed=s)
            for i, s in enumerate([1, 1, 2])]
    vals = [decode_split(r.out_dir, "val") for r in runs]
    assert vals[0] == vals[1]
    assert vals[0] != vals[2]


@needs_shakespeare
def test_single_file_split_by_position(tmp_path):
    out = tmp_path / "shakespeare"
    tokenize_corpus([str(SHAKESPEARE)], out, tokenizer="char", val_fraction=0.1)
    text = SHAKESPEARE.read_text()
    (train,), (val,) = decode_split(out, "train"), decode_split(out, "val")
    assert train + val == text
    assert abs(len(val) / len(text) - 0.1) < 0.001 and train.endswith("\n")
    assert load_tokenizer(out / "tokenizer").vocab_size == 66  # 65 characters + end-of-text


def test_large_file_streams_in_pieces(tmp_path, monkeypatch):
    """Pieces far smaller than the file (cut at lines, at characters) rebuild it exactly."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 64)
    lines = [f"line {i} héllo wörld 日本\n" for i in range(300)] + ["x" * 200 + "日本語" * 30]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    source = corpus.expand_inputs([str(path)])
    pieces = list(corpus.iter_pieces(source))
    assert len(pieces) > 100 and all(p.nbytes <= 64 for p in pieces)
    assert "".join(p.text for p in pieces) == path.read_text()
    assert [p.document_end for p in pieces].count(True) == 1
    out = tmp_path / "tok"
    tokenize_corpus([str(path)], out, tokenizer="bytes", val_fraction=0.25)
    (train,), (val,) = decode_split(out, "train"), decode_split(out, "val")
    assert train + val == path.read_text()


def test_jsonl_field_and_uint32(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"body": f"record {i} " * 5, "id": i} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = tmp_path / "tok"
    tokenize_corpus([str(path)], out, tokenizer="bytes", text_field="body", val_fraction=0.1)
    assert sorted(decode_split(out, "train") + decode_split(out, "val")) == sorted(r["body"] for r in records)
    from gptcli.data.tokenized.token_files import token_dtype

    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_globs_and_stdlib_expand(tmp_path, corpus_dir):
    found = corpus.expand_inputs([str(corpus_dir / "**" / "*.py")])
    assert len(found) == 40
    stdlib = corpus.expand_inputs(["stdlib"])
    names = {s.path.name for s in stdlib}
    assert "os.py" in names and len(stdlib) > 200
    assert not any("test" in s.path.parts for s in stdlib)


def test_overwrite_protects_existing_output(tmp_path, corpus_dir):
    out = tmp_path / "tok"
    tokenize_corpus([str(corpus_dir)], out, tokenizer="bytes")
    before = (out / "train-00000.bin").read_bytes()
    with pytest.raises(GptcliError, match="already holds a tokenized dataset; pass --overwrite"):
        tokenize_corpus([str(corpus_dir)], out, tokenizer="char")
    assert (out / "train-00000.bin").read_bytes() == before
    tokenize_corpus([str(corpus_dir)], out, tokenizer="char", overwrite=True)
    assert read_meta(out)["tokenizer"]["name"].startswith("char")


def test_failure_leaves_nothing_behind(tmp_path, corpus_dir):
    (corpus_dir / "zz_bad.txt").write_bytes(b"fine text\n\xff\xfe broken")
    with pytest.raises(GptcliError, match=r"zz_bad\.txt: invalid UTF-8 at byte 10"):
        tokenize_corpus([str(corpus_dir)], tmp_path / "tok", tokenizer="bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: [str(d / "missing.txt")], "does not exist"),
    (lambda d: [str(d / "empty.txt")], "is empty"),
    (lambda d: [str(d / "nothing")], "has no text files"),
    (lambda d: [str(d / "*.nomatch")], "matches no files"),
    (lambda d: [str(d / "blob.txt")], r"looks like a binary file \(NUL byte at offset 3\)"),
    (lambda d: [str(d / "rows.jsonl")], r"rows\.jsonl:2: no 'text' field"),
    (lambda d: [str(d / "broken.jsonl")], r"broken\.jsonl:1: invalid JSON"),
    (lambda d: [], "no inputs given"),
])
def test_bad_inputs(tmp_path, setup, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "blob.txt").write_bytes(b"abc\x00def")
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(GptcliError, match=message):
        tokenize_corpus(setup(tmp_path), tmp_path / "out", tokenizer="bytes")
    assert not (tmp_path / "out").exists()


def test_out_is_a_file(tmp_path, corpus_dir):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(GptcliError, match="is a file"):
        tokenize_corpus([str(corpus_dir)], tmp_path / "taken", tokenizer="bytes")
    assert (tmp_path / "taken").read_text() == "x"


def test_too_few_documents_for_val(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i}\n")
    with pytest.raises(GptcliError, match="val split is empty"):
        tokenize_corpus([str(tmp_path / "d*.txt")], tmp_path / "out", tokenizer="bytes", val_fraction=0.01)


def test_train_bpe_writes_tiktoken_file(tmp_path, corpus_dir):
    out = tmp_path / "tok"
    events = []
    result = tokenize_corpus([str(corpus_dir)], out, train_bpe=350, on_event=events.append)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 350 and result.vocab_size == 350
    assert not [e for e in events if isinstance(e, Notice)]
    assert (out / "tokenizer" / "tokenizer.tiktoken").is_file()
    docs = decode_split(out, "train") + decode_split(out, "val")
    assert set(docs) == {p.read_text() for p in corpus_dir.rglob("*.py")}
    assert read_meta(out)["splits"]["train"]["tokens"] < read_meta(out)["splits"]["train"]["bytes"] * 0.65
    events = []
    tokenize_corpus([str(corpus_dir)], tmp_path / "t3", train_bpe=5000, on_event=events.append)
    assert any("ran out of pairs" in e.message for e in events if isinstance(e, Notice))
    with pytest.raises(GptcliError, match="--train-bpe"):
        tokenize_corpus([str(corpus_dir)], tmp_path / "t2", train_bpe=100)


# A file too small to split is refused, but what is wrong with its content is said first,
# whatever its size: re-encoding a 9-byte file will not make it big enough, and the user
# should not fix the size only to be told about the encoding next.
@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 abc\n", r"tiny\.txt: invalid UTF-8 at byte 3"),
    (b"ab\x00cdefg\n", r"tiny\.txt looks like a binary file \(NUL byte at offset 2\)"),
    (b"ok\nfine\n", r"tiny\.txt is too small to split"),
])
@pytest.mark.parametrize("train_bpe", [None, 300], ids=["tokenizer", "train-bpe"])
def test_content_errors_come_before_the_size_of_a_one_file_corpus(tmp_path, content, message, train_bpe):
    (tmp_path / "tiny.txt").write_bytes(content)
    with pytest.raises(GptcliError, match=message):
        tokenize_corpus([str(tmp_path / "tiny.txt")], tmp_path / "out", tokenizer="bytes", train_bpe=train_bpe)
    assert not (tmp_path / "out").exists()


def test_a_one_file_corpus_says_it_was_split_by_position(tmp_path, corpus_dir):
    (tmp_path / "one.txt").write_text("a line of text\n" * 100)
    one = tokenize_corpus([str(tmp_path / "one.txt")], tmp_path / "one", tokenizer="bytes")
    assert one.split_by_position
    assert not tokenize_corpus([str(corpus_dir)], tmp_path / "many", tokenizer="bytes").split_by_position


def test_a_part_with_one_text_file_splits_it_as_one_run_does(tmp_path):
    """Only a whole corpus of one text file is split by position: in a corpus of two, split
    in two parts, each part's one file goes whole to train or val, as in one run."""
    from gptcli.data.tokenized.merge import merge_parts

    for name in "ab":
        (tmp_path / f"{name}.txt").write_text(f"{name} line\n" * 200)
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    one = tokenize_corpus(inputs, tmp_path / "one", tokenizer="bytes", val_fraction=0.5)
    parts = [tokenize_corpus(inputs, tmp_path / f"part{k}", tokenizer="bytes", val_fraction=0.5, part=(k, 2))
             for k in (1, 2)]
    assert not any(part.split_by_position for part in parts)
    merge_parts([str(tmp_path / "part1"), str(tmp_path / "part2")], tmp_path / "merged")
    assert read_meta(tmp_path / "merged")["splits"] == read_meta(tmp_path / "one")["splits"]
    assert {split: stats.documents for split, stats in one.splits.items()} == {"train": 1, "val": 1}
