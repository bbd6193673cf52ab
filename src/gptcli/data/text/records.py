"""Reading labelled examples: CSV, TSV, JSONL or Parquet files into lists of records.

Data is read exactly: a quoted CSV field keeps its line breaks as written (LF or CRLF),
only a line break ends a row or a JSONL line (never a form feed or U+2028), an unclosed
quote is an error rather than a field swallowing the rest of the file, and a UTF-8
byte-order mark at the start is dropped. Every record remembers the line of its file where
it starts, so each problem names `file:line` as an editor shows it, whatever order the
records are used in later. Text formats may be gzip- or zstd-compressed (`train.jsonl.gz`);
a Parquet file's records are its rows, numbered from 1 where text files number lines.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from itertools import zip_longest
from pathlib import Path

from gptcli.data.text import formats
from gptcli.errors import GptcliError, shorten

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BOM = "\ufeff"
JSON_BLANKS = " \t\r"  # JSON's whitespace within one line (str.strip would also eat U+2028)


class Record(dict):
    """The fields of one record, plus `line`: the line of its source where it starts (1-based),
    or for a Parquet file its row (1-based, `unit` "row")."""

    def __init__(self, fields: Mapping | Iterable[tuple], line: int, unit: str = "line"):
        super().__init__(fields)
        self.line = line
        self.unit = unit


def numbered(rows: list[dict]) -> list[Record]:
    """Records of data that has no file (the built-in examples), numbered in list order."""
    return [Record(row, line) for line, row in enumerate(rows, start=1)]


def where(path: str | Path, record: Record) -> str:
    """`path:line` (or `path:row N`) of a record, for messages about it."""
    return f"{path}:{record.line}" if record.unit == "line" else f"{path}:{record.unit} {record.line}"


def read_records(path: str | Path) -> list[Record]:
    """All records of a `.csv`, `.tsv`, `.jsonl` (any of them maybe `.gz` or `.zst`) or
    `.parquet` file, in file order."""
    path = Path(path)
    suffix, compression = formats.split_suffix(path)
    kind = FORMATS.get(suffix)
    if kind is None or (kind == "parquet" and compression):
        raise GptcliError(f"{path}: unknown data format (use .csv, .tsv, .jsonl, each maybe "
                          f"compressed as .gz or .zst, or .parquet)")
    if not path.is_file():
        raise GptcliError(f"data file {path} does not exist")
    if kind == "parquet":
        records = [Record(row, number, "row") for number, row in
                   enumerate(formats.table_records(path), start=1)]
    else:
        text = _text(path, compression)
        records = _jsonl(path, text) if kind == "jsonl" else _table(path, text, kind)
    if not records:
        raise GptcliError(f"data file {path} has no records")
    return records


def _text(path: Path, compression: str | None) -> str:
    """A text file's content (decompressed), less a byte-order mark."""
    raw = formats.read_content(path, compression) if compression else path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        where = "byte" if compression is None else "decompressed byte"
        raise GptcliError(f"{path}:{line}: invalid UTF-8 at {where} {exc.start}") from None


def _jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(JSON_BLANKS):
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GptcliError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise GptcliError(f"{path}:{number}: expected a JSON object, got {type(fields).__name__}")
        records.append(Record(fields, number))
    return records


def _table(path: Path, text: str, kind: str) -> list[Record]:
    """The rows after the header as records; a short row's missing cells are None."""
    rows = _rows_with_lines(path, text, kind)
    _, header = next(rows, (0, None))
    records = []
    for line, row in rows:
        if len(row) > len(header):
            raise GptcliError(f"{path}:{line}: more values than columns in the header")
        records.append(Record(zip_longest(header, row), line))
    return records


def _rows_with_lines(path: Path, text: str, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line where it starts, cells) of every row that is not a blank line. newline=""
    hands line endings to the csv module, which keeps those inside quotes; strict mode
    refuses an unclosed quote instead of reading the rest of the file into one field."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",",
                        strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise GptcliError(f"{path}:{start}: invalid {kind.upper()} ({exc})") from None
        if row:
            yield start, row
        start = reader.line_num + 1


def column(records: list[Record], name: str, path: str | Path, option: str) -> list:
    """The values of column `name`; an error naming `option` if a record lacks it."""
    values = []
    for record in records:
        if name not in record or record[name] is None:
            raise GptcliError(f"{where(path, record)}: record has no '{name}' column (set {option}; "
                              f"columns found: {shorten(', '.join(map(str, record)), 200)})")
        values.append(record[name])
    return values
