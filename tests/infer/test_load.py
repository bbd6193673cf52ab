"""The one loader (what a checkpoint is) and the one generation session (prompts in, text out)."""

import pytest
import torch
from serving import random_model

from gptcli.config import FinetuneRunConfig, ModelConfig, config_from_dict, dump_yaml
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS, END
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.data.training.labelled import TextReading
from gptcli.errors import GptcliError
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.infer.load import (
    ChatModel,
    Classifier,
    LanguageModel,
    checkpoint_kind,
    load,
)
from gptcli.infer.session import GenerationSession, GenerationSettings, Prompt
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import save_checkpoint
from gptcli.store.hf import export_hf


def test_one_function_says_what_each_checkpoint_is(lm_checkpoint, chat_checkpoint, tmp_path):
    """An LM, a chat model, a classifier saved before its settings were stored with its
    weights (read through its config.yaml), and a Hugging Face folder, all through load()."""
    lm = load(lm_checkpoint, "cpu")
    assert type(lm) is LanguageModel and lm.kind == checkpoint_kind(lm.path) == "lm" and lm.stop_ids == set()
    chat = load(chat_checkpoint, "cpu")
    assert isinstance(chat, ChatModel) and checkpoint_kind(chat.path) == "chat"
    assert chat.stop_ids == {chat.tokenizer.special_tokens[END]}

    old_config = dump_yaml(config_from_dict({"finetune": {"task": "classify", "pooling": "mean", "long_text": "pool",
                                                          "pool_stride": 8}}, FinetuneRunConfig))
    old = save_checkpoint(tmp_path / "old-classifier", GPTClassifier(random_model(257), ["neg", "pos"]),
                          BytesTokenizer(), old_config)  # no classifier metadata: the old format
    classifier = load(old, "cpu")
    assert isinstance(classifier, Classifier) and classifier.labels == ["neg", "pos"]
    assert classifier.model.pooling == "mean" and classifier.reading == TextReading("pool", "end", 8)
    assert list(classifier.probabilities("a text")) in (["neg", "pos"], ["pos", "neg"])

    torch.manual_seed(0)
    llama = GPT(ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=257))
    hf = export_hf(save_checkpoint(tmp_path / "llama", llama, BytesTokenizer(), "# llama\n"), tmp_path / "hf")
    imported = load(hf, "cpu")  # a Hugging Face folder: imported once into the cache, then loaded
    assert type(imported) is LanguageModel and imported.tokenizer.encode("héllo") == list("héllo".encode())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(imported.model(ids), llama.eval()(ids), atol=1e-5)
    gpt2 = load(export_hf(lm.path, tmp_path / "hf-gpt2"), "cpu")  # GPT-2 on bytes reads its tokenizer.json back
    assert type(gpt2) is LanguageModel and gpt2.tokenizer.encode("héllo") == list("héllo".encode())
    with torch.no_grad():
        assert torch.allclose(gpt2.model(ids), lm.model(ids), atol=1e-5)


@pytest.mark.parametrize(("expect", "message"), [
    (("chat",), "is a base language model, not a chat model; continue text with gptcli sample"),
    (("classifier",), "is a base language model, not a classifier"),
])
def test_a_kind_not_expected_is_refused_in_one_line(lm_checkpoint, expect, message):
    with pytest.raises(GptcliError, match=message):
        load(lm_checkpoint, "cpu", expect=expect)


def test_the_session_builds_prompts_in_the_models_format(lm_checkpoint, chat_checkpoint):
    chat = GenerationSession(load(chat_checkpoint, "cpu"))
    special = chat.tokenizer.special_tokens
    prompt = chat.prompt("hi")
    assert prompt.ids == [special["<|user|>"], *chat.tokenizer.encode("hi"), special[END], special["<|assistant|>"]]
    assert prompt.stop_ids == {special[END]}
    assert chat.prompt("hi", raw=True) == Prompt(chat.tokenizer.encode("hi"), frozenset())
    assert chat.chat_prompt([{"role": "user", "content": "hi"}]).ids == prompt.ids
    for bad, message in (("<|end|>", "contains the special token <|end|>"), ("\udc80", "not valid UTF-8")):
        with pytest.raises(GptcliError, match=message):
            chat.prompt(bad)
    plain = GenerationSession(load(lm_checkpoint, "cpu"))
    assert plain.prompt("").ids == [plain.tokenizer.eot_id]  # an empty prompt starts a document
    long = plain.prompt("x" * (plain.context + 5))
    assert len(long.ids) == plain.context and long.cropped == 5
    with pytest.raises(GptcliError, match="has no chat format"):
        plain.chat_prompt([{"role": "user", "content": "hi"}])
    assert set(CHAT_TOKENS) <= set(special)


def test_the_session_generates_what_the_pure_loop_does(lm_checkpoint):
    """Streaming text through the session changes nothing: its tokens are generate_tokens'
    (greedy), and the streamed pieces add up to the text."""
    session = GenerationSession(load(lm_checkpoint, "cpu"))
    prompt = session.prompt("def ")
    pieces = []
    [sample] = session.generate(prompt, GenerationSettings(max_new_tokens=12, temperature=0.0),
                                on_text=lambda row, text: pieces.append(text))
    direct = [t.item() for t in generate_tokens(session.model, prompt.ids, 12, SamplingSettings(0.0), 1, None)]
    eot = session.tokenizer.eot_id
    expected = direct[:direct.index(eot)] if eot in direct else direct
    assert sample.tokens == expected and "".join(pieces) == sample.text


def test_settings_name_every_bad_option():
    problems = GenerationSettings(max_new_tokens=0, temperature=-1, top_k=0, top_p=2.0, stops=("",),
                                  seed=-1).problems()
    assert [p.split(" ")[0] for p in problems] == ["--max-new-tokens", "--temperature", "--top-k", "--top-p",
                                                   "--seed", "--stop"]
