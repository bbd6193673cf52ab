"""Finding and reading raw text: files, folders, globs, JSONL and the built-in `stdlib` corpus.

Text is streamed as `Piece`s of at most a few MB, cut at line boundaries, so memory stays
flat however large a file is. Invalid UTF-8 or a binary file is an error naming the file
and byte offset (a corpus silently full of U+FFFD is worse than a clear stop).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptcli.errors import GptcliError

STDLIB = "stdlib"
JSONL_SUFFIX = ".jsonl"
# Suffixes read as plain text when a folder is walked (named files are read whatever their suffix).
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .rb .sh .lua "
    ".html .css .xml .json .yaml .yml .toml .ini .cfg .csv .tsv".split()
)
# Test suites are left out of the built-in corpus: they are mostly fixtures, and a few hold
# deliberately broken encodings.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
PIECE_BYTES = 1 << 22  # 4 MiB: large enough for tiktoken's batch API, small enough to stay flat


@dataclass(frozen=True)
class Source:
    path: Path
    size: int  # bytes on disk
    is_jsonl: bool


@dataclass(frozen=True)
class Piece:
    """Part of one document. `document_end` marks its last piece."""

    text: str
    source: Path
    offset: int  # byte offset of the piece in its file
    nbytes: int  # bytes of the file this piece consumed (for progress and counts)
    document_end: bool


def stdlib_files() -> list[Path]:
    """The running Python's standard-library `.py` files, minus test suites, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def _folder_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if not name.startswith(".") and (suffix in TEXT_SUFFIXES or suffix == JSONL_SUFFIX):
                found.append(Path(dirpath) / name)
    return found


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Turn input strings into the ordered list of files to read, checking each exists."""
    if not inputs:
        raise GptcliError("no inputs given: name text files, folders, globs or `stdlib`")
    paths: list[Path] = []
    for item in inputs:
        if item == STDLIB:
            paths += stdlib_files()
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise GptcliError(f"input glob '{item}' matches no files")
            for match in map(Path, matches):
                paths += _folder_files(match) if match.is_dir() else [match]
        else:
            path = Path(item)
            if path.is_dir():
                files = _folder_files(path)
                if not files:
                    raise GptcliError(
                        f"input folder {path} has no text files (looked for "
                        f"{JSONL_SUFFIX}, .txt, .md, .py and other text suffixes)"
                    )
                paths += files
            elif path.is_file():
                if path.stat().st_size == 0:
                    raise GptcliError(f"input file {path} is empty")
                paths.append(path)
            else:
                raise GptcliError(f"input {path} does not exist")
    sources = []
    for path in dict.fromkeys(paths):  # first mention wins, order kept
        if not os.access(path, os.R_OK):
            raise GptcliError(f"input file {path} is not readable (check its permissions)")
        size = path.stat().st_size
        if size:
            sources.append(Source(path, size, path.suffix.lower() == JSONL_SUFFIX))
    if not sources:
        raise GptcliError("the inputs hold no text: every file is empty")
    return sources


def _decode(data: bytes, path: Path, offset: int) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GptcliError(
            f"{path} looks like a binary file (NUL byte at offset {offset + nul}); "
            f"pass text files only"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptcliError(
            f"{path}: invalid UTF-8 at byte {offset + exc.start}; convert the file to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8) or leave it out"
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


def _text_pieces(source: Source, split_offset: int | None) -> Iterator[Piece]:
    """Pieces of one text file; a piece never straddles `split_offset`."""
    offset = 0  # file offset of the first byte not yet yielded
    carry = b""  # bytes read but held back until the next line boundary
    eof = False
    with open(source.path, "rb") as f:
        while True:
            limit = PIECE_BYTES
            if split_offset is not None and offset < split_offset:
                limit = min(limit, split_offset - offset)
            need = limit - len(carry)
            chunk = f.read(need) if need > 0 and not eof else b""
            eof = eof or (need > 0 and len(chunk) < need)
            buffer = carry + chunk
            if not buffer:
                return
            at_split = split_offset is not None and offset + len(buffer) == split_offset
            cut = len(buffer) if (eof or at_split) else _line_cut(buffer)
            piece, carry = buffer[:cut], buffer[cut:]
            text = _decode(piece, source.path, offset)
            if offset == 0:
                text = text.removeprefix("\ufeff")
            done = eof and not carry
            yield Piece(text, source.path, offset, cut, document_end=done)
            offset += cut
            if done:
                return


def _jsonl_pieces(source: Source, field: str) -> Iterator[Piece]:
    offset = 0
    with open(source.path, "rb") as f:
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, source.path, start))
            except json.JSONDecodeError as exc:
                raise GptcliError(f"{source.path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise GptcliError(
                    f"{source.path}:{number}: no '{field}' field (set the JSONL text field "
                    f"with --jsonl-field or data.jsonl_field)"
                )
            text = record[field]
            if not isinstance(text, str):
                raise GptcliError(f"{source.path}:{number}: '{field}' is not a string")
            yield Piece(text, source.path, start, len(line), document_end=True)


def iter_pieces(sources: list[Source], jsonl_field: str = "text",
                split_offset: int | None = None) -> Iterator[Piece]:
    """Stream every document of every source as pieces, in order.

    `split_offset` (for a corpus that is one text file) forces a piece boundary at that
    byte, so the tail can go to validation.
    """
    for source in sources:
        if source.is_jsonl:
            yield from _jsonl_pieces(source, jsonl_field)
        else:
            yield from _text_pieces(source, split_offset)


def single_document_split(source: Source, val_fraction: float) -> int:
    """Byte offset starting the validation tail of a one-file corpus: the first line start
    at or after (1 - val_fraction) of the file."""
    target = int(source.size * (1 - val_fraction))
    with open(source.path, "rb") as f:
        f.seek(target)
        rest = f.read(1 << 16)
    newline = rest.find(b"\n")
    cut = target + newline + 1 if newline >= 0 else target
    if not 0 < cut < source.size:
        raise GptcliError(
            f"{source.path} is too small to split into train and validation parts"
        )
    return cut
