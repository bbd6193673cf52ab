"""The GPT: one decoder-only transformer, its components chosen once from the config.

Every family builds this one class (`model.arch`; each family's component defaults are in
gptcli/families/):
- `gpt2`: GPT-2 exactly. Learned positions, pre-LayerNorm blocks, tanh-approximated GELU,
  biases, tied input/output embeddings.
- `llama`: the Llama/Qwen family. Rotary positions (rope.py), RMSNorm, a SwiGLU MLP, no
  biases, untied embeddings; optionally grouped-query attention (n_kv_head < n_head),
  RMSNorm on queries and keys (qk_norm), ReLU² MLP, a logit soft-cap.
Each component is a small module picked in `__init__`; `forward` has no per-arch branches.

Parameter names are GPT-2's (`wte, wpe, h.N.ln_1, h.N.attn.c_attn, ..., ln_f, lm_head`)
in both recipes, so importing OpenAI's weights is a key match plus a transpose of Conv1D
matrices, and one set of names serves LoRA targets, freezing and FSDP. Fused layouts:
`attn.c_attn` holds the query, key and value projections stacked (nh, nkv, nkv heads of
hs rows); a SwiGLU `mlp.c_fc` holds the gate then the up projection.

For generation the caller passes in a KV cache (kv_cache.py) and the tokens' positions;
the model itself keeps no inference state.

Shapes in comments: B batch, T time (tokens), C n_embd, nh query heads, nkv key/value
heads, hs head size, H MLP hidden width, L the KV cache length, V the vocabulary (padded
to a multiple of 64 inside lm_head).
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
from gptcli.model.rope import RotaryEmbedding, apply_rotary
from gptcli.runtime import check_memory

IGNORE_INDEX = -1  # target id that contributes no loss (padding, prompt tokens)
LOSS_CHUNK_LOGITS = 2**26  # logits per chunk of the loss (chunked_cross_entropy); see loss_chunk_rows


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its gain cast to the input's dtype: under bf16 autocast queries and
    keys are bf16 while the gain stays fp32, and mixed dtypes miss the fused kernel
    (measured at nanoGPT's CPU shape: a bf16 training step with qk_norm 10% slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    """LayerNorm (with a shift when the model has biases) or RMSNorm (a gain only)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(width, eps=cfg.norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        q_width, kv_width = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.split = (q_width, kv_width, kv_width)
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.split), bias=cfg.bias or cfg.attn_bias)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.c_proj = nn.Linear(q_width, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without `cache`: causal attention within x. With it: write this layer's keys and
        values at `input_pos` ((T,), or (B, T) per row) and attend over all L slots, `mask`
        ((T, L) or (B, 1, T, L)) hiding the ones each token may not see. `rotary`: the (cos, sin) tables of x's positions."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        # (B, T, heads * hs) -> (B, heads, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # per head, before the rotation (as Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)  # (B, nkv, L, hs): the cache keeps nkv heads
        if self.n_kv_head != self.n_head:  # each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if cache is None:
            y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h, approximate="tanh"),  # GPT-2's
    "relu2": lambda h: F.relu(h).square(),  # Primer (So et al. 2021); nanochat, modded-nanogpt
}


