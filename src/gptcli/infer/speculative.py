"""Speculative decoding at batch 1: a cheap proposer guesses the next k tokens, the model
checks all of them in one forward pass, and keeps the longest run it agrees with plus one
token of its own. A pass over k + 1 positions costs about one decode step on CPU (each
streams every weight once), so every accepted guess is a token for nearly nothing.

Proposers:
- `ModelDraft`: a small model with the same tokenizer, decoding k tokens with its own KV cache;
- `PromptLookup` (`--draft ngram`): the tokens that followed the latest earlier occurrence of
  the last n tokens (n = 3, 2, 1) in the prompt and the text so far: no second model, and
  right wherever the answer copies its input (summaries, code edits, quoted documents).

Verification keeps the model's own output:
- greedy: a guess is kept while it equals the model's argmax, so the tokens are plain greedy
  decoding's (up to rounding: k + 1 positions in one pass round differently from one);
- sampling: the rejection scheme of Leviathan et al. and Chen et al. (2023): guess x, drawn
  from the proposer's q, is kept with probability min(1, p(x) / q(x)); at the first refusal
  the token is drawn from max(p - q, 0), normalised, and the round ends; all kept, one more
  is drawn from p. The tokens are distributed as sampling from p alone. Prompt lookup's q
  is one token with probability 1.

KV caches take the rollback by position: a refused guess's keys stay in its slot, unseen
(a query attends to the slots up to its own position) until the next pass overwrites them;
nothing is copied. The proposer's cache is told how far it is still right (`keep`).

Positions: the history holds every token so far, the last one not yet in the model's cache;
a pass feeds it and the guesses at positions L - 1 .. L - 1 + k (L: the history's length).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gptcli.errors import GptcliError
from gptcli.infer.generate import SPAN_STEP, SamplingSettings, logits_to_probs, next_token, prefill
from gptcli.infer.load import LanguageModel, load
from gptcli.model import Model
from gptcli.model.kv_cache import KVCache

MAX_DRAFT_TOKENS = 16  # k: more guesses than this are rarely all right, and each costs the proposer a step


@dataclass
class SpeculationStats:
    """How the guesses fared: for `sample --json`, the chat footer and the server's /health."""

    verifications: int = 0  # the model's passes over guesses
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens those passes gave (kept guesses and the model's own)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.tokens / self.verifications if self.verifications else 0.0

    def summary(self) -> str:
        """One line for people: `speculation: 62% of 480 proposed tokens accepted, ...`."""
        return (f"speculation: {self.acceptance_rate:.0%} of {self.proposed} proposed tokens accepted, "
                f"{self.tokens_per_verification:.2f} tokens per verification")

    def as_dict(self) -> dict[str, float]:
        return {"verifications": self.verifications, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_verification": self.tokens_per_verification}


class Proposer(Protocol):
    def propose(self, history: list[int], k: int, settings: SamplingSettings,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to k guesses after `history`, and the probabilities (k', V) they were drawn
        from (None: each guess was certain, as prompt lookup's are)."""

    def keep(self, length: int) -> None:
        """The first `length` tokens of the history it last saw are still right."""


@dataclass
class PromptLookup:
    """Guesses copied from earlier in the text: the tokens after the latest earlier
    occurrence of its last `n` tokens, the longest n first (prompt lookup decoding)."""

    max_ngram: int = 3

    def propose(self, history: list[int], k: int, settings: SamplingSettings,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):  # latest first, not the tail itself
                if history[start:start + n] == tail:
                    return history[start + n:start + n + k], None
        return [], None

    def keep(self, length: int) -> None:
        pass


@dataclass
class ModelDraft:
    """A small model's guesses: it decodes k tokens with its own cache, sampled with the same
    settings as the model (greedy for greedy). Its context may be shorter than the model's:
    past it, it starts again from the last half of its context, as generation does."""

    model: Model
    cache: KVCache | None = None
    cached: int = 0  # history tokens in its cache, from `start`
    start: int = 0  # the history position its cache's slot 0 holds
    seen: list[int] = field(default_factory=list)  # the history it last extended

    def propose(self, history: list[int], k: int, settings: SamplingSettings,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        context = self.model.config.block_size
        if self.cache is None:
            self.cache = self.model.new_kv_cache(1, context)
        if len(history) - self.start + k - 1 > context or history[:self.start + self.cached] != \
                self.seen[:self.start + self.cached]:
            self.start, self.cached = max(len(history) - context // 2, 0), 0  # a new window
        device = self.cache.k[0].device
        new = torch.tensor([history[self.start + self.cached:]], device=device)  # (1, T): not yet cached
        positions = torch.arange(self.cached, len(history) - self.start, device=device)
        logits = self._step(new, positions)
        guesses, probs = [], []
        for j in range(k):
            if settings.greedy:
                token = int(logits.argmax(dim=-1))
            else:
                p = logits_to_probs(logits, settings)  # (1, V)
                token = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p[0])
            guesses.append(token)
            if j < k - 1:  # the last guess needs no logits after it
                logits = self._step(torch.tensor([[token]], device=device),
                                    torch.tensor([len(history) - self.start + j], device=device))
        self.seen = history + guesses[:-1]
        self.cached = len(self.seen) - self.start
        return guesses, (torch.stack(probs) if probs else None)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        span = min(self.cache.length, (int(positions[-1]) // SPAN_STEP + 1) * SPAN_STEP)
        hidden = self.model.hidden_states(tokens, self.cache.prefix(span), positions)
        return self.model.logits(hidden[:, -1])  # (1, V)

    def keep(self, length: int) -> None:
        self.cached = min(self.cached, max(length - self.start, 0))


@dataclass
class Speculation:
    """What a generation session speculates with: its proposer, k guesses per pass, and how
    they fared so far."""

    proposer: Proposer
    k: int = 4
    stats: SpeculationStats = field(default_factory=SpeculationStats)


def draft_problems(draft: str | None, draft_tokens: int, samples: int = 1) -> list[str]:
    """What is wrong with `--draft` and `--draft-tokens` for `samples` samples per prompt
    (nothing without a draft): what sample, chat and eval check before loading anything."""
    if draft is None:
        return []
    problems = []
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        problems.append(f"--draft-tokens must be 1..{MAX_DRAFT_TOKENS}, got {draft_tokens}")
    if samples > 1:
        problems.append("--draft speeds up one sample at a time; use --num-samples 1 (or leave --draft out)")
    return problems


def speculation_for(draft: str | None, draft_tokens: int, model: LanguageModel, precision: str, quantize: str
                    ) -> Speculation | None:
    """The speculation `--draft` and `--draft-tokens` ask of `model` (None without a draft)."""
    if draft is None:
        return None
    return Speculation(proposer_for(draft, model, precision, quantize), draft_tokens)


def proposer_for(draft: str, model: LanguageModel, precision: str, quantize: str) -> Proposer:
    """`--draft`: `ngram` (prompt lookup), or a checkpoint (or HF folder) of a language model
    with the model's tokenizer and at most its context, loaded as the model is, beside it."""
    if draft == "ngram":
        return PromptLookup()
    try:
        loaded = load(draft, next(model.model.parameters()).device, precision, quantize, expect=("lm", "chat"))
    except GptcliError as exc:
        raise GptcliError(f"--draft: {exc}") from None
    if loaded.tokenizer.fingerprint() != model.tokenizer.fingerprint():
        raise GptcliError(f"--draft {draft} has another tokenizer ({loaded.tokenizer.name}) than the model's "
                          f"({model.tokenizer.name}); its guesses would be other tokens. Train a draft on the "
                          f"model's tokenizer")
    if loaded.context > model.context:
        raise GptcliError(f"--draft {draft} reads {loaded.context} tokens of context, more than the model's "
                          f"{model.context}; a draft is the smaller model, use one with at most the model's context")
    return ModelDraft(loaded.model)


def accept(logits: torch.Tensor, guesses: list[int], guess_probs: torch.Tensor | None,
           settings: SamplingSettings, generator: torch.Generator | None) -> list[int]:
    """The tokens one verification gives: the kept guesses and the model's own next token.
    `logits` (k + 1, V) are the model's after the last token and after each guess."""
    if settings.greedy:
        best = logits.argmax(dim=-1).tolist()  # (k + 1,)
        kept = 0
        while kept < len(guesses) and guesses[kept] == best[kept]:
            kept += 1
        return guesses[:kept] + [best[kept]]
    probs = logits_to_probs(logits, settings)  # (k + 1, V)
    for i, token in enumerate(guesses):
        q = 1.0 if guess_probs is None else float(guess_probs[i, token])
        p = float(probs[i, token])
        if float(torch.rand(1, generator=generator, device=probs.device)) < min(1.0, p / q):
            continue
        residual = probs[i].clone()
        if guess_probs is None:
            residual[token] = 0.0
        else:
            residual = (residual - guess_probs[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q exactly, refused only by rounding: p itself
            residual = probs[i]
        return guesses[:i] + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    return guesses + [int(torch.multinomial(probs[len(guesses)], 1, generator=generator))]


@torch.inference_mode()
def speculative_tokens(model: Model, prompt: list[int], max_new_tokens: int, settings: SamplingSettings,
                       proposer: Proposer, k: int, generator: torch.Generator | None = None,
                       stats: SpeculationStats | None = None) -> Iterator[torch.Tensor]:
    """Yield one sample's next token, (1,), `max_new_tokens` times, as `generate_tokens` does
    for one sample: the same tokens greedily, the same distribution sampled."""
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise GptcliError(f"--draft-tokens must be 1..{MAX_DRAFT_TOKENS}, got {k}")
    stats = stats if stats is not None else SpeculationStats()
    context = model.config.block_size
    device = next(model.parameters()).device
    cache = model.new_kv_cache(1, context)
    history = list(prompt)
    logits = prefill(model, cache, torch.tensor([history], device=device))
    first = int(next_token(logits, settings, generator))
    yield torch.tensor([first], device=device)
    history.append(first)
    made, start = 1, 0  # tokens yielded; the history position the cache's slot 0 holds
    while made < max_new_tokens:
        if len(history) - start > context:  # the last token would fall past the context: start again from its last half
            start = len(history) - context // 2
            prefill(model, cache, torch.tensor([history[start:-1]], device=device))
        room = context - (len(history) - start)  # guesses the cache can still place
        tokens = verify(model, cache, history, len(history) - 1 - start, min(k, room, max_new_tokens - made - 1),
                        settings, proposer, generator, stats)
        for token in tokens[:max_new_tokens - made]:
            yield torch.tensor([token], device=device)
            history.append(token)
            made += 1


def verify(model: Model, cache: KVCache, history: list[int], position: int, k: int, settings: SamplingSettings,
           proposer: Proposer, generator: torch.Generator | None, stats: SpeculationStats) -> list[int]:
    """One round: up to `k` guesses after `history`, whose last token goes to slot `position`
    of `cache` (one row, the tokens before it cached), checked in one pass of k' + 1
    positions. Returns the tokens it gives: the kept guesses and the model's own next one.
    With k = 0 it is a plain decode step."""
    guesses, guess_probs = proposer.propose(history, k, settings, generator) if k > 0 else ([], None)
    device = cache.k[0].device
    feed = torch.tensor([[history[-1], *guesses]], device=device)  # (1, k' + 1)
    span = min(cache.length, ((position + len(guesses)) // SPAN_STEP + 1) * SPAN_STEP)
    hidden = model.hidden_states(feed, cache.prefix(span),
                                 torch.arange(position, position + len(guesses) + 1, device=device))
    tokens = accept(model.logits(hidden[0]), guesses, guess_probs, settings, generator)
    if guesses:
        stats.verifications += 1
        stats.proposed += len(guesses)
        stats.accepted += len(tokens) - 1
        stats.tokens += len(tokens)
    proposer.keep(len(history) + len(tokens) - 1)  # the kept guesses are right, the rest not
    return tokens
