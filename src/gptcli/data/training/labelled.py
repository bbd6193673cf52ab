"""Labelled texts as token rows for a classifier: each text cut to the context or read as
overlapping context-long windows (TextReading), right-padded per batch (causal attention
never lets the padding reach the real tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptcli.config import FinetuneConfig
from gptcli.data.tokenizers.tokenizer import Tokenizer

@dataclass(frozen=True)
class TextReading:
    """How a classifier turns a text longer than its context into rows; stored with its
    checkpoint (the finetune config) so that eval, sample and serve read as training did."""

    long_text: str = "truncate"  # truncate: one row, cut to the context; pool: every window
    keep: str = "end"  # truncate: keep the text's `end` or its `start`
    stride: int = 0  # pool: tokens between window starts (0: half the context)

    @classmethod
    def from_config(cls, f: FinetuneConfig) -> TextReading:
        return cls(f.long_text, "start" if f.truncate == "keep_start" else "end", f.pool_stride)


def encode_texts(tokenizer: Tokenizer, texts: list[str], block_size: int, keep: str) -> list[np.ndarray]:
    """Token ids of each text, cut to `block_size` keeping its start or its end."""
    return [ids[:block_size] if keep == "start" else ids[-block_size:] for ids in encode_whole(tokenizer, texts)]


def encode_whole(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, uncut; an empty text is one end-of-text token (it needs a row)."""
    encoded = []
    for ids in tokenizer.encode_batch(texts):
        encoded.append(np.asarray(ids, dtype=np.int64) if len(ids) else np.array([tokenizer.eot_id]))
    return encoded


def pad_batch(sequences: list[np.ndarray], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch: ids (B, T) and lengths (B,)."""
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    return torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device)


def window_starts(length: int, block_size: int, stride: int) -> list[int]:
    """Where the windows of a `length`-token text start: 0, stride, 2 * stride, ... while a
    window still ends inside the text, then one more ending exactly at its end, so every
    token is in some window (stride <= block_size). A text that fits is one window at 0."""
    if length <= block_size:
        return [0]
    return [*range(0, length - block_size, stride), length - block_size]


def encode_windows(tokenizer: Tokenizer, texts: list[str], block_size: int,
                   reading: TextReading) -> list[list[np.ndarray]]:
    """Each text's model rows: one row cut to the context (truncate), or every window of
    the text (pool), each at most `block_size` tokens."""
    if reading.long_text == "truncate":
        return [[ids] for ids in encode_texts(tokenizer, texts, block_size, reading.keep)]
    stride = reading.stride or max(1, block_size // 2)
    return [[ids[start:start + block_size] for start in window_starts(len(ids), block_size, stride)]
            for ids in encode_whole(tokenizer, texts)]


def pad_windows(texts: list[list[np.ndarray]], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of a batch of texts, right-padded: ids (R, T), lengths (R,) and owners (R,),
    the index in `texts` (0 .. B-1) of the text each row belongs to."""
    idx, lengths = pad_batch([row for rows in texts for row in rows], pad_id, device)
    owners = np.repeat(np.arange(len(texts)), [len(rows) for rows in texts])
    return idx, lengths, torch.from_numpy(owners).to(device)
