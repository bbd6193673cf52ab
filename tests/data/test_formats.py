"""Corpus formats: Parquet, gzip/zstd-compressed text and JSONL, Hugging Face `save_to_disk`
folders. The same documents read from any of them give the same pieces and the same token
ids; every piece is a restart point; bad files are one-line errors naming the file."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from gptcli.config import DataConfig, config_from_dict  # noqa: E402
from gptcli.data.text import corpus, formats  # noqa: E402
from gptcli.data.text.records import read_records, where  # noqa: E402
from gptcli.data.tokenized.shards import tokenize_corpus  # noqa: E402
from gptcli.data.tokenizers.tokenizer import load_tokenizer  # noqa: E402
from gptcli.data.training.dataset import TokenDataset  # noqa: E402
from gptcli.errors import GptcliError  # noqa: E402

DOCS = [f"document {i}: héllo wörld 日本語\n" + "line of text\n" * (i % 5) + f"end {i}"
        for i in range(40)]
DOCS[7] = ""  # an empty document is still a document
DOCS[11] = "no newline at all, and a \ufeff in the middle"


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "n": len(d)}, ensure_ascii=False) + "\n" for d in docs).encode()


def write_parquet(path: Path, docs, field="text", row_group_size=7) -> Path:
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path,
                   row_group_size=row_group_size)
    return path


def write_arrow_stream(path: Path, table, rows_per_batch=3) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)


def write_saved_dataset(folder: Path, docs, shards=3, order=None) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC streams named
    data-0000i-of-0000n.arrow, listed in state.json, beside dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    order = order or list(range(shards))
    bounds = np.linspace(0, len(docs), shards + 1).astype(int)
    for position, i in enumerate(order):  # shard i holds the position-th slice of docs
        lo, hi = bounds[position], bounds[position + 1]
        write_arrow_stream(folder / names[i], pa.table({"text": docs[lo:hi], "id": list(range(lo, hi))}))
    state = {"_data_files": [{"filename": names[i]} for i in order], "_fingerprint": "x",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def write_format(root: Path, kind: str, docs=DOCS) -> str:
    """`docs` as one input of the given format; returns the input string."""
    if kind == "jsonl":
        (root / "c.jsonl").write_bytes(jsonl_bytes(docs))
    elif kind == "jsonl.gz":
        (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs)))
    elif kind == "jsonl.zst":
        (root / "c.jsonl.zst").write_bytes(zstd(jsonl_bytes(docs)))
    elif kind == "parquet":
        write_parquet(root / "c.parquet", docs)
    elif kind == "parquet-folder":  # one dataset in several Parquet files, as the Hub ships them
        (root / "pq").mkdir()
        for i in range(0, len(docs), 15):
            write_parquet(root / "pq" / f"train-{i // 15:05d}.parquet", docs[i:i + 15])
        return str(root / "pq")
    elif kind == "saved":
        return str(write_saved_dataset(root / "saved", docs))
    return str(next(root.glob("c.*")))


RECORD_FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "parquet-folder", "saved"]


def documents(pieces) -> list[str]:
    docs, current = [], []
    for piece in pieces:
        current.append(piece.text)
        if piece.document_end:
            docs.append("".join(current))
            current = []
    assert not current
    return docs


def token_documents(out: Path) -> list[tuple[int, ...]]:
    """Every document's token ids, over both splits, in sorted order: equal for equal
    corpora however their files were named or split."""
    eot = load_tokenizer(out / "tokenizer").eot_id
    docs = []
    for split in ("train", "val"):
        ids = np.asarray(TokenDataset.open(out).splits[split]).tolist()
        current = []
        for i in ids:
            if i == eot:
                docs.append(tuple(current))
                current = []
            else:
                current.append(i)
        if current:
            docs.append(tuple(current))
    return sorted(docs)


def all_ids(out: Path) -> dict[str, list[int]]:
    return {s: np.asarray(TokenDataset.open(out).splits[s]).tolist() for s in ("train", "val")}


def key(piece):
    """A piece without its disk progress (which a restart counts from where it starts)."""
    return piece.text, piece.source, piece.offset, piece.nbytes, piece.document_end


@pytest.fixture
def small_batches(monkeypatch):
    """Tiny pieces and batches, so a few documents exercise every boundary."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 48)
    monkeypatch.setattr(formats, "ROWS_PER_BATCH", 4)
    monkeypatch.setattr(formats, "ROWS_PER_CHUNK", 3)
    monkeypatch.setattr(formats, "READ_BYTES", 64)


