"""The GPT: GPT-2's architecture and parameter names, smallest pieces first.

Names match GPT-2 (`wte, wpe, h.N.ln_1, h.N.attn.c_attn, ..., ln_f, lm_head`) so that
importing OpenAI's weights is a key match plus a transpose of Conv1D matrices.
Pre-LayerNorm blocks, tanh-approximated GELU (as GPT-2), tied input/output embeddings,
attention through `scaled_dot_product_attention` (flash kernels on GPU; see attention.py
for the one measured exception). For generation the caller passes in a KV cache
(kv_cache.py) and the tokens' positions; the model itself keeps no inference state.

Shapes in comments: B batch, T time (tokens), C n_embd, nh heads, hs head size, L the
KV cache length, V the vocabulary (padded to a multiple of 64 inside lm_head).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptcli.config import ModelConfig
from gptcli.errors import shorten
from gptcli.model.attention import causal_attention
from gptcli.model.kv_cache import KVCache
from gptcli.runtime import check_memory

IGNORE_INDEX = -1  # target id that contributes no loss (padding, prompt tokens)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v together
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without `cache`: causal attention within x. With it: write this layer's keys and
        values at `input_pos` (T,) and attend over all L slots, `mask` (T, L) hiding the
        ones each token may not see."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v = cache.update(layer, input_pos, k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    arch = "gpt2"  # its name in model/__init__.py's ARCHS, recorded in checkpoints

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = cfg
        self.lora_spec = None  # set by lora.apply_lora
        self.activation_checkpointing = False  # set by the training loop (train config)
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), as each block adds two.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    def num_params(self, include_positions: bool = True) -> int:
        """Parameters counted once (the tied lm_head is wte)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_positions else n - self.wpe.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention's
        12 * layers * context * width (the PaLM appendix estimate, as nanoGPT uses)."""
        c = self.config
        return 6 * self.num_params(include_positions=False) + 12 * c.n_layer * c.block_size * c.n_embd

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for token ids (B, T).

        Without `cache`: a full causal pass over positions 0..T-1 (training).
        With `cache` (generation): the tokens sit at positions `input_pos` (T,), are written
        into the cache there, and each attends to every cached position up to its own.
        """
        if cache is None:
            input_pos, mask = torch.arange(idx.size(1), device=idx.device), None
        else:
            mask = cache.visible(input_pos)  # (T, L), shared by every layer
        x = self.drop(self.wte(idx) + self.wpe(input_pos))  # (B, T, C)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.h):
            if recompute:  # keep only the block's input; rerun it (same dropout) in backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, layer, input_pos, mask)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab_size) from hidden states (..., C)."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for `idx` (B, T); or, given `targets` (B, T), the summed
        cross-entropy over targets that are not IGNORE_INDEX (divide by their count).

        The padded vocabulary rows speed up the matrix product but are sliced off (in
        `logits`) before any softmax: they are not tokens and must take no probability."""
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    @torch.no_grad()
    def crop_context(self, block_size: int) -> None:
        """Shorten the context to `block_size` positions, keeping the first ones' embeddings
        (finetuning on shorter sequences than pretraining)."""
        self.config = dataclasses.replace(self.config, block_size=block_size)
        self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].clone())
        self.wpe.num_embeddings = block_size

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the vocabulary to `vocab_size` ids (e.g. for added special tokens). New rows
        start at the mean embedding, so new tokens begin as an average known token."""
        old = self.config.vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)
        rows = self.config.padded_vocab_size
        if rows > self.wte.num_embeddings:
            grown = nn.Embedding(rows, self.config.n_embd, device=self.wte.weight.device,
                                 dtype=self.wte.weight.dtype)
            grown.weight[: self.wte.num_embeddings] = self.wte.weight
            self.wte = grown
            self.lm_head = nn.Linear(self.config.n_embd, rows, bias=False,
                                     device=grown.weight.device, dtype=grown.weight.dtype)
            self.lm_head.weight = self.wte.weight
        self.wte.weight[old:vocab_size] = self.wte.weight[:old].mean(dim=0)

    def new_kv_cache(self, batch_size: int, length: int) -> KVCache:
        """An empty KV cache of `length` positions (at most block_size) for `batch_size`
        sequences, in the weights' dtype and device; the caller keeps it, not the model."""
        return KVCache.empty(self.config.n_layer, batch_size, self.config.n_head,
                             min(length, self.config.block_size), self.config.head_dim,
                             self.wte.weight.dtype, self.wte.weight.device)


def count_params(cfg: ModelConfig) -> int:
    """The parameters `GPT(cfg).num_params()` counts, from the config alone: exact, and
    instant for any size, so a model too large to build is refused before it is built."""
    C, bias = cfg.n_embd, int(cfg.bias)

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + bias * n_out

    norm = C + bias * C  # LayerNorm gain (and shift)
    block = 2 * norm + linear(C, 3 * C) + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C)
    rows = -(-cfg.vocab_size // 64) * 64  # padded_vocab_size in whole numbers: exact at any size
    return rows * C + cfg.block_size * C + cfg.n_layer * block + norm  # wte, wpe, h, ln_f; lm_head is wte


def check_fits(cfg: ModelConfig, device: torch.device, training: bool, fix: str,
               shards: int = 1) -> None:
    """Refuse (with the numbers) a model whose parameters alone overflow `device`'s memory;
    called before `GPT(cfg)` so an absurd config never starts allocating."""
    shape = ", ".join(f"{name}={shorten(str(getattr(cfg, name)), 20)}"
                      for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"))
    check_memory(count_params(cfg), device, training, f"model ({shape})", fix, shards)
