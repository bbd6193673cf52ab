"""A conversation with a chat model: the system prompt, the turns so far, and the next
reply generated through the session (session.py), fitted into the context by leaving out
the oldest turns. The terminal chat (cli/chat.py) is a loop of lines over one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from gptcli.data.tokenizers.chat_format import chat_prompt_ids
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings, Prompt
from gptcli.infer.speculative import draft_problems, speculation_for


class Fit(NamedTuple):
    ids: list[int]  # system prompt, the turns kept, the new message, the assistant header
    dropped: int  # oldest turns (user and assistant messages) left out to make room
    budget: int  # tokens the reply may take


def fit_conversation(tokenizer: Tokenizer, system: str, history: list[dict], message: str,
                     context: int, max_new_tokens: int) -> Fit:
    """The prompt for a reply to `message` after `history` (alternating user and assistant
    messages). Oldest turns are left out, a user message with its reply, until the prompt
    leaves room for a full reply (`max_new_tokens`, at most half the context); the system
    prompt always stays. The reply may take the rest of the context, up to max_new_tokens.
    A message that leaves no room even alone is a GptcliError."""
    head = [{"role": "system", "content": system}] if system else []
    new = [{"role": "user", "content": message}]
    room = max(1, min(max_new_tokens, context // 2))
    dropped = 0
    ids = chat_prompt_ids(tokenizer, head + history + new)
    while len(ids) + room > context and dropped < len(history):
        dropped = min(dropped + 2, len(history))
        ids = chat_prompt_ids(tokenizer, head + history[dropped:] + new)
    if len(ids) >= context:
        with_system = " with the system prompt" if system else ""
        raise GptcliError(f"message not sent: it makes a {len(ids)}-token prompt{with_system}, and the "
                          f"context is {context} tokens; send a shorter one")
    return Fit(ids, dropped, min(max_new_tokens, context - len(ids)))


@dataclass
class Conversation:
    """A chat model's conversation: `respond` appends a message and its reply."""

    session: GenerationSession
    settings: GenerationSettings
    generator: torch.Generator | None = None  # one for the whole conversation (seeded once)
    system: str = ""
    history: list[dict] = field(default_factory=list)  # user, assistant, user, assistant, ...

    @property
    def context(self) -> int:
        return self.session.context

    def set_system(self, text: str) -> None:
        self.session.check_text(text, "the system prompt")
        self.system = text

    def reset(self) -> None:
        self.history.clear()

    def fit(self, message: str) -> Fit:
        return fit_conversation(self.session.tokenizer, self.system, self.history, message,
                                self.context, self.settings.max_new_tokens)

    def respond(self, message: str, on_text: Callable[[str], None],
                on_note: Callable[[str], None] = lambda note: None) -> str:
        """Reply to `message`, streaming the reply's text to `on_text`; both join the history.
        Turns that no longer fit are forgotten (told to `on_note`)."""
        self.session.check_text(message, "the message")
        fit = self.fit(message)
        if fit.dropped:
            on_note(f"dropped the oldest {fit.dropped} turns of the conversation to fit the "
                    f"{self.context}-token context")
            del self.history[:fit.dropped]
        prompt = Prompt(fit.ids, self.session.loaded.stop_ids)
        settings = GenerationSettings(fit.budget, self.settings.temperature, self.settings.top_k,
                                      self.settings.top_p, self.settings.stops)
        [reply] = self.session.generate(prompt, settings, on_text=lambda row, text: on_text(text),
                                        generator=self.generator)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply.text}]
        return reply.text


def open_conversation(checkpoint: str | Path | None, settings: GenerationSettings, system: str = "",
                      device: str = "auto", precision: str = "auto", quantize: str = "none",
                      draft: str | None = None, draft_tokens: int = 4) -> Conversation:
    """A new conversation with the chat model `checkpoint` names (a classifier or a base
    language model is refused before its weights are read); with `draft`, replies are
    decoded speculatively (speculative.py)."""
    problems = settings.problems() + draft_problems(draft, draft_tokens)
    if problems:  # option errors first, before any checkpoint is looked at
        raise GptcliError("; ".join(problems))
    loaded = load(checkpoint, device, precision, quantize, expect=("chat",))
    session = GenerationSession(loaded, speculation_for(draft, draft_tokens, loaded, precision, quantize))
    generator = None if settings.seed is None else session.seeded_generator(settings.seed)
    conversation = Conversation(session, settings, generator)
    conversation.set_system(system)
    return conversation