# ---------------------------------------------------------------------------------------
# Same documents, same pieces, same token ids.


@pytest.mark.parametrize("kind", RECORD_FORMATS)
def test_every_record_format_reads_the_same_documents(tmp_path, kind, small_batches):
    sources = corpus.expand_inputs([write_format(tmp_path, kind)])
    pieces = list(corpus.iter_pieces(sources))
    assert documents(pieces) == DOCS
    assert all(p.document_end for p in pieces)  # one piece per record
    assert sum(p.nbytes for p in pieces) >= sum(len(d.encode()) for d in DOCS)
    assert abs(sum(p.disk_bytes for p in pieces) - sum(s.size for s in sources)) <= 8 * len(sources)


def test_record_formats_tokenize_to_the_same_ids(tmp_path):
    outs = {}
    for kind in RECORD_FORMATS:
        (tmp_path / kind).mkdir()
        outs[kind] = tmp_path / f"out-{kind}"
        tokenize_corpus([write_format(tmp_path / kind, kind)], outs[kind], tokenizer="bytes")
    reference = token_documents(outs["jsonl"])
    assert len(reference) == len(DOCS)
    for kind in RECORD_FORMATS:
        assert token_documents(outs[kind]) == reference, kind


@pytest.mark.parametrize("compress", [gzip.compress, zstd], ids=["gz", "zst"])
def test_compressed_text_file_splits_and_tokenizes_like_the_plain_one(tmp_path, compress):
    """One text file is split by position in its decompressed text, exactly as when plain."""
    text = "".join(DOCS).encode()
    (tmp_path / "plain.txt").write_bytes(text)
    packed = tmp_path / f"packed.txt.{'gz' if compress is gzip.compress else 'zst'}"
    packed.write_bytes(compress(text))
    ids = []
    for path in (tmp_path / "plain.txt", packed):
        [source] = corpus.expand_inputs([str(path)])
        assert source.is_plain_text and not source.is_jsonl
        assert corpus.single_document_split(source, 0.25) == corpus.single_document_split(
            corpus.expand_inputs([str(tmp_path / "plain.txt")])[0], 0.25)
        out = tmp_path / f"out-{path.name}"
        tokenize_corpus([str(path)], out, tokenizer="bytes", val_fraction=0.25)
        ids.append(all_ids(out))
    assert ids[0] == ids[1] and ids[0]["val"]


def test_folders_of_compressed_text_read_like_plain_ones(tmp_path, small_batches):
    for name, write in (("plain", lambda p, b: p.write_bytes(b)),
                        ("gz", lambda p, b: p.with_name(p.name + ".gz").write_bytes(gzip.compress(b))),
                        ("zst", lambda p, b: p.with_name(p.name + ".zst").write_bytes(zstd(b)))):
        (tmp_path / name).mkdir()
        for i, doc in enumerate(DOCS[:12]):
            write(tmp_path / name / f"doc{i:02d}.md", doc.encode())
    plain = list(corpus.iter_pieces(corpus.expand_inputs([str(tmp_path / "plain")])))
    for name in ("gz", "zst"):
        sources = corpus.expand_inputs([str(tmp_path / name)])
        assert [s.name for s in sources] == [f"doc{i:02d}.md.{name}" for i in range(12)]
        pieces = list(corpus.iter_pieces(sources))
        assert [(p.text, p.offset, p.document_end) for p in pieces] == \
               [(p.text, p.offset, p.document_end) for p in plain]


def test_multi_frame_zstd_reads_every_frame(tmp_path):
    data = jsonl_bytes(DOCS)
    half = data.index(b"\n", len(data) // 2) + 1
    (tmp_path / "two.jsonl.zst").write_bytes(zstd(data[:half]) + zstd(data[half:]))
    assert documents(corpus.iter_pieces(corpus.expand_inputs([str(tmp_path / "two.jsonl.zst")]))) == DOCS


def test_text_field_names_the_column_of_every_record_format(tmp_path):
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS[:5], field="body")))
    write_parquet(tmp_path / "b.parquet", DOCS[5:9], field="body")
    sources = corpus.expand_inputs([str(tmp_path / "b.jsonl.gz"), str(tmp_path / "b.parquet")])
    assert documents(corpus.iter_pieces(sources, "body")) == DOCS[:9]


