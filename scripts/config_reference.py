"""Rewrite the README's config reference tables from the config dataclasses' field docs.

    python scripts/config_reference.py

The tables sit between `<!-- config-reference -->` / `<!-- finetune-reference -->` and the
next heading; tests check that every key is documented.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptcli.config import FinetuneRunConfig, RunConfig, field_docs

README = Path(__file__).resolve().parents[1] / "README.md"


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {help_text} |" for key, default, help_text in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = README.read_text()
    run = field_docs(RunConfig)
    finetune = [row for row in field_docs(FinetuneRunConfig)
                if row[0].startswith(("finetune.", "model."))]
    for marker, rows in (("config-reference", run), ("finetune-reference", finetune)):
        pattern = re.compile(rf"(<!-- {marker} -->\n)(.*?)(?=\n#)", re.S)
        text = pattern.sub(lambda m: m.group(1) + table(rows), text, count=1)
    README.write_text(text)


if __name__ == "__main__":
    main()