class MLP(nn.Module):
    """Up-projection, activation, down-projection: GELU (GPT-2) or ReLU²."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.activation = ACTIVATIONS[cfg.mlp]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class SwiGLU(nn.Module):
    """A gated MLP (Shazeer 2020): silu(gate) * up, then down. `c_fc` computes gate and
    up in one product, (B, T, C) -> (B, T, 2H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache, layer, input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        cfg = cfg.resolved()
        self.config = cfg
        self.arch = cfg.arch  # its family's name (gptcli/families/), recorded in checkpoints
        self.lora_spec = None  # set by lora.apply_lora
        self.activation_checkpointing = False  # set by the training loop (train config)
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        # Positions: learned vectors added to the input, or a rotation of queries and keys.
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.position == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation: every matrix N(0, 0.02), biases zero, norms one; the
        residual projections scaled by 1/sqrt(2 * n_layer), as each block adds two. With
        `zero_init` those projections (and an untied head) start at zero instead, so each
        block starts as the identity and the first steps see a shallow model."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, weight in self.named_parameters():
            if name.endswith("c_proj.weight"):  # attn.c_proj and mlp.c_proj of every block
                if cfg.zero_init:
                    nn.init.zeros_(weight)
                else:
                    nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    def num_params(self, include_positions: bool = True) -> int:
        """Parameters counted once (a tied lm_head is wte)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_positions or self.wpe is None else n - self.wpe.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight used in a matrix product (forward + backward;
        not the position table, nor an untied input embedding: lookups) plus attention's
        12 * layers * context * (heads * head size) (the PaLM appendix estimate, as nanoGPT uses)."""
        c = self.config
        weights = self.num_params(include_positions=False)
        if not c.tie_embeddings:
            weights -= self.wte.weight.numel()
        return 6 * weights + 12 * c.n_layer * c.block_size * c.n_head * c.head_dim

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for token ids (B, T).

        Without `cache`: a full causal pass over positions 0..T-1 (training).
        With `cache` (generation): the tokens sit at positions `input_pos`, (T,) shared by
        the batch or (B, T) one row each, are written into the cache there, and each attends
        to every cached position of its row up to its own.
        """
        if cache is None:
            input_pos, mask = torch.arange(idx.size(1), device=idx.device), None
        else:
            mask = cache.visible(input_pos)  # (T, L), shared by every layer
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(input_pos)
        rotary = self.rotary(input_pos, _compute_dtype(x)) if self.rotary is not None else None  # for every layer
        x = self.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.h):
            if recompute:  # keep only the block's input; rerun it (same dropout) in backward
                x = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary, cache, layer, input_pos, mask)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab_size) from hidden states (..., C)."""
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for `idx` (B, T); or, given `targets` (B, T), the summed
        cross-entropy over targets that are not IGNORE_INDEX (divide by their count).

        The padded vocabulary rows speed up the matrix product but are sliced off (in
        `logits`) before any softmax: they are not tokens and must take no probability.
        The loss never holds the whole batch's logits (`loss`)."""
        hidden = self.hidden_states(idx)
        return self.logits(hidden) if targets is None else self.loss(hidden, targets)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The summed fp32 cross-entropy of the logits of `hidden` (..., C) against `targets`
        (...), IGNORE_INDEX ones left out, each times its `weights` (...) if given; computed
        in chunks of rows, never all the logits at once (chunked_cross_entropy)."""
        return chunked_cross_entropy(self.logits, self.lm_head.parameters(),
                                     hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1),
                                     loss_chunk_rows(self.config.vocab_size),
                                     None if weights is None else weights.reshape(-1))

    @torch.no_grad()
    def crop_context(self, block_size: int) -> None:
        """Shorten the context to `block_size` positions, keeping the first ones' embeddings
        (finetuning on shorter sequences than pretraining)."""
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if self.wpe is not None:
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].clone())
            self.wpe.num_embeddings = block_size

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the vocabulary to `vocab_size` ids (e.g. for added special tokens). New rows
        start at the mean of the known ones (in wte, and in an untied lm_head), so a new token
        begins as an average known token."""
        old = self.config.vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)
        rows = self.config.padded_vocab_size
        if rows > self.wte.num_embeddings:
            self.wte = _grown(self.wte, rows)
            head = nn.Linear(self.config.n_embd, rows, bias=False, device=self.wte.weight.device,
                             dtype=self.wte.weight.dtype)
            if self.config.tie_embeddings:
                head.weight = self.wte.weight
            else:
                head.weight[: self.lm_head.out_features] = self.lm_head.weight
            self.lm_head = head
        for weight in {id(w): w for w in (self.wte.weight, self.lm_head.weight)}.values():
            weight[old:vocab_size] = weight[:old].mean(dim=0)

    def new_kv_cache(self, batch_size: int, length: int) -> KVCache:
        """An empty KV cache of `length` positions (at most block_size) for `batch_size`
        sequences, in the weights' dtype and device; the caller keeps it, not the model."""
        return KVCache.empty(self.config.n_layer, batch_size, self.config.n_kv_head,
                             min(length, self.config.block_size), self.config.head_dim,
                             self.wte.weight.dtype, self.wte.weight.device)


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows of hidden states per chunk of the loss: LOSS_CHUNK_LOGITS logits, 256 MiB in fp32
    (1,335 rows of GPT-2's 50,257 ids). Each chunk adds a fixed cost (its head gradient, a
    (V, C) matrix, cast and summed), so larger chunks run faster and hold more: GPT-2 124M,
    batch 4 x 1024, bf16 on a 2-core CPU (benchmarks/bench_loss_memory.py), memory above
    model and optimizer 4.03 GB whole-batch, 2.50 / 2.72 / 3.14 GB at 2**25 / 2**26 / 2**27
    logits, steps 11% / 7% / 4% slower (fp32: as fast as whole-batch at 2**25)."""
    return max(1, LOSS_CHUNK_LOGITS // vocab_size)


def _cross_entropy(logits_fn, hidden: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """The fp32 cross-entropy of the rows' logits (made in the compute dtype), summed,
    each row times its weight if given; IGNORE_INDEX rows count 0."""
    logits = logits_fn(hidden).float()
    if weights is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    per_row = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_row * weights).sum()


class _FusedCrossEntropy(torch.autograd.Function):
    """The loss of chunked_cross_entropy with its gradients formed in the forward pass,
    one chunk of rows at a time: each chunk's logits live only while its own loss and
    gradients are computed (autograd over that chunk alone), and the backward pass only
    scales the stored gradients (of `hidden` and of `params`, the weights `logits_fn`
    reads) by the incoming one. The matrix products are those of the plain path, none
    recomputed (checkpointing each chunk instead ran the head's forward + backward 1.7x
    slower on CPU: a second head product and log-softmax per chunk)."""

    @staticmethod
    def forward(ctx, hidden, targets, weights, logits_fn, chunk_rows, *params):
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)  # fp32 sums, made on first use
        ctx.param_dtypes = [p.dtype for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(hidden.requires_grad)
                loss = _cross_entropy(logits_fn, h, targets[rows],
                                      None if weights is None else weights[rows])
            inputs = ([h] if hidden.requires_grad else []) + [params[i] for i in wanted]
            grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
            if hidden.requires_grad:
                grad_hidden[rows] = grads.pop(0)
            for i, grad in zip(wanted, grads):
                if grad is not None:
                    grad_params[i] = grad.float() if grad_params[i] is None else grad_params[i].add_(grad)
            total += loss.detach()
        ctx.grads = (grad_hidden, grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward ran twice: its gradients are freed "
                               "after the first")
        (grad_hidden, grad_params), ctx.grads = ctx.grads, None  # freed now, not when the graph goes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total)
        grad_params = [None if g is None else g.mul_(grad_total).to(dtype)
                       for g, dtype in zip(grad_params, ctx.param_dtypes)]
        return grad_hidden, None, None, None, None, *grad_params


@torch.compiler.disable  # autograd inside the forward: under torch.compile it runs eagerly
def chunked_cross_entropy(logits_fn, params, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 cross-entropy of `logits_fn(hidden)` ((N, C) -> (N, V)) against `targets` (N,),
    summed over the rows whose target is not IGNORE_INDEX, each times its weight if
    `weights` (N,) is given; `params`: the weights `logits_fn` reads (its gradients go to
    them). Equal to one `F.cross_entropy` over all N rows, loss and gradients, without
    ever holding N rows of logits (GPT-2's 50,257 ids at 16 x 1024 rows: 3.3 GB per fp32
    copy, several alive at once): `chunk_rows` rows at a time, each chunk's logits made in
    the compute dtype and upcast to fp32 for the softmax. With gradients wanted, each
    chunk's gradients are formed in the forward pass (_FusedCrossEntropy); under fp16,
    whose loss scale is only known in the backward, each chunk is checkpointed instead
    (its logits recomputed in the backward), so its gradients are formed at that scale."""
    params = list(params)
    chunks = zip(hidden.split(chunk_rows), targets.split(chunk_rows),  # split: one backward node
                 weights.split(chunk_rows) if weights is not None else [None] * hidden.size(0))
    zero = torch.zeros((), device=hidden.device)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))):
        return sum((_cross_entropy(logits_fn, *chunk) for chunk in chunks), zero)
    if _compute_dtype(hidden) == torch.float16:  # (the head draws no random numbers to replay)
        return sum((checkpoint(_cross_entropy, logits_fn, *chunk, use_reentrant=False,
                               preserve_rng_state=False) for chunk in chunks), zero)
    return _FusedCrossEntropy.apply(hidden, targets, weights, logits_fn, chunk_rows, *params)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' matrix products produce: autocast's when it is on (the
    residual stream then stays fp32 while queries and keys are bf16), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _grown(embedding: nn.Embedding, rows: int) -> nn.Embedding:
    """A copy of `embedding` with `rows` rows, the new ones zero."""
    grown = nn.Embedding(rows, embedding.embedding_dim, device=embedding.weight.device,
                         dtype=embedding.weight.dtype)
    grown.weight.zero_()
    grown.weight[: embedding.num_embeddings] = embedding.weight
    return grown