# ---------------------------------------------------------------------------------------
# Finding inputs and naming them.


def test_folder_walk_finds_every_format_and_reads_a_saved_dataset_as_one(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain")
    (root / "b.txt.gz").write_bytes(gzip.compress(b"gz text"))
    (root / "c.jsonl.zst").write_bytes(zstd(jsonl_bytes(["zst record"])))
    write_parquet(root / "sub" / "d.parquet", ["parquet row"])
    (root / "sub" / "cache-123.arrow").write_bytes(b"loose arrow files are not read")
    (root / "sub" / "archive.tar.gz").write_bytes(gzip.compress(b"\0binary"))
    # shard 1 holds the first rows: state.json's order is the dataset's order, not sorted order
    write_saved_dataset(root / "sub" / "hf", ["s0", "s1", "s2", "s3"], shards=2, order=[1, 0])
    sources = corpus.expand_inputs([str(root)])
    assert [s.name for s in sources] == [
        "a.txt", "b.txt.gz", "c.jsonl.zst", "sub/d.parquet",
        "sub/hf/data-00001-of-00002.arrow", "sub/hf/data-00000-of-00002.arrow"]
    assert [s.kind for s in sources] == ["text", "text", "jsonl", "parquet", "arrow", "arrow"]
    assert documents(corpus.iter_pieces(sources)) == [
        "plain", "gz text", "zst record", "parquet row", "s0", "s1", "s2", "s3"]


def test_source_names_are_relative_to_their_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "data" / "deep" / "x.txt").write_text("x")
    (tmp_path / "data" / "y.jsonl").write_bytes(jsonl_bytes(["y"]))
    write_saved_dataset(tmp_path / "data" / "hf", ["z"], shards=1)
    named = lambda *inputs: [s.name for s in corpus.expand_inputs(list(inputs))]  # noqa: E731
    assert named("data/deep/x.txt") == ["x.txt"]
    assert named(str(tmp_path / "data")) == ["y.jsonl", "deep/x.txt", "hf/data-00000-of-00001.arrow"]
    assert named("data/**/*.txt") == ["deep/x.txt"]
    assert named(str(tmp_path / "data" / "*")) == ["deep/x.txt", "hf/data-00000-of-00001.arrow", "y.jsonl"]
    assert named("data/hf") == ["hf/data-00000-of-00001.arrow"]
    assert named("data/**") == ["y.jsonl", "deep/x.txt", "hf/data-00000-of-00001.arrow"]  # not state.json
    assert "json/decoder.py" in named("stdlib")


def test_compressed_parquet_is_refused(tmp_path):
    write_parquet(tmp_path / "t.parquet", ["a"])
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    with pytest.raises(GptcliError, match=r"t\.parquet\.gz: Parquet files compress their own"):
        corpus.expand_inputs([str(tmp_path / "t.parquet.gz")])


# ---------------------------------------------------------------------------------------
# Restart points.


def restart_matches(sources, field="text", split_offset=None):
    pieces = list(corpus.iter_pieces(sources, field, split_offset))
    index = {s.path: i for i, s in enumerate(sources)}
    assert len(pieces) > 3
    for k, piece in enumerate(pieces):
        start = (index[piece.source], piece.offset)
        rest = list(corpus.iter_pieces(sources, field, split_offset, start=start))
        assert [key(p) for p in rest] == [key(p) for p in pieces[k:]], k
    assert list(corpus.iter_pieces(sources, field, split_offset, start=(len(sources), 0))) == []
    return pieces


