"""The file formats large corpora come in: gzip- or zstd-compressed text, Parquet, Arrow.

Compressed files are decompressed as they are read, and Parquet and Arrow files are read a
batch of rows at a time, so memory stays flat however large a file is. pyarrow and
zstandard are optional (`pip install 'gptcli[data]'`) and imported only for a file that
needs one. A file that cannot be decoded (corrupt, truncated, without the text column) is a
one-line GptcliError naming it. A Hugging Face `Dataset.save_to_disk` folder is its
`state.json`, `dataset_info.json` and `data-0000i-of-0000n.arrow` files (Arrow IPC streams).
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from gptcli.errors import GptcliError, shorten

EXTRA = "pip install 'gptcli[data]'"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")  # what save_to_disk writes beside its data
ROWS_PER_BATCH = 1024  # Parquet rows decoded at once
ROWS_PER_CHUNK = 256  # rows turned into Python objects at once (a batch can be large)
READ_BYTES = 1 << 16  # compressed bytes fed to the zstd decoder at once
ARROW_FILE_MAGIC = b"ARROW1"  # the random-access Arrow format starts so; a stream does not


def require(module: str, path: Path | str) -> ModuleType:
    """Import an optional dependency that reading `path` needs, or say how to install it."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)  # first: a missing parent must not hide behind a cached child
        return importlib.import_module(module)
    except ImportError:
        raise GptcliError(f"reading {path} needs {top}: {EXTRA}") from None


def split_suffix(path: Path | str) -> tuple[str, str | None]:
    """(suffix of the content, compression) of a file name: `a.jsonl.zst` -> ('.jsonl', 'zstd')."""
    name = Path(path).name.lower()
    outer = Path(name).suffix
    if outer in COMPRESSIONS:
        return Path(name[: -len(outer)]).suffix, COMPRESSIONS[outer]
    return outer, None


def module_for(kind: str, compression: str | None) -> str | None:
    """The optional module a file of this kind and compression is read with, if any."""
    if kind in TABLE_KINDS.values():
        return "pyarrow"
    return "zstandard" if compression == "zstd" else None


# ---------------------------------------------------------------------------------------
# Compressed streams.


class Content:
    """A file's content as a buffered binary stream, decompressed as it is read.

    Use as a context manager: a decompressor's failure inside the block (corrupt or
    truncated data) becomes a GptcliError naming the file. `disk_position()` is how far
    into the file on disk reading has got, for progress against the file's size.
    """

    def __init__(self, path: Path, compression: str | None):
        self.path, self.compression = path, compression
        self._zstd = require("zstandard", path) if compression == "zstd" else None
        self.raw = open(path, "rb")
        self.stream: BinaryIO = self.raw
        if compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif compression == "zstd":
            self.stream = io.BufferedReader(_ZstdReader(self.raw, self._zstd), READ_BYTES)

    def disk_position(self) -> int:
        return self.raw.tell()

    def __enter__(self) -> Content:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()
        if exc is not None and self.compression and isinstance(exc, self._errors()):
            detail = shorten(" ".join(str(exc).split()) or type(exc).__name__, 120)
            raise GptcliError(f"{self.path}: corrupt or truncated {self.compression} file "
                              f"({detail}); check or re-download it") from None

    def _errors(self) -> tuple[type, ...]:
        errors: tuple[type, ...] = (EOFError, zlib.error, gzip.BadGzipFile)
        return errors + ((self._zstd.ZstdError,) if self._zstd else ())


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file of one or more frames. zstandard's own stream reader
    ends quietly when a file stops inside a frame; this raises EOFError instead, so a
    truncated download is not read as a shorter corpus."""

    def __init__(self, raw: BinaryIO, zstd: ModuleType):
        super().__init__()
        self._raw, self._zstd = raw, zstd
        self._frame = zstd.ZstdDecompressor().decompressobj()
        self._in_frame = False  # bytes of the current frame have been fed
        self._out, self._at = b"", 0  # decompressed bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(READ_BYTES)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _feed(self, data: bytes) -> bytes:
        """Decompress `data`, starting a new frame wherever one ends."""
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = True
            if not self._frame.eof:
                break
            data = self._frame.unused_data
            self._frame = self._zstd.ZstdDecompressor().decompressobj()
            self._in_frame = False
        return b"".join(out)


def read_content(path: Path, compression: str | None) -> bytes:
    """A whole (small) file's content, decompressed."""
    with Content(path, compression) as content:
        return content.stream.read()


