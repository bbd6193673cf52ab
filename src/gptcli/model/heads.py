"""Task heads over the GPT trunk.

Sequence classification: a linear head `score` (no bias) on the hidden state of each
sequence's last real token, as in Hugging Face's GPT2ForSequenceClassification, so a
classifier checkpoint keeps GPT-2's names plus `score.weight`. Sequences are right-padded
per batch; with causal attention the padding never reaches the real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptcli.config import ModelConfig
from gptcli.model.gpt import GPT, IGNORE_INDEX


class GPTClassifier(GPT):
    def __init__(self, cfg: ModelConfig, labels: list[str], aux_lm_weight: float = 0.0):
        super().__init__(cfg)
        self.labels = list(labels)
        self.n_classes = len(labels)
        self.aux_lm_weight = aux_lm_weight
        self.score = torch.nn.Linear(cfg.n_embd, self.n_classes, bias=False)
        torch.nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, K) for right-padded `idx` (B, T) with `lengths` (B,); or, with
        `targets` (B,), the summed cross-entropy (plus the weighted auxiliary LM loss)."""
        if lengths is None:
            lengths = torch.full((idx.size(0),), idx.size(1), device=idx.device)
        hidden = self.hidden_states(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        logits = self.score(last)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if self.aux_lm_weight > 0:
            loss = loss + self.aux_lm_weight * self._lm_loss_per_example(hidden, idx, lengths).sum()
        return loss

    def _lm_loss_per_example(self, hidden: torch.Tensor, idx: torch.Tensor,
                             lengths: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over each sequence's real tokens (B,): the auxiliary
        language-modelling objective of the original GPT paper."""
        T = idx.size(1)
        next_ids = idx[:, 1:].masked_fill(torch.arange(1, T, device=idx.device) >= lengths[:, None],
                                          IGNORE_INDEX)  # (B, T-1), padding ignored
        logits = self.logits(hidden[:, :-1]).float()
        per_token = F.cross_entropy(logits.transpose(1, 2), next_ids, ignore_index=IGNORE_INDEX,
                                    reduction="none")  # (B, T-1)
        return per_token.sum(1) / (lengths - 1).clamp(min=1)
