"""Finding and reading raw text: files, folders, globs, JSONL, Parquet, Hugging Face datasets
saved to disk, and the built-in `stdlib` corpus.

Text is streamed as `Piece`s of at most a few MB, cut at line boundaries, so memory stays
flat however large a file is; `.gz` and `.zst` files are decompressed as they are read, and
Parquet and Arrow files are read a batch of rows at a time (see formats.py). Invalid UTF-8
or a binary file is an error naming the file and byte offset (a corpus silently full of
U+FFFD is worse than a clear stop).

Every piece starts at a restart point: `iter_pieces(..., start=(i, piece.offset))` yields
exactly what an uninterrupted iteration yields from that piece on, so a long tokenization
can resume.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptcli.data.text import formats
from gptcli.errors import GptcliError

STDLIB = "stdlib"
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
# Suffixes read as plain text when a folder is walked (named files are read whatever their suffix).
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .sh .lua "
    ".html .css .xml .json .yaml .yml .toml .ini .cfg .csv .tsv".split()
)
# Test suites are left out of the built-in corpus: they are mostly fixtures, and a few hold
# deliberately broken encodings.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
PIECE_BYTES = 1 << 22  # 4 MiB: large enough for tiktoken's batch API, small enough to stay flat
SKIP_BYTES = 1 << 20  # read at once when passing over a restart's prefix


@dataclass(frozen=True)
class Source:
    """One file to read. `kind` says how it holds documents: `text` (the whole file is one),
    `jsonl` (one per line), `parquet` or `arrow` (one per row). `name` is its path relative
    to the input it was found from (a folder, a glob's fixed prefix; a named file or a
    `save_to_disk` folder: its parent), which is the same on every machine."""

    path: Path
    size: int  # bytes on disk
    kind: str
    name: str
    compression: str | None = None  # "gzip" or "zstd" (text and JSONL)

    @property
    def is_plain_text(self) -> bool:
        """One stream of text (compressed or not): one document, splittable by position."""
        return self.kind == "text"

    @property
    def is_jsonl(self) -> bool:
        """Documents are records (JSONL lines or table rows): the opposite of is_plain_text.
        The older name, kept for callers written when JSONL was the only such format."""
        return not self.is_plain_text


@dataclass(frozen=True)
class Piece:
    """Part of one document. `document_end` marks its last piece."""

    text: str
    source: Path
    # Where reading can restart: the byte offset of the piece in the (decompressed) content
    # for text and JSONL (a line's start), the row index (from 0) for Parquet and Arrow.
    offset: int
    nbytes: int  # bytes of content this piece consumed (decompressed; a row's UTF-8 text)
    document_end: bool
    disk_bytes: int = 0  # how far reading advanced in the file on disk: progress against Source.size


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running Python's standard-library `.py` files, minus test suites, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib_root()):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def _is_walked(name: str) -> bool:
    """Whether a file found in a folder is read: text suffixes, JSONL (either maybe .gz or
    .zst), Parquet. Loose .arrow files are not: in a `datasets` cache they are duplicates."""
    suffix, compression = formats.split_suffix(name)
    if suffix == PARQUET_SUFFIX:
        return compression is None
    return suffix in TEXT_SUFFIXES or suffix == JSONL_SUFFIX


def _named(path: Path, base: Path) -> tuple[Path, str]:
    return path, Path(os.path.relpath(path, base)).as_posix()


def _folder_files(folder: Path, base: Path) -> list[tuple[Path, str]]:
    """(path, name relative to `base`) of the files to read under `folder`, in sorted order;
    a `save_to_disk` folder gives its Arrow files in its own order and is not walked into."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        saved = formats.saved_dataset_files(here)
        if saved is not None:
            dirnames[:] = []
            found += [_named(path, base) for path in saved]
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [_named(here / name, base) for name in sorted(filenames)
                  if not name.startswith(".") and _is_walked(name)]
    return found


def _is_dataset_metadata(path: Path) -> bool:
    """A `state.json` or `dataset_info.json` of a `save_to_disk` folder (which `dir/**`
    matches too): read with its dataset, never as a text document."""
    return (path.name in formats.SAVED_DATASET_FILES
            and formats.saved_dataset_files(path.parent) is not None)


