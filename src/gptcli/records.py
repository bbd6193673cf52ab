"""Reading labelled examples: CSV, TSV or JSONL files into lists of dicts.

Every problem names the file (and line, for JSONL and CSV rows) so the user can fix it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from gptcli.errors import GptcliError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def read_records(path: str | Path) -> list[dict]:
    """All records of a `.csv`, `.tsv` or `.jsonl` file, in order."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise GptcliError(f"{path}: unknown data format (use .csv, .tsv or .jsonl)")
    if not path.is_file():
        raise GptcliError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GptcliError(f"{path}: invalid UTF-8 at byte {exc.start}") from None
    records = _jsonl(path, text) if kind == "jsonl" else _table(path, text, kind)
    if not records:
        raise GptcliError(f"data file {path} has no records")
    return records


def _jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GptcliError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise GptcliError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _table(path: Path, text: str, kind: str) -> list[dict]:
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if kind == "tsv" else ",")
    records = []
    for record in reader:
        if None in record:  # more cells than header names
            raise GptcliError(f"{path}:{reader.line_num}: more values than columns in the header")
        records.append(record)
    return records


def column(records: list[dict], name: str, path: str | Path, option: str) -> list:
    """The values of column `name`; an error naming `option` if a record lacks it."""
    values = []
    for index, record in enumerate(records, start=1):
        if name not in record or record[name] is None:
            raise GptcliError(f"{path}: record {index} has no '{name}' column (set {option}; "
                              f"columns found: {', '.join(map(str, record))})")
        values.append(record[name])
    return values
