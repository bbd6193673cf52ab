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

For training (instruct, dpo), `conversation_ids` marks the ids a model should learn to
produce: each assistant reply's tokens and the id that ends it. Under a template they are
found by rendering: a reply is what the conversation up to it adds to the prompt that asks
for it (the conversation before it with the generation prompt), up to the first stop id;
a template that does not render a conversation as such prefixes is refused.
"""

from __future__ import annotations

from gptcli.data.tokenizers.chat_template import render_chat
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError

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
    if has_chat_template(tokenizer):
        return _replies(tokenizer, messages)[0] + [tokenizer.special_tokens["<|assistant|>"]]
    if tokenizer.chat_template is None:
        raise ValueError("chat_prompt_ids needs a chat tokenizer (see is_chat_model)")
    return _rendered(tokenizer, messages, add_generation_prompt=True)


def chat_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a chat reply: gptcli's <|end|>, or an imported model's eos ids."""
    if has_chat_template(tokenizer):
        return frozenset({tokenizer.special_tokens[END]})
    return frozenset(tokenizer.stop_ids)


def conversation_ids(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A whole conversation's ids in the model's chat format, and for each id whether the
    model should learn to produce it (an assistant reply's tokens and its end of turn)."""
    ids, spans = _replies(tokenizer, messages)
    learn = [False] * len(ids)
    for start, end in spans:
        learn[start:end] = [True] * (end - start)
    return ids, learn


def reply_ids(tokenizer: Tokenizer, messages: list[dict], reply: str) -> list[int]:
    """The ids of `reply` as the assistant's answer to `messages` in the model's chat format,
    its end of turn included: what a chat model generates for it."""
    ids, spans = _replies(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    start, end = spans[-1]
    return ids[start:end]


def _replies(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's ids and the span [start, end) of each assistant reply in them."""
    if has_chat_template(tokenizer):
        special, ids, spans = tokenizer.special_tokens, [], []
        for turn in messages:
            ids.append(special[f"<|{turn['role']}|>"])
            content = tokenizer.encode(turn["content"])
            if turn["role"] == "assistant":
                spans.append((len(ids), len(ids) + len(content) + 1))
            ids += [*content, special[END]]
        return ids, spans
    ids, spans, stops = _rendered(tokenizer, messages), [], chat_stop_ids(tokenizer)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, through = chat_prompt_ids(tokenizer, messages[:i]), _rendered(tokenizer, messages[:i + 1])
        if ids[:len(start)] != start or ids[:len(through)] != through:
            raise GptcliError("the model's chat template does not render a conversation as the prompt for each "
                              "reply followed by the reply (it changes earlier turns as the conversation grows), so "
                              "the tokens to learn cannot be told apart; finetune a model with another template")
        ends = [k for k in range(len(start), len(through)) if ids[k] in stops]  # the reply ends at its stop id
        spans.append((len(start), ends[0] + 1 if ends else len(through)))
    return ids, spans


def _rendered(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The ids of `messages` rendered by the tokenizer's chat template (its special tokens as such)."""
    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                       special=dict(tokenizer.template_tokens))
    return tokenizer.encode_with_specials(text)