# ---------------------------------------------------------------------------------------
# Parquet and Arrow.


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `Dataset.save_to_disk` folder in `state.json` order (its
    `_data_files` list), or None when `folder` is not one."""
    if not all((folder / name).is_file() for name in SAVED_DATASET_FILES):
        return None
    state_path = folder / SAVED_DATASET_FILES[0]
    try:
        entries = json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]
        files = [folder / entry["filename"] for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GptcliError(f"{state_path}: not a Hugging Face dataset state file "
                          f"({shorten(str(exc), 80)})") from None
    for file in files:
        if not file.is_file():
            raise GptcliError(f"{folder}: {state_path.name} lists {file.name}, which is missing")
    return files


def _is_text_type(pa: ModuleType, kind: Any) -> bool:
    """string, large_string, string_view (pyarrow 16+), or a dictionary of one of them."""
    if pa.types.is_dictionary(kind):
        return _is_text_type(pa, kind.value_type)
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)


def check_text_column(pa: ModuleType, schema: Any, field: str, path: Path) -> None:
    """The error for a text column that is missing or does not hold strings."""
    if field not in schema.names:
        raise GptcliError(f"{path} has no column '{field}' (its columns: "
                          f"{shorten(', '.join(schema.names), 200)}); choose one with "
                          f"--text-field or data.text_field")
    kind = schema.field(field).type
    if not _is_text_type(pa, kind):
        raise GptcliError(f"{path}: column '{field}' holds {kind}, not strings; choose a text "
                          f"column with --text-field or data.text_field")


def _parquet_batches(path: Path, columns: list[str] | None,
                     start: int) -> Iterator[tuple[int, Any, int, int]]:
    """(first row, record batch, disk positions before and after it) from the row group
    holding row `start` on; a position is the file's size scaled by the share of rows read."""
    pa, pq = require("pyarrow", path), require("pyarrow.parquet", path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if columns is not None:
            check_text_column(pa, parquet.schema_arrow, columns[0], path)
        meta = parquet.metadata
        group, row = 0, 0
        while group < meta.num_row_groups and row + meta.row_group(group).num_rows <= start:
            row += meta.row_group(group).num_rows
            group += 1
        if group == meta.num_row_groups:
            return
        for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH,
                                           row_groups=range(group, meta.num_row_groups),
                                           columns=columns):
            rows = max(meta.num_rows, 1)
            yield row, batch, size * row // rows, size * (row + len(batch)) // rows
            row += len(batch)


def _arrow_batches(path: Path, columns: list[str] | None,
                   start: int) -> Iterator[tuple[int, Any, int, int]]:
    """(first row, record batch, disk positions before and after it) of an Arrow IPC stream
    (what `datasets` writes) or file, memory-mapped: batches before `start` cost nothing."""
    pa = require("pyarrow", path)
    with open(path, "rb") as f:
        random_access = f.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
    with pa.memory_map(str(path)) as mapped:
        if random_access:
            reader = pa.ipc.open_file(mapped)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(mapped)
            batches = iter(reader)
        if columns is not None:
            check_text_column(pa, reader.schema, columns[0], path)
        row, position = 0, 0
        for batch in batches:
            if row + len(batch) > start:
                yield row, batch.select(columns) if columns else batch, position, mapped.tell()
            row, position = row + len(batch), mapped.tell()


def _share(begin: int, end: int, i: int, n: int) -> int:
    """The disk position `i` rows into `n` rows read between `begin` and `end`."""
    return begin + (end - begin) * i // max(n, 1)


def _rows(path: Path, kind: str, columns: list[str] | None,
          start: int) -> Iterator[tuple[int, Any, int, int]]:
    """(row index, chunk of at most ROWS_PER_CHUNK rows, disk positions before and after it)
    from row `start` on; pyarrow's failures on a corrupt or truncated file become one line."""
    pa = require("pyarrow", path)
    batches = _parquet_batches if kind == "parquet" else _arrow_batches
    try:
        for first, batch, begin, end in batches(path, columns, start):
            for at in range(max(start - first, 0), len(batch), ROWS_PER_CHUNK):
                chunk = batch.slice(at, ROWS_PER_CHUNK)
                yield (first + at, chunk, _share(begin, end, at, len(batch)),
                       _share(begin, end, at + len(chunk), len(batch)))
    except (pa.ArrowException, OSError) as exc:
        detail = shorten(" ".join(str(exc).split()), 160)
        raise GptcliError(f"{path}: not a readable {kind.capitalize()} file, corrupt or "
                          f"truncated ({detail})") from None


def table_texts(path: Path, kind: str, field: str,
                start: int = 0) -> Iterator[tuple[int, str, int]]:
    """(row index, text, bytes of the file on disk it stands for) of every row of a Parquet
    or Arrow file's `field` column from row `start` (0-based) on. A null value is an error
    naming its row (counted from 1, as an editor counts lines)."""
    for first, chunk, begin, end in _rows(path, kind, [field], start):
        texts = _pylist(chunk.column(0), path, first)
        if chunk.column(0).null_count:
            row = first + texts.index(None) + 1
            raise GptcliError(f"{path}: row {row} has no value (null) in column '{field}'")
        n = len(texts)
        for i, text in enumerate(texts):
            yield first + i, text, _share(begin, end, i + 1, n) - _share(begin, end, i, n)


def table_records(path: Path, kind: str = "parquet") -> Iterator[dict]:
    """Every row of a Parquet or Arrow file as a dict of its columns, in file order."""
    for first, chunk, _, _ in _rows(path, kind, None, 0):
        yield from _pylist(chunk, path, first)


def _pylist(values: Any, path: Path, first: int) -> list:
    """Arrow values as Python objects; bytes that are not UTF-8 in a string column (which
    some writers let through) are an error naming the rows."""
    try:
        return values.to_pylist()
    except UnicodeDecodeError:
        raise GptcliError(f"{path}: invalid UTF-8 in a text column near row {first + 1}") from None
