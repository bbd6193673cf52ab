"""Labelled texts as token rows for a classifier: encoded with truncation to the context,
right-padded per batch (causal attention never lets the padding reach the real tokens)."""

from __future__ import annotations

import numpy as np
import torch

from gptcli.data.tokenizer import Tokenizer


def encode_texts(tokenizer: Tokenizer, texts: list[str], block_size: int, keep: str) -> list[np.ndarray]:
    """Token ids of each text, cut to `block_size` keeping its start or its end."""
    encoded = []
    for ids in tokenizer.encode_batch(texts):
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            ids = np.array([tokenizer.eot_id])
        encoded.append(ids[:block_size] if keep == "start" else ids[-block_size:])
    return encoded


def pad_batch(sequences: list[np.ndarray], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch: ids (B, T) and lengths (B,)."""
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    return torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device)