@pytest.mark.parametrize("kind", RECORD_FORMATS)
def test_every_piece_of_a_record_format_is_a_restart_point(tmp_path, kind, small_batches):
    restart_matches(corpus.expand_inputs([write_format(tmp_path, kind, DOCS[:16])]))


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".txt.zst"])
def test_every_piece_of_a_text_file_is_a_restart_point(tmp_path, suffix, small_batches):
    data = "\ufeff".encode() + "".join(DOCS[:6]).encode() + b"x" * 100
    packed = {".txt": data, ".txt.gz": gzip.compress(data), ".txt.zst": zstd(data)}[suffix]
    (tmp_path / f"one{suffix}").write_bytes(packed)
    (tmp_path / f"two{suffix}").write_bytes(packed)
    [one] = corpus.expand_inputs([str(tmp_path / f"one{suffix}")])
    split = corpus.single_document_split(one, 0.3)
    pieces = restart_matches([one], split_offset=split)
    assert split in [p.offset for p in pieces]  # the val tail starts at a piece
    assert "".join(p.text for p in pieces).encode() == data.removeprefix("\ufeff".encode())
    both = corpus.expand_inputs([str(tmp_path / f"one{suffix}"), str(tmp_path / f"two{suffix}")])
    restart_matches(both)


def test_a_file_ending_exactly_at_a_full_piece_still_ends_its_document(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 16)
    (tmp_path / "a.txt").write_text("0123456789abcde\n")  # exactly 16 bytes
    (tmp_path / "b.txt").write_text("next\n")
    pieces = list(corpus.iter_pieces(corpus.expand_inputs([str(tmp_path)])))
    assert documents(pieces) == ["0123456789abcde\n", "next\n"]


def test_mixed_corpus_restarts_across_files(tmp_path, small_batches):
    inputs = [write_format(tmp_path, kind, DOCS[:6]) for kind in ("jsonl.gz", "parquet")]
    (tmp_path / "t.txt.zst").write_bytes(zstd("".join(DOCS[6:9]).encode()))
    sources = corpus.expand_inputs([*inputs, str(tmp_path / "t.txt.zst")])
    restart_matches(sources)


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written.


def refused(tmp_path, path: Path, pattern: str, field: str = "text") -> None:
    with pytest.raises(GptcliError, match=pattern) as info:
        list(corpus.iter_pieces(corpus.expand_inputs([str(path)]), field))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    out = tmp_path / "out"
    with pytest.raises(GptcliError, match=pattern):
        tokenize_corpus([str(path)], out, tokenizer="bytes", text_field=field)
    assert not out.exists()


def test_parquet_without_the_text_column_lists_its_columns(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", DOCS[:3], field="content")
    refused(tmp_path, path, r"t\.parquet has no column 'text' \(its columns: id, content\)")


def test_parquet_column_that_is_not_text_names_its_type(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    refused(tmp_path, path, r"n\.parquet: column 'text' holds int64, not strings")


def test_null_text_names_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "ROWS_PER_BATCH", 4)
    path = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", "d", "e", None, "g"]}), path, row_group_size=3)
    refused(tmp_path, path, r"null\.parquet: row 6 has no value \(null\) in column 'text'")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_parquet(tmp_path, damage):
    path = write_parquet(tmp_path / "bad.parquet", DOCS, row_group_size=5)
    data = path.read_bytes()
    path.write_bytes(b"PAR1 not really parquet" * 20 if damage == "garbage" else data[: len(data) // 2])
    refused(tmp_path, path, r"bad\.parquet: not a readable Parquet file")


def test_corrupt_saved_dataset_arrow_file(tmp_path):
    folder = write_saved_dataset(tmp_path / "hf", DOCS, shards=2)
    arrow = folder / "data-00001-of-00002.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    refused(tmp_path, folder, r"data-00001-of-00002\.arrow: not a readable Arrow file")


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstd)])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_compressed_file(tmp_path, suffix, compress, damage):
    packed = compress(jsonl_bytes(DOCS * 20))
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    else:
        packed = packed[:12] + b"\xff" * 64 + packed[76:]
    path = tmp_path / f"bad.jsonl{suffix}"
    path.write_bytes(packed)
    label = "gzip" if suffix == ".gz" else "zstd"
    refused(tmp_path, path, rf"bad\.jsonl\{suffix}: corrupt or truncated {label} file")


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstd)])
def test_invalid_utf8_in_compressed_text_names_the_decompressed_offset(tmp_path, suffix, compress):
    path = tmp_path / f"latin1.txt{suffix}"
    path.write_bytes(compress(b"fine text\n" * 10 + "caf\xe9\n".encode("latin-1")))
    refused(tmp_path, path, rf"latin1\.txt\{suffix}: invalid UTF-8 at decompressed byte 103")


