"""Where gptcli keeps what it makes on its own (no torch here).

    $GPTCLI_CACHE or ~/.cache/gptcli
      tokens/   corpora pretrain tokenized on the fly, keyed by contents and settings
      hf/       Hugging Face directories imported once where a checkpoint was expected
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where pretrain keeps corpora it tokenized: $GPTCLI_CACHE, else ~/.cache/gptcli."""
    return Path(os.environ.get("GPTCLI_CACHE") or Path.home() / ".cache" / "gptcli") / "tokens"
