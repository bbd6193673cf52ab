"""`gptcli chat`: replies as `sample` gives them, history and its fitting into the context,
the slash commands, refused turns that keep the session, and checkpoints that are no chat
model."""

import io
import json
import sys

import pytest
from conftest import run_cli
from serving import CONTEXT, random_model

from gptcli.cli.chat import Command, handle_line, parse_line
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS, chat_prompt_ids
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.infer.conversation import fit_conversation, open_conversation
from gptcli.infer.session import GenerationSettings
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import save_checkpoint

CHAT_TOKENIZER = WithAddedTokens(BytesTokenizer(), CHAT_TOKENS)
N = "12"  # reply budget in the CLI tests: prompt + reply stay inside the context


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """An instruct-shaped checkpoint: gptcli's chat tokens after the byte vocabulary."""
    root = tmp_path_factory.mktemp("chat")
    return save_checkpoint(root / "chat", random_model(CHAT_TOKENIZER.vocab_size), CHAT_TOKENIZER, "# chat\n")


def chat(args, stdin: bytes, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return run_cli(["chat", *map(str, args), "--device", "cpu"], capsys)


def sampled(ckpt, prompt: str, capsys) -> str:
    code, out, err = run_cli(["sample", "-c", ckpt, "-p", prompt, "-n", N, "--greedy", "--json",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    return json.loads(out)["text"]


def messages(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


# --- the parts without a terminal ---------------------------------------------------------


def test_parse_line_commands_and_messages():
    assert parse_line("/reset") == Command("reset", "")
    assert parse_line("/system   be   terse ") == Command("system", "be   terse")
    assert parse_line("/") == Command("", "")
    assert parse_line("//etc/hosts is what?") == "/etc/hosts is what?"
    assert parse_line("hello /reset") == "hello /reset"


def test_fit_drops_oldest_turns_and_keeps_the_system_prompt():
    history = messages(*(f"{role}{i}-xxxxxxx" for i in range(3) for role in "qa"))  # 12 tokens each
    full = chat_prompt_ids(CHAT_TOKENIZER, [{"role": "system", "content": "be brief"}, *history,
                                            {"role": "user", "content": "hello"}])
    assert len(full) == 10 + 6 * 12 + 7 + 1
    fit = fit_conversation(CHAT_TOKENIZER, "be brief", history, "hello", CONTEXT, 8)
    # 90 tokens; leaving 8 for the reply means at most 56: one exchange out is 66, two are 42.
    assert fit.dropped == 4 and len(fit.ids) == 42 and fit.budget == 8
    assert fit.ids == chat_prompt_ids(CHAT_TOKENIZER, [{"role": "system", "content": "be brief"},
                                                       *history[4:], {"role": "user", "content": "hello"}])
    assert fit.ids[0] == CHAT_TOKENIZER.special_tokens["<|system|>"]
    assert fit.ids[-1] == CHAT_TOKENIZER.special_tokens["<|assistant|>"]
    roomy = fit_conversation(CHAT_TOKENIZER, "be brief", history, "hello", 1024, 8)
    assert roomy.dropped == 0 and roomy.ids == full


def test_fit_budget_is_the_rest_of_the_context_and_a_lone_long_message_is_refused():
    history = messages("q", "a")
    # A full reply (100) cannot fit: room is kept for half the context, then all of it is the budget.
    fit = fit_conversation(CHAT_TOKENIZER, "", history, "x" * 40, CONTEXT, 100)
    assert fit.dropped == 2 and len(fit.ids) == 43 and fit.budget == CONTEXT - 43
    with pytest.raises(GptcliError, match=r"^message not sent: it makes a 73-token prompt with the system prompt"):
        fit_conversation(CHAT_TOKENIZER, "s", history, "x" * 67, CONTEXT, 8)


def test_system_command_changes_the_prompt_and_keeps_the_history(chat_ckpt, capsys):
    session = open_conversation(chat_ckpt, GenerationSettings(max_new_tokens=4, temperature=0.0), "", device="cpu")
    session.history += messages("hi", "there")
    before = session.fit("hello").ids
    assert handle_line(session, "/system be brief")
    after = session.fit("hello").ids
    assert session.system == "be brief" and session.history == messages("hi", "there")
    assert after[0] == CHAT_TOKENIZER.special_tokens["<|system|>"] and after[len(after) - len(before):] == before
    assert handle_line(session, "/system <|user|>")  # refused: the old prompt stays
    assert session.system == "be brief" and "special token <|user|>" in capsys.readouterr().err
    assert handle_line(session, "/system") and session.fit("hello").ids == before
    assert handle_line(session, "/reset") and session.history == []
    assert not handle_line(session, "/quit")


# --- the command ----------------------------------------------------------------------------


def test_first_reply_is_samples_and_reset_starts_again(chat_ckpt, capsys, monkeypatch):
    first = sampled(chat_ckpt, "hi", capsys)
    assert first
    code, out, err = chat(["-c", chat_ckpt, "-n", N, "--greedy"], b"hi\nhi\n/reset\nhi\n", capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(first + "\n") and out.endswith("\n" + first + "\n")
    second = out[len(first) + 1:-len(first) - 1]
    assert second.endswith("\n") and second[:-1] != first  # the second "hi" came after a first exchange
    assert "conversation forgotten" in err


def test_refused_turns_keep_the_session(chat_ckpt, capsys, monkeypatch):
    first = sampled(chat_ckpt, "hi", capsys)
    stdin = b"a <|end|> b\n" + b"x" * 80 + b"\n\xff\xfe\n/bogus\n\nhi\n"
    code, out, err = chat(["-c", chat_ckpt, "-n", N, "--greedy"], stdin, capsys, monkeypatch)
    assert code == 0 and out == first + "\n"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, err
    assert "special token <|end|>" in errors[0] and "message not sent: it makes a 83-token prompt" in errors[1]
    assert "not valid UTF-8" in errors[2] and "unknown command /bogus" in errors[3]


def test_history_beyond_the_context_is_dropped_with_a_note(chat_ckpt, capsys, monkeypatch):
    # Context 64, replies of at most 12 tokens: a new "hi" and room for its reply take 17. The
    # first exchange is 30 tokens (the reply's 6 stray bytes come back as U+FFFD, 3 bytes each),
    # so the second message keeps it and the third drops it.
    code, out, err = chat(["-c", chat_ckpt, "-n", N, "--greedy"], b"hi\nhi\nhi\n", capsys, monkeypatch)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "dropped" in line]
    assert notes == ["note: dropped the oldest 2 turns of the conversation to fit the 64-token context"]


def test_end_of_input_and_quit_exit_cleanly(chat_ckpt, capsys, monkeypatch):
    assert chat(["-c", chat_ckpt], b"", capsys, monkeypatch)[:2] == (0, "")
    assert chat(["-c", chat_ckpt], b"/quit\nhi\n", capsys, monkeypatch)[:2] == (0, "")


def test_checkpoints_that_are_no_chat_model_are_refused(tmp_path, capsys, monkeypatch):
    base = save_checkpoint(tmp_path / "base", random_model(257), BytesTokenizer(), "# base\n")
    classifier = save_checkpoint(tmp_path / "cls", GPTClassifier(random_model(257), ["a", "b"]),
                                 BytesTokenizer(), "# cls\n")
    for ckpt, message in ((base, "is a base language model, not a chat model; continue text with gptcli "
                                 "sample, or make a chat model with gptcli finetune --task instruct"),
                          (classifier, "is a classifier, not a chat model"),
                          (tmp_path / "cls", "--top-p must be in (0, 1]")):
        extra = ["--top-p", "1.5"] if message.startswith("--top-p") else []
        code, out, err = chat(["-c", ckpt, *extra], b"hi\n", capsys, monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], err


def test_replies_with_a_draft_are_the_models_own(chat_ckpt, capsys, monkeypatch):
    """Speculative replies (prompt lookup, and the model as its own draft) equal plain ones,
    with the guesses' footer after each; a bad --draft-tokens is refused in one line."""
    code, plain, err = chat(["-c", chat_ckpt, "-n", N, "--greedy"], b"hi hi hi\nhi\n", capsys, monkeypatch)
    assert code == 0, err
    for draft in ("ngram", str(chat_ckpt)):
        code, out, err = chat(["-c", chat_ckpt, "-n", N, "--greedy", "--draft", draft, "--draft-tokens", "3"],
                              b"hi hi hi\nhi\n", capsys, monkeypatch)
        assert code == 0, err
        assert out == plain
    assert "tokens per verification" in err  # the model as its own draft: every guess kept
    code, out, err = chat(["-c", chat_ckpt, "--draft", "ngram", "--draft-tokens", "17"], b"hi\n", capsys, monkeypatch)
    assert code == 2 and "--draft-tokens must be 1..16, got 17" in err and err.count("\n") == 1
