"""Prompts with answers as training rows: the answer's tokens are the only targets."""

from __future__ import annotations

import numpy as np
import torch

from gptcli.model.gpt import IGNORE_INDEX


def answer_rows(sequences: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, labels), each (N, T) for N (prompt ids, answer ids): every prompt followed by
    its answer, right-padded with `pad_id` to the longest; labels are the next token where
    it belongs to the answer, else IGNORE_INDEX."""
    width = max(len(prompt) + len(answer) - 1 for prompt, answer in sequences)
    idx = np.full((len(sequences), width), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, answer) in enumerate(sequences):
        whole = prompt + answer
        idx[row, :len(whole) - 1] = whole[:-1]
        labels[row, len(prompt) - 1:len(whole) - 1] = answer  # position t predicts token t + 1
    return torch.from_numpy(idx).to(device), torch.from_numpy(labels).to(device)
