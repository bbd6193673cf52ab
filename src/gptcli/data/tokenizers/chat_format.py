"""The chat format of a checkpoint: how a conversation becomes prompt ids, and which ids end
a reply. Used by sampling, chat and serving (and finetuning, which trains the format in).

gptcli's own format (an instruct checkpoint's): special tokens that are single ids added
after the base vocabulary; role text is encoded as ordinary text, so a user can never type
a special token:

    <|system|>You are terse.<|end|>          (optional)
    <|user|>What is 2 + 2?<|end|>
    <|assistant|>4<|end|>

A reply continues from `<|assistant|>` and ends at `<|end|>`. An imported chat model (a
tokenizer with a Hugging Face chat template) renders that template instead and stops at
the model's eos ids.
"""

from __future__ import annotations

from gptcli.data.tokenizers.chat_template import render_chat
from gptcli.data.tokenizers.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END,)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has gptcli's own chat tokens (an instruct checkpoint's): what
    finetuning renders conversations with, adding the tokens when missing."""
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def is_chat_model(tokenizer: Tokenizer) -> bool:
    """Whether sampling wraps the prompt as a user turn: gptcli's chat tokens, or an
    imported model's chat template."""
    return has_chat_template(tokenizer) or tokenizer.chat_template is not None


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """One user turn followed by the assistant header: what `sample` continues from."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ([{"role", "content"}], roles system/user/assistant) followed by the
    assistant header: what a chat reply continues from. gptcli's own template when the
    tokenizer has its tokens, else the tokenizer's chat template (the rendered text holds
    special tokens, encoded as such)."""
    special = tokenizer.special_tokens
    if has_chat_template(tokenizer):
        ids = []
        for turn in messages:
            ids += [special[f"<|{turn['role']}|>"], *tokenizer.encode(turn["content"]), special[END]]
        return ids + [special["<|assistant|>"]]
    if tokenizer.chat_template is None:
        raise ValueError("chat_prompt_ids needs a chat tokenizer (see is_chat_model)")
    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                       special=dict(tokenizer.template_tokens))
    return tokenizer.encode_with_specials(text)


def chat_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a chat reply: gptcli's <|end|>, or an imported model's eos ids."""
    if has_chat_template(tokenizer):
        return frozenset({tokenizer.special_tokens[END]})
    return frozenset(tokenizer.stop_ids)