def count_params(cfg: ModelConfig) -> int:
    """The parameters `GPT(cfg).num_params()` counts, from the config alone: exact, and
    instant for any size, so a model too large to build is refused before it is built."""
    cfg = cfg.resolved()
    C, bias = cfg.n_embd, int(cfg.bias)

    def linear(n_in: int, n_out: int, biased: int = bias) -> int:
        return n_in * n_out + biased * n_out

    norm = C + bias * C if cfg.norm == "layernorm" else C  # gain (and LayerNorm's shift)
    q_width, kv_width = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    attn = linear(C, q_width + 2 * kv_width, int(cfg.bias or cfg.attn_bias)) + linear(q_width, C)
    attn += 2 * cfg.head_dim if cfg.qk_norm else 0
    gates = 2 if cfg.mlp == "swiglu" else 1
    mlp = linear(C, gates * cfg.mlp_hidden) + linear(cfg.mlp_hidden, C)
    rows = -(-cfg.vocab_size // 64) * 64  # padded_vocab_size in whole numbers: exact at any size
    embeddings = rows * C * (1 if cfg.tie_embeddings else 2)  # wte (and an untied lm_head)
    positions = cfg.block_size * C if cfg.position == "learned" else 0
    return embeddings + positions + cfg.n_layer * (2 * norm + attn + mlp) + norm  # ..., h, ln_f


def check_fits(cfg: ModelConfig, device: torch.device, training: bool, fix: str,
               shards: int = 1) -> None:
    """Refuse (with the numbers) a model whose parameters alone overflow `device`'s memory;
    called before `GPT(cfg)` so an absurd config never starts allocating."""
    shape = ", ".join(f"{name}={shorten(str(getattr(cfg, name)), 20)}"
                      for name in ("n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "mlp_hidden",
                                   "block_size", "vocab_size"))
    check_memory(count_params(cfg), device, training, f"model ({shape})", fix, shards)
