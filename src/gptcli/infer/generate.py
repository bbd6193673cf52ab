"""Generation as small pure functions: logits -> probabilities -> token, prefill, the
one-token decode step, and a loop over them that owns its KV cache (the model keeps none).

The cache is preallocated and positions are tensors (`input_pos`), so the decode step's
shapes depend only on the cache it is given, never on the position. The loop gives each
step the cache's first slots up to its position, rounded up to a multiple of SPAN_STEP
(a view of the same memory): attention reads about the filled prefix, as a cache that
grows would, yet the shapes change once per SPAN_STEP tokens, not every token. Passing
the whole cache instead gives one shape for every step (what a compiled step wants).

When a sequence fills the context (`block_size`), the cache is rewritten from the last
half of the context (a sliding window), so generation can run past the context length.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.model import Model
from gptcli.model.budget import (
    SAMPLING_BYTES_PER_LOGIT,
    Sizes,
    kv_cache_bytes,
    logit_bytes,
    pass_bytes,
)
from gptcli.model.kv_cache import KVCache

# Slots a decode step attends over grow in steps of this many. Masked slots past the
# position still cost their reads: a whole generation at the mid shape (context 256, 248
# steps) attending over the whole cache took 13% longer than over the filled prefix at
# batch 8 in fp32 (9% bf16, up to 2.5% at batch 1); rounded up to 16 slots, 1.5% at batch
# 8 and none measurable at batch 1 (32: 2-3%, 64: 3-4% at batch 8).
SPAN_STEP = 16


# Below this temperature sampling is greedy: fp32 logits divided by 1e-300 (a float32 0)
# are inf and nan, and at 1e-5 the most likely token already takes all the probability
# unless the two best logits are within 1e-4 of each other.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def logits_to_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p filtering."""
    logits = logits.float() / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.size(-1):
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= settings.top_p
        drop[:, 0] = False  # even for a top_p that rounds to 0 in fp32
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, settings: SamplingSettings,
               generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, settings)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model: Model, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Write `tokens` (B, T) into `cache` at positions 0..T-1; logits (B, V) after the last.
    Attention reads only those T slots: later ones cannot be seen from positions below T."""
    T = tokens.size(1)
    hidden = model.hidden_states(tokens, cache.prefix(T), torch.arange(T, device=tokens.device))
    return model.logits(hidden[:, -1])


def decode_one_token(model: Model, cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor
                     ) -> torch.Tensor:
    """One token per row (B,) written at position `input_pos` (1,) -> logits (B, V) for the
    next. Its shapes do not depend on the position: this is the step worth compiling."""
    return model.logits(model.hidden_states(token[:, None], cache, input_pos)[:, -1])


DecodeStep = Callable[[Model, KVCache, torch.Tensor, torch.Tensor], torch.Tensor]


def cache_slots(context: int, prompt_tokens: int, max_new_tokens: int, compiled: bool) -> int:
    """The KV cache length generate_tokens allocates: the prompt and every new token but the
    last (never fed back), at most the context, so a short request attends over a short
    cache; a compiled step's cache is the whole context, the shape it was compiled for."""
    return context if compiled else min(context, prompt_tokens + max(max_new_tokens - 1, 0))


def generation_bytes(model: Model, rows: int, prompt_tokens: int, slots: int) -> int:
    """The memory generate_tokens takes beyond the weights for `rows` samples of a prompt
    of `prompt_tokens` with a cache of `slots` (model/budget.py): the KV cache, the larger
    of the prefill of every row at once and a one-token step (each attending over the
    cache), and one row of logits per sample with sampling's working copies."""
    sizes = Sizes.of(model)
    forward = max(pass_bytes(sizes, rows, prompt_tokens, slots, masked=True),
                  pass_bytes(sizes, rows, 1, slots, masked=True))
    return (kv_cache_bytes(sizes, rows, slots) + forward
            + logit_bytes(sizes, rows, SAMPLING_BYTES_PER_LOGIT))


@torch.inference_mode()
def generate_tokens(model: Model, prompt: list[int], max_new_tokens: int, settings: SamplingSettings,
                    num_samples: int = 1, generator: torch.Generator | None = None,
                    compiled: DecodeStep | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, (num_samples,), `max_new_tokens` times.

    `prompt` must fit the context (at most block_size tokens). `compiled`: a decode step
    for one fixed shape (infer/compiled.py), given the whole cache, a whole context long,
    at every step; without it, steps attend over the filled prefix.
    """
    context = model.config.block_size
    device = next(model.parameters()).device
    history = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, T)
    cache = model.new_kv_cache(num_samples, cache_slots(context, len(prompt), max_new_tokens, compiled is not None))
    logits = prefill(model, cache, history)
    position = history.size(1)  # where the next token goes
    attended = cache  # the prefix of `cache` that decode steps read, replaced once per SPAN_STEP
    for step in range(max_new_tokens):
        token = next_token(logits, settings, generator)
        yield token
        if step == max_new_tokens - 1:
            break
        history = torch.cat([history, token[:, None]], dim=1)
        if position == context:  # the context is full: start again from its last half
            history = history[:, -(context // 2):]
            logits = prefill(model, cache, history)
            position = history.size(1)
        elif compiled is not None:
            logits = compiled(model, cache, token, torch.tensor([position], device=device))
            position += 1
        else:
            span = min(cache.length, (position // SPAN_STEP + 1) * SPAN_STEP)
            if attended.length != span:
                attended = cache.prefix(span)
            logits = decode_one_token(model, attended, token, torch.tensor([position], device=device))
            position += 1


# Host memory a SampleText holds (measured with tracemalloc: 660 bytes each for 100,000 of
# them after two tokens), and what each kept token adds: its slot in `tokens` (8), an int
# object for ids past the 256 Python caches (28), up to 4 bytes of text.
SAMPLE_TEXT_BYTES = 700
KEPT_TOKEN_BYTES = 40


def sample_text_bytes(max_new_tokens: int) -> int:
    """The most host memory one SampleText takes by the end of `max_new_tokens` tokens."""
    return SAMPLE_TEXT_BYTES + max_new_tokens * KEPT_TOKEN_BYTES


class SampleText:
    """The text of one sample as its tokens arrive: releases only complete UTF-8 characters
    and holds back anything that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], stop_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids | {tokenizer.eot_id}
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.tokens: list[int] = []
        self.released = 0
        self.stopped = False
        self.stop_id: int | None = None  # the stop id that ended it, if one did

    def add(self, token: int) -> str:
        """Take one generated token; return the text that may now be shown."""
        if self.stopped:
            return ""
        if token in self.stop_ids:
            self.stop_id = token
            return self.finish()
        self.tokens.append(token)
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        search_from = max(self.released - self._hold, 0)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._hold)

    def finish(self) -> str:
        """End the sample (end-of-text or the token budget); return the rest of its text."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
            self.stopped = True
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        delta, self.released = self.text[self.released:upto], upto
        return delta
