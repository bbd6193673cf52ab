"""One generation session: a loaded language model, prompts in (text or a conversation),
tokens and text out as they stream. `sample`, `chat` and `serve` all generate through it,
and next evaluation, RL rollouts and speculative decoding (the shape of nanochat's Engine
and litgpt's LLM: load once, then generate).

    session = GenerationSession(load("runs/demo"))
    prompt = session.prompt("def fib(n):")            # ids, stop ids, and what was cut
    samples = session.generate(prompt, GenerationSettings(max_new_tokens=50), on_text=print_row)

Text is checked here once (it must be UTF-8 and hold no special token's spelling: a user
can never type an end-of-turn), prompts are built here (plain text, or a conversation in
the model's chat format), and tokens become text through SampleText (whole characters,
stop strings held back). The batching server (engine.py) schedules many sessions' rows
at once but takes its prompts and stop ids from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptcli.config import SEED_RANGE
from gptcli.data.tokenizers.chat_format import chat_prompt_ids, prompt_ids
from gptcli.errors import GptcliError
from gptcli.infer.compiled import CompiledDecode
from gptcli.infer.engine import BatchEngine, Job, Update
from gptcli.infer.generate import SampleText, SamplingSettings, generate_tokens
from gptcli.infer.load import ChatModel, LanguageModel
from gptcli.infer.speculative import Speculation, speculative_tokens

MAX_SEED = SEED_RANGE[1]  # the config's seed range: what torch and numpy both take


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: the token budget, the sampling rule, where to stop, the seed."""

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None
    stops: tuple[str, ...] = ()  # a sample ends at the first of these strings (left out)
    seed: int | None = None  # one generator for the batch; None: torch's global RNG

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_k, self.top_p)

    def problems(self, prefix: str = "--") -> list[str]:
        """What is wrong with these settings, each naming its option (`prefix` + the
        option's name: `--top-p` for the command line)."""
        found = []
        if self.max_new_tokens < 1:
            found.append(f"{prefix}max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan passes `< 0`
            found.append(f"{prefix}temperature must be 0 (greedy) or more, and finite; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            found.append(f"{prefix}top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append(f"{prefix}top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            found.append(f"{prefix}seed must be between 0 and 2**64 - 1 ({MAX_SEED}), got {self.seed}")
        for stop in self.stops:
            if not stop:
                found.append(f"{prefix}stop must not be empty (an empty string would end every sample at once)")
            elif not_utf8_at(stop) is not None:
                found.append(f"{prefix}stop {ascii(stop)} is not valid UTF-8 text")
        return found


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what generation continues from
    stop_ids: frozenset[int]  # ids that end a reply (a chat format's end of turn), besides end-of-text
    cropped: int = 0  # tokens cut from its start to fit the context


@dataclass
class Sample:
    text: str
    tokens: list[int]  # the ids of `text` (a stop id left out)
    stop_id: int | None = None  # the stop id that ended it (end-of-text, end of turn), if one did


class GenerationSession:
    def __init__(self, loaded: LanguageModel, speculation: Speculation | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context = loaded.context
        self.speculation = speculation  # one sample at a time, proposed and verified (speculative.py)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.loaded, ChatModel)

    def check_text(self, text: str, what: str) -> None:
        """Refuse text that cannot be sent as it reads: not UTF-8 (bytes that are not UTF-8
        arrive as lone surrogates, from a command line or JSON's \\ud800 escapes), or holding
        a special token's spelling (read as plain text, it would not mean what it shows)."""
        check_utf8(text, what)
        for special in self.tokenizer.special_tokens:
            if special in text:
                raise GptcliError(f"{what} contains the special token {special} as text; it is read as "
                                  f"plain text, so remove it")

    def prompt(self, text: str, raw: bool = False) -> Prompt:
        """The prompt for `text`: one user turn and the reply's header on a chat model
        (unless `raw`: its text continued as it is), else the text itself (empty: start a
        document). A prompt longer than the context keeps its last `context` tokens."""
        self.check_text(text, "the prompt")
        if self.is_chat and not raw:
            return self._fitted(prompt_ids(self.tokenizer, text), self.loaded.stop_ids)
        ids = self.tokenizer.encode(text) if text else [self.tokenizer.eot_id]
        return self._fitted(ids, frozenset())

    def chat_prompt(self, messages: list[dict]) -> Prompt:
        """The prompt for a conversation ([{"role", "content"}]) in the model's chat format,
        ending with the reply's header; every message's text checked (`messages[i].content`)."""
        if not self.is_chat:
            raise GptcliError(f"{self.loaded.path} has no chat format; send text to continue instead")
        for i, turn in enumerate(messages):
            self.check_text(turn["content"], f"messages[{i}].content")
        return Prompt(chat_prompt_ids(self.tokenizer, messages), self.loaded.stop_ids)

    def fit(self, prompt: Prompt, max_new_tokens: int) -> Prompt:
        """`prompt` with room for `max_new_tokens` in the context: its last
        context - max_new_tokens tokens (lm-evaluation-harness's rule for generation tasks),
        what `generate_many` needs."""
        room = self.context - max_new_tokens
        if room < 1:
            raise GptcliError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                              f"{self.context}-token context; use fewer than {self.context}")
        cut = max(len(prompt.ids) - room, 0)
        return Prompt(prompt.ids[cut:], prompt.stop_ids, prompt.cropped + cut)

    def _fitted(self, ids: list[int], stop_ids: frozenset[int]) -> Prompt:
        cropped = max(len(ids) - self.context, 0)
        return Prompt(ids[cropped:], stop_ids, cropped)

    def seeded_generator(self, seed: int) -> torch.Generator:
        """A random generator on the model's device, seeded with `seed`."""
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)

    def text_of(self, prompt: Prompt, stops: tuple[str, ...] = ()) -> SampleText:
        """A stream decoder for one sample of `prompt`: tokens in, finished text out."""
        return SampleText(self.tokenizer, list(stops), prompt.stop_ids)

    def generate(self, prompt: Prompt, settings: GenerationSettings, n: int = 1,
                 on_text: Callable[[int, str], None] = lambda row, text: None,
                 compiled: CompiledDecode | None = None,
                 generator: torch.Generator | None = None) -> list[Sample]:
        """`n` samples of `prompt` as one batch; `on_text(row, delta)` gets each sample's
        text as it becomes final. Stops when every sample has stopped (its stop id, a stop
        string or end-of-text) or after `settings.max_new_tokens`. Draws from `generator`
        when given (a conversation's, seeded once), else from one seeded by `settings.seed`.
        With `speculation`, one sample (n=1, not compiled) is proposed and verified: greedy
        the same tokens, sampled the same distribution."""
        if generator is None and settings.seed is not None:
            generator = self.seeded_generator(settings.seed)
        texts = [self.text_of(prompt, settings.stops) for _ in range(n)]
        spec = self.speculation
        if spec is not None and n == 1 and compiled is None:
            steps = speculative_tokens(self.model, prompt.ids, settings.max_new_tokens, settings.sampling,
                                       spec.proposer, spec.k, generator, spec.stats)
        else:
            steps = generate_tokens(self.model, prompt.ids, settings.max_new_tokens, settings.sampling, n,
                                    generator, compiled)
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                delta = texts[row].add(token)
                if delta:
                    on_text(row, delta)
            if all(t.stopped for t in texts):
                break
        for row, text in enumerate(texts):
            delta = text.finish()
            if delta:
                on_text(row, delta)
        return [Sample(t.text, t.tokens, t.stop_id) for t in texts]

    def generate_many(self, prompts: list[Prompt], settings: GenerationSettings, n: int = 1,
                      max_batch: int = 16, on_done: Callable[[int], None] = lambda index: None,
                      seeds: list[int] | None = None) -> list[list[Sample]]:
        """`n` samples of every prompt, decoded together by continuous batching (engine.py):
        up to `max_batch` rows at once, a prompt starting as soon as rows free up. Each
        prompt's samples are drawn as `generate` draws them alone (a generator of their own
        seeded with `settings.seed`), so `gptcli sample` on one of these prompts gives its
        samples; greedy ones too, up to rounding (a row's logits can differ in the last bits
        with the batch around it). Every prompt must leave room for the new tokens (`fit`).
        `on_done(i)` is called once prompt i has all its samples. `seeds` gives each prompt
        its own seed instead (RL rollouts: no two prompts share their random draws)."""
        engine = BatchEngine(self.model, self.tokenizer, max(n, min(max_batch, n * len(prompts))))
        texts = [[""] * n for _ in prompts]
        samples: list[list[Sample | None]] = [[None] * n for _ in prompts]

        def emitter(index: int) -> Callable[[Update], None]:
            def emit(update: Update) -> None:
                texts[index][update.choice] += update.text
                if update.finish is not None:
                    samples[index][update.choice] = Sample(texts[index][update.choice], list(update.ids),
                                                           update.stop_id)
                    if all(s is not None for s in samples[index]):
                        on_done(index)
            return emit

        seeds = seeds or [settings.seed] * len(prompts)
        engine.run([Job(p.ids, settings.max_new_tokens, settings.sampling, emitter(i), n, seeds[i],
                        list(settings.stops), p.stop_ids) for i, p in enumerate(prompts)])
        return samples


def check_utf8(text: str, what: str) -> None:
    """Refuse text UTF-8 cannot encode (lone surrogates), naming `what` and where."""
    bad = not_utf8_at(text)
    if bad is not None:
        raise GptcliError(f"{what} is not valid UTF-8 text (character {bad} is {ascii(text[bad])}); "
                          f"send UTF-8 text")


def not_utf8_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode, or None. Such characters are lone
    surrogates: what command-line bytes that are not UTF-8 turn into (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