def _glob_base(pattern: str) -> Path:
    """The folder a glob's matches are named from: its components before the first wildcard."""
    fixed = []
    for part in Path(pattern).parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand_item(item: str) -> list[tuple[Path, str]]:
    """(path, name) of the files one input string stands for."""
    if item == STDLIB:
        return [_named(path, stdlib_root()) for path in stdlib_files()]
    if any(ch in item for ch in "*?["):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise GptcliError(f"input glob '{item}' matches no files")
        base, found = _glob_base(item), []
        for match in map(Path, matches):
            if match.is_dir():
                found += _folder_files(match, base)
            elif not _is_dataset_metadata(match):
                found.append(_named(match, base))
        return found
    path = Path(item)
    if path.is_dir():
        base = path.parent if formats.saved_dataset_files(path) is not None else path
        files = _folder_files(path, base)
        if not files:
            raise GptcliError(
                f"input folder {path} has no text files (looked for {JSONL_SUFFIX}, "
                f"{PARQUET_SUFFIX}, .txt, .md, .py and other text suffixes, also as .gz or "
                f".zst, and Hugging Face datasets saved to disk)"
            )
        return files
    if path.is_file():
        if path.stat().st_size == 0:
            raise GptcliError(f"input file {path} is empty")
        return [(path, path.name)]
    raise GptcliError(f"input {path} does not exist")


def _source(path: Path, size: int, name: str) -> Source:
    suffix, compression = formats.split_suffix(path)
    kind = formats.TABLE_KINDS.get(suffix) or ("jsonl" if suffix == JSONL_SUFFIX else "text")
    if compression and kind in formats.TABLE_KINDS.values():
        raise GptcliError(f"input file {path}: {kind.capitalize()} files compress their own "
                          f"contents; decompress it to {path.stem}")
    return Source(path, size, kind, name, compression)


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Turn input strings into the ordered list of files to read, checking each exists and
    that the optional modules the files need are installed (before any work starts)."""
    if not inputs:
        raise GptcliError("no inputs given: name text files, folders, globs or `stdlib`")
    sources, seen = [], set()
    for item in inputs:
        for path, name in _expand_item(item):
            if path in seen:  # first mention wins, order kept
                continue
            seen.add(path)
            if not os.access(path, os.R_OK):
                raise GptcliError(f"input file {path} is not readable (check its permissions)")
            size = path.stat().st_size
            if size:
                sources.append(_source(path, size, name))
    if not sources:
        raise GptcliError("the inputs hold no text: every file is empty")
    for source in sources:
        module = formats.module_for(source.kind, source.compression)
        if module is not None:
            formats.require(module, source.path)
    return sources


def _decode(data: bytes, source: Source, offset: int) -> str:
    where = "" if source.compression is None else "decompressed "  # offsets count content bytes
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GptcliError(
            f"{source.path} looks like a binary file (NUL byte at {where}offset {offset + nul}); "
            f"pass text files only"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptcliError(
            f"{source.path}: invalid UTF-8 at {where}byte {offset + exc.start}; convert the file "
            f"to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out"
        ) from None


def _line_cut(buffer: bytes) -> int:
    """Where to cut a full buffer: after its last newline, else at a UTF-8 character boundary."""
    newline = buffer.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    cut = len(buffer)
    while cut > 0 and (buffer[cut - 1] & 0xC0) == 0x80:  # step back over continuation bytes
        cut -= 1
    if cut > 0 and buffer[cut - 1] >= 0xC0:  # and over the lead byte of the split character
        cut -= 1
    return cut or len(buffer)


def _skip(content: formats.Content, n: int, count_lines: bool = False) -> int:
    """Pass over the first `n` bytes of a file's content (seeking in an uncompressed one);
    returns the newlines passed over when `count_lines` (JSONL errors name lines)."""
    if not count_lines and content.compression is None:
        content.stream.seek(n)
        return 0
    lines = 0
    while n > 0:
        chunk = content.stream.read(min(n, SKIP_BYTES))
        if not chunk:
            break
        lines += chunk.count(b"\n")
        n -= len(chunk)
    return lines


class _DiskMeter:
    """Turns a reader's position in the file on disk into increments per piece."""

    def __init__(self, position: int):
        self.position = position

    def step(self, position: int) -> int:
        advanced, self.position = max(position - self.position, 0), max(position, self.position)
        return advanced


