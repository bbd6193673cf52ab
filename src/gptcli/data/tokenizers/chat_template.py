"""Render a Hugging Face chat template (jinja) the way transformers does.

transformers' environment: a sandbox (a template cannot reach Python internals), trim_blocks
and lstrip_blocks (block tags leave no whitespace behind), the loopcontrols extension
(`break`/`continue`), a `{% generation %}` block (marks assistant text for masks; here it
renders its body), the `raise_exception(message)` and `strftime_now(format)` globals, and a
`tojson` filter that does not escape HTML. jinja2 comes with torch; it is imported on use.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from gptcli.errors import GptcliError, shorten


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special: dict) -> str:
    """The text of `messages` ([{"role", "content"}]) under `template`, ending with the
    assistant's header when `add_generation_prompt`. `special` holds the template's token
    variables (`bos_token`, `eos_token`, ...)."""
    compiled = _compile(template)
    try:  # no tools or documents, given as None the way transformers gives them
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special)
    except GptcliError:
        raise
    except Exception as exc:  # the template's own code failed: its problem, not gptcli's
        raise GptcliError(f"chat template failed: {_one_line(exc)}; fix the model's chat template") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise GptcliError(f"chat template has a syntax error at line {exc.lineno}: {_one_line(exc)}; fix "
                          f"the model's chat template") from None


@functools.cache
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}`: just its body."""

        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str):
    raise GptcliError(f"chat template refused the conversation: {_one_line(message)}")


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _one_line(message) -> str:
    return shorten(" ".join(str(message).split()), 300)
