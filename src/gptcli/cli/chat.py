"""`gptcli chat`: a conversation in the terminal with an instruct checkpoint or an imported
chat model.

The parts that need no terminal are plain functions: `parse_line` (a typed line as a
command or a message) and `fit_conversation` (the prompt for the next reply: the system
prompt, as much of the history as fits, the new message). `ChatSession` holds the loaded
model, the system prompt and the turns so far; `run_chat` loads a checkpoint and reads
lines until /quit, the end of input or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from gptcli.cli.display import console, notice, show_checkpoint
from gptcli.data.tokenizer import Tokenizer, load_tokenizer
from gptcli.errors import GptcliError, shorten
from gptcli.infer.generate import SampleText, SamplingSettings, generate_tokens
from gptcli.infer.sample import SampleRequest, check_plain_text, is_classifier, load_for_generation
from gptcli.model import Model
from gptcli.runtime import resolve_device
from gptcli.store.checkpoint import TOKENIZER_DIR
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.instruct import chat_prompt_ids, chat_stop_ids, is_chat_model

HELP = """\
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt (no TEXT: remove it); the conversation stays
/help          this list
/quit          leave (so do Ctrl-D and Ctrl-C)
//TEXT         send a message that starts with /"""


class Command(NamedTuple):
    name: str  # without its slash
    arg: str  # the rest of the line, stripped


def parse_line(line: str) -> Command | str:
    """A typed line as a command (`/name rest`) or a message (any other text; `//text`
    is the message `/text`)."""
    if line.startswith("//"):
        return line[1:]
    if line.startswith("/"):
        name, *rest = line[1:].split(maxsplit=1) or [""]
        return Command(name, rest[0].strip() if rest else "")
    return line


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


def check_message_text(tokenizer: Tokenizer, text: str, what: str) -> None:
    """Refuse text that cannot be sent as typed: not UTF-8 (read bytes arrive as lone
    surrogates), or holding a special token's spelling."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GptcliError(f"{what} is not valid UTF-8 text (character {exc.start}); type UTF-8") from None
    check_plain_text(tokenizer, text, what)


@dataclass
class ChatSession:
    model: Model
    tokenizer: Tokenizer
    settings: SamplingSettings
    max_new_tokens: int
    generator: torch.Generator | None = None
    system: str = ""
    history: list[dict] = field(default_factory=list)  # user, assistant, user, assistant, ...

    def set_system(self, text: str) -> None:
        check_message_text(self.tokenizer, text, "the system prompt")
        self.system = text

    def reset(self) -> None:
        self.history.clear()

    def fit(self, message: str) -> Fit:
        return fit_conversation(self.tokenizer, self.system, self.history, message,
                                self.model.config.block_size, self.max_new_tokens)

    def respond(self, message: str, on_text: Callable[[str], None],
                on_note: Callable[[str], None] = lambda note: None) -> str:
        """Reply to `message`, streaming the reply's text to `on_text`; both join the history.
        Turns that no longer fit are forgotten (told to `on_note`)."""
        check_message_text(self.tokenizer, message, "the message")
        fit = self.fit(message)
        if fit.dropped:
            on_note(f"dropped the oldest {fit.dropped} turns of the conversation to fit the "
                    f"{self.model.config.block_size}-token context")
            del self.history[:fit.dropped]
        reply = self.generate(fit.ids, fit.budget, on_text)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        return reply

    def generate(self, prompt: list[int], budget: int, on_text: Callable[[str], None]) -> str:
        text = SampleText(self.tokenizer, [], chat_stop_ids(self.tokenizer))
        for token in generate_tokens(self.model, prompt, budget, self.settings, 1, self.generator):
            on_text(text.add(token.item()))
            if text.stopped:
                break
        on_text(text.finish())
        return text.text


def handle_line(session: ChatSession, line: str) -> bool:
    """Act on one typed line; False when the user asked to leave."""
    item = parse_line(line)
    try:
        if isinstance(item, Command):
            return run_command(session, item)
        if item.strip():
            session.respond(item, on_text=_write, on_note=notice)
            _write("\n")
    except GptcliError as exc:  # a refused turn: say why, and keep talking
        _refuse(str(exc))
    return True


def run_command(session: ChatSession, command: Command) -> bool:
    if command.name in ("quit", "exit"):
        return False
    if command.name == "reset":
        session.reset()
        notice("conversation forgotten; the system prompt stays")
    elif command.name == "system":
        session.set_system(command.arg)
        notice(f"system prompt set to: {shorten(command.arg)}" if command.arg else "system prompt removed")
    elif command.name == "help":
        console.print(HELP, markup=False, highlight=False)
    else:
        _refuse(f"unknown command /{shorten(command.name, 20)}; /help lists the commands "
                f"(start a message with // to send a leading /)")
    return True


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _refuse(message: str) -> None:
    console.print(f"error: {message}", markup=False, highlight=False)


def read_line(interactive: bool) -> str | None:
    """The next line typed, without its line break; None at the end of input. A terminal
    gets the `> ` prompt; piped input is read quietly, its bytes kept as sent (invalid
    UTF-8 becomes lone surrogates, refused with the message)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
        except UnicodeDecodeError:
            _refuse("that line is not valid UTF-8 text; type UTF-8")
            return ""
    data = sys.stdin.buffer.readline()
    if not data:
        return None
    return data.decode("utf-8", errors="surrogateescape").rstrip("\r\n")


def chat_loop(session: ChatSession, read: Callable[[], str | None]) -> None:
    while (line := read()) is not None:
        if not handle_line(session, line):
            return


def check_chat_model(path: Path) -> None:
    """Refuse a classifier or a base language model, before its weights are loaded."""
    if is_classifier(path):
        raise GptcliError(f"{path} is a classifier, not a chat model; classify text with "
                          f"gptcli sample -c {shlex.quote(str(path))} -p TEXT")
    if not is_chat_model(load_tokenizer(path / TOKENIZER_DIR)):
        raise GptcliError(f"{path} is a base language model, not a chat model; continue text with "
                          f"gptcli sample, or make a chat model with gptcli finetune --task instruct")


def open_session(checkpoint: str | Path | None, request: SampleRequest, system: str
                 ) -> tuple[Path, ChatSession]:
    request.check()  # option errors first, before any checkpoint is looked at
    path = resolve_checkpoint(checkpoint)
    check_chat_model(path)
    device = resolve_device(request.device)
    model, tokenizer = load_for_generation(path, device, request.precision, request.quantize)
    generator = None
    if request.seed is not None:
        generator = torch.Generator(device=device).manual_seed(request.seed)
    settings = SamplingSettings(request.temperature, request.top_k, request.top_p)
    session = ChatSession(model, tokenizer, settings, request.max_new_tokens, generator)
    session.set_system(system)
    return path, session


def run_chat(checkpoint: str | Path | None, request: SampleRequest, system: str = "") -> None:
    """Talk with a chat checkpoint until /quit, the end of input or Ctrl-C."""
    path, session = open_session(checkpoint, request, system)
    show_checkpoint(path)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # line editing and history for input()
        console.print("type a message; /help lists the commands, /quit leaves", style="dim")
    try:
        chat_loop(session, lambda: read_line(interactive))
    except KeyboardInterrupt:
        _write("\n")
