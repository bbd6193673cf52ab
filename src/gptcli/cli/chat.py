"""`gptcli chat`: a conversation in the terminal with an instruct checkpoint or an imported
chat model.

The terminal's part only: `parse_line` (a typed line as a command or a message), the
commands, reading lines. The conversation itself (history, fitting it into the context,
the reply) is infer/conversation.py's; `run_chat` opens one and reads lines until /quit,
the end of input or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gptcli.cli.display import console, notice, show_checkpoint
from gptcli.errors import GptcliError, shorten
from gptcli.infer.conversation import Conversation, open_conversation
from gptcli.infer.session import GenerationSettings

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


def handle_line(conversation: Conversation, line: str) -> bool:
    """Act on one typed line; False when the user asked to leave."""
    item = parse_line(line)
    try:
        if isinstance(item, Command):
            return run_command(conversation, item)
        if item.strip():
            conversation.respond(item, on_text=_write, on_note=notice)
            _write("\n")
            _speculation_footer(conversation)
    except GptcliError as exc:  # a refused turn: say why, and keep talking
        _refuse(str(exc))
    return True


def _speculation_footer(conversation: Conversation) -> None:
    """With --draft, how the guesses have fared so far, dim, after each reply."""
    spec = conversation.session.speculation
    if spec is not None and spec.stats.proposed:
        console.print(spec.stats.summary(), style="dim", highlight=False)


def run_command(conversation: Conversation, command: Command) -> bool:
    if command.name in ("quit", "exit"):
        return False
    if command.name == "reset":
        conversation.reset()
        notice("conversation forgotten; the system prompt stays")
    elif command.name == "system":
        conversation.set_system(command.arg)
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


def chat_loop(conversation: Conversation, read: Callable[[], str | None]) -> None:
    while (line := read()) is not None:
        if not handle_line(conversation, line):
            return


def run_chat(checkpoint: str | Path | None, settings: GenerationSettings, system: str = "",
             device: str = "auto", precision: str = "auto", quantize: str = "none", draft: str | None = None,
             draft_tokens: int = 4) -> None:
    """Talk with a chat checkpoint until /quit, the end of input or Ctrl-C."""
    conversation = open_conversation(checkpoint, settings, system, device, precision, quantize, draft, draft_tokens)
    show_checkpoint(conversation.session.loaded.path)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # line editing and history for input()
        console.print("type a message; /help lists the commands, /quit leaves", style="dim")
    try:
        chat_loop(conversation, lambda: read_line(interactive))
    except KeyboardInterrupt:
        _write("\n")