def test_missing_extras_name_the_file_and_the_extra(tmp_path, monkeypatch):
    parquet = write_parquet(tmp_path / "t.parquet", ["a"])
    packed = tmp_path / "t.jsonl.zst"
    packed.write_bytes(zstd(jsonl_bytes(["a"])))
    for module in ("pyarrow", "pyarrow.parquet", "zstandard"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    for path, module in ((parquet, "pyarrow"), (packed, "zstandard")):
        message = f"reading {path} needs {module}: pip install 'gptcli[data]'"
        with pytest.raises(GptcliError) as info:
            corpus.expand_inputs([str(path)])
        assert str(info.value) == message
        with pytest.raises(GptcliError) as info:
            read_records(path)
        assert str(info.value) == message
    gz = tmp_path / "t.jsonl.gz"  # gzip is the standard library's: no extra needed
    gz.write_bytes(gzip.compress(jsonl_bytes(["a"])))
    assert documents(corpus.iter_pieces(corpus.expand_inputs([str(gz)]))) == ["a"]


# ---------------------------------------------------------------------------------------
# Labelled records.


def test_records_from_parquet_and_compressed_jsonl(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet", row_group_size=2)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "r.jsonl.zst").write_bytes(zstd(lines))
    (tmp_path / "r.csv.gz").write_bytes(gzip.compress(b"text,label\nt0,0\n"))
    for name in ("r.parquet", "r.jsonl.gz", "r.jsonl.zst"):
        records = read_records(tmp_path / name)
        assert records == rows
        assert [r.line for r in records] == [1, 2, 3, 4, 5]
    third = read_records(tmp_path / "r.parquet")[2]
    assert where(tmp_path / "r.parquet", third) == f"{tmp_path / 'r.parquet'}:row 3"
    assert where("r.jsonl.gz", read_records(tmp_path / "r.jsonl.gz")[2]) == "r.jsonl.gz:3"
    assert read_records(tmp_path / "r.csv.gz") == [{"text": "t0", "label": "0"}]


def test_records_from_damaged_files(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS))[:40])
    with pytest.raises(GptcliError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip file"):
        read_records(tmp_path / "cut.jsonl.gz")
    (tmp_path / "bad.parquet").write_bytes(b"nope" * 10)
    with pytest.raises(GptcliError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet")
    with pytest.raises(GptcliError, match=r"unknown data format"):
        read_records(tmp_path / "x.xlsx")


# ---------------------------------------------------------------------------------------
# The text field's names: data.text_field, the old data.jsonl_field, --text-field.


def test_text_field_and_its_old_name():
    assert config_from_dict({"data": {"text_field": "body"}}).data.text_field == "body"
    old = config_from_dict({"data": {"jsonl_field": "body"}}).data
    assert old.text_field == "body" and old.jsonl_field == "body"
    same = config_from_dict({"data": {"jsonl_field": "body", "text_field": "body"}}).data
    assert same.text_field == "body"
    with pytest.raises(GptcliError, match=r"data\.jsonl_field: the old name of data\.text_field"):
        config_from_dict({"data": {"jsonl_field": "a", "text_field": "b"}})
    with pytest.raises(GptcliError, match=r"data\.text_field: must not be empty"):
        config_from_dict({"data": {"jsonl_field": ""}})
    assert "jsonl_field" not in [f for f in DataConfig.__dataclass_fields__]


def test_cli_text_field_and_its_hidden_alias(tmp_path, capsys):
    from conftest import run_cli

    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(DOCS[:10], field="body"))
    for option in ("--text-field", "--jsonl-field"):
        out = tmp_path / option.strip("-")
        code, _, err = run_cli(["tokenize", str(tmp_path / "b.jsonl"), "--out", str(out),
                                "--tokenizer", "bytes", option, "body"], capsys)
        assert code == 0, err
    assert token_documents(tmp_path / "text-field") == token_documents(tmp_path / "jsonl-field")
    code, _, err = run_cli(["tokenize", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "x"),
                            "--text-field", "a", "--jsonl-field", "b"], capsys)
    assert code == 2 and "old name of --text-field" in err
    code, help_text, _ = run_cli(["tokenize", "--help"], capsys)
    assert "--text-field" in help_text and "--jsonl-field" not in help_text