def _text_pieces(source: Source, split_offset: int | None, start: int = 0) -> Iterator[Piece]:
    """Pieces of one text file; a piece never straddles `split_offset`. Each buffer is read
    from a piece's own start (the bytes held back are re-read as part of the next), so the
    pieces from any piece start on depend only on that offset: a restart is a skip."""
    offset = start  # content offset of the first byte not yet yielded
    carry = b""  # bytes read but held back until the next line boundary
    eof = False
    with formats.Content(source.path, source.compression) as content:
        f = content.stream
        _skip(content, start)
        meter = _DiskMeter(content.disk_position())
        while True:
            limit = PIECE_BYTES
            if split_offset is not None and offset < split_offset:
                limit = min(limit, split_offset - offset)
            need = limit - len(carry)
            chunk = f.read(need) if need > 0 and not eof else b""
            eof = eof or (need > 0 and len(chunk) < need)
            buffer = carry + chunk
            if not buffer:  # the last piece filled its buffer exactly: end the document here
                if offset > 0:
                    yield Piece("", source.path, offset, 0, True, meter.step(content.disk_position()))
                return
            at_split = split_offset is not None and offset + len(buffer) == split_offset
            cut = len(buffer) if (eof or at_split) else _line_cut(buffer)
            piece, carry = buffer[:cut], buffer[cut:]
            text = _decode(piece, source, offset)
            if offset == 0:
                text = text.removeprefix("\ufeff")
            done = eof and not carry
            yield Piece(text, source.path, offset, cut, done, meter.step(content.disk_position()))
            offset += cut
            if done:
                return


def _jsonl_pieces(source: Source, field: str, start: int = 0) -> Iterator[Piece]:
    """One piece per non-blank line, from the line starting at byte `start` on."""
    offset = start
    with formats.Content(source.path, source.compression) as content:
        first_line = _skip(content, start, count_lines=True) + 1
        meter = _DiskMeter(content.disk_position())
        for number, line in enumerate(content.stream, start=first_line):
            begin, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, source, begin))
            except json.JSONDecodeError as exc:
                raise GptcliError(f"{source.path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise GptcliError(
                    f"{source.path}:{number}: no '{field}' field (set the text field with "
                    f"--text-field or data.text_field)"
                )
            text = record[field]
            if not isinstance(text, str):
                raise GptcliError(f"{source.path}:{number}: '{field}' is not a string")
            yield Piece(text, source.path, begin, len(line), True, meter.step(content.disk_position()))


def _table_pieces(source: Source, field: str, start: int = 0) -> Iterator[Piece]:
    """One piece per row of a Parquet or Arrow file, from row `start` on."""
    for row, text, disk_bytes in formats.table_texts(source.path, source.kind, field, start):
        yield Piece(text, source.path, row, len(text.encode("utf-8")), True, disk_bytes)


def iter_pieces(sources: list[Source], text_field: str = "text", split_offset: int | None = None,
                start: tuple[int, int] | None = None) -> Iterator[Piece]:
    """Stream every document of every source as pieces, in order.

    `text_field` names the text of JSONL, Parquet and Arrow records. `split_offset` (for a
    corpus that is one text file) forces a piece boundary at that byte, so the tail can go
    to validation. `start` = (index into `sources`, a `Piece.offset` of that source) resumes
    at that piece: given the same other arguments, it yields exactly what the uninterrupted
    iteration yields from that piece on.
    """
    first, offset = start if start is not None else (0, 0)
    if not 0 <= first <= len(sources) or offset < 0:
        raise ValueError(f"start {start} is outside a corpus of {len(sources)} files")
    for index in range(first, len(sources)):
        source, at = sources[index], offset if index == first else 0
        if source.kind == "text":
            yield from _text_pieces(source, split_offset, at)
        elif source.kind == "jsonl":
            yield from _jsonl_pieces(source, text_field, at)
        else:
            yield from _table_pieces(source, text_field, at)


def _content_size(source: Source) -> int:
    """Bytes of a file's content: its size, or for a compressed file, read through once."""
    if source.compression is None:
        return source.size
    total = 0
    with formats.Content(source.path, source.compression) as content:
        while chunk := content.stream.read(SKIP_BYTES):
            total += len(chunk)
    return total


def _check_text(source: Source) -> None:
    """Read a text file through: its encoding or binary error, if it has one, is raised."""
    for _ in _text_pieces(source, None):
        pass


def single_document_split(source: Source, val_fraction: float) -> int:
    """Content offset starting the validation tail of a one-file corpus: the first line start
    at or after (1 - val_fraction) of the (decompressed) text."""
    size = _content_size(source)
    target = int(size * (1 - val_fraction))
    with formats.Content(source.path, source.compression) as content:
        _skip(content, target)
        rest = content.stream.read(1 << 16)
    newline = rest.find(b"\n")
    cut = target + newline + 1 if newline >= 0 else target
    if not 0 < cut < size:
        # What is wrong with the content is said first, whatever the size: a file that is no
        # text at all should not be refused only as small (and then, once larger, as binary).
        _check_text(source)
        raise GptcliError(
            f"{source.path} is too small to split into train and validation parts"
        )
    return cut
