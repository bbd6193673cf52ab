"""Hugging Face GPT-2 interop, against transformers itself (random small models, no download)."""

import json

import pytest
import torch
from conftest import GPT2_TIKTOKEN, needs_gpt2_ranks, run_cli

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.hf_tokenizer import byte_alphabet
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, tiktoken_from_file
from gptcli.errors import GptcliError
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import load_model, save_checkpoint
from gptcli.store.hf import export_hf, import_hf, ranks_from_vocab, tokenizer_files
from gptcli.store.rundir import resolve_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SHAPES = [dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300),
          dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=257),
          dict(n_layer=1, n_head=3, n_embd=48, n_positions=32, vocab_size=1000)]


def hf_model(tmp_path, seed=0, **shape):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, bos_token_id=shape["vocab_size"] - 1,
                                     eos_token_id=shape["vocab_size"] - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm gains, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


def import_with_char_tokenizer(hf_dir, out, vocab_size):
    """Import weights; these random models' vocabularies are not GPT-2's, so pair them with
    a tokenizer of the same size for the checkpoint."""
    from gptcli.data.tokenizers.tokenizer import CharTokenizer
    from gptcli.store.hf import import_hf_model

    tok = CharTokenizer("".join(chr(0x100 + i) for i in range(vocab_size - 1)))
    save_checkpoint(out, import_hf_model(hf_dir), tok, "# test\n")
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['n_layer']}x{s['n_embd']}")
def test_import_logits_match_transformers(tmp_path, shape):
    hf, path = hf_model(tmp_path, **shape)
    from gptcli.store.hf import import_hf_model

    ours = import_hf_model(path)
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_continuation_matches_generate(tmp_path):
    shape = SHAPES[1]
    hf, path = hf_model(tmp_path, **shape)
    from gptcli.store.hf import import_hf_model

    ours = import_hf_model(path)
    prompt = [5, 17, 99, 3, 42]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = [t.item() for t in generate_tokens(ours, prompt, 40, SamplingSettings(temperature=0))]
    assert got == expected


@pytest.mark.parametrize("bias", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, bias):
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, BytesTokenizer(), "# test\n")
    out = export_hf(ckpt, tmp_path / "exported")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = torch.randint(0, 257, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model.eval()(idx), atol=1e-5, rtol=0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64  # llama.cpp's converter reads n_ctx


def test_round_trip_is_bit_identical(tmp_path):
    _, path = hf_model(tmp_path, **SHAPES[0])
    first = import_with_char_tokenizer(path, tmp_path / "a", 300)
    exported = export_hf(first, tmp_path / "exported")
    second = import_with_char_tokenizer(exported, tmp_path / "b", 300)
    a, _ = load_model(first)
    b, _ = load_model(second)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("bias", [True, False])
def test_classifier_exports_as_sequence_classification(tmp_path, bias):
    from gptcli.model.heads import GPTClassifier

    torch.manual_seed(2)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=257, bias=bias)
    model = GPTClassifier(GPT(cfg), ["neg", "pos", "neutral"]).eval()
    ckpt = save_checkpoint(tmp_path / "cls", model, BytesTokenizer(), "# test\n")
    out = export_hf(ckpt, tmp_path / "exported")
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings, exports", [
    ({"pooling": "last", "long_text": "truncate"}, True),
    ({"pooling": "mean", "long_text": "truncate"}, False),
    ({"pooling": "last", "long_text": "pool"}, False),
    ({}, False),  # today's default: mean
    (None, True),  # saved before finetune.pooling existed: trained on the last token
])
def test_a_classifier_that_pools_is_not_exported(tmp_path, settings, exports):
    """transformers' head reads the last token of one window: a classifier trained to pool
    would predict differently there, so export refuses it and writes nothing."""
    from gptcli.config import FinetuneRunConfig, config_from_dict, dump_yaml
    from gptcli.model.heads import GPTClassifier

    config = dump_yaml(config_from_dict({"finetune": {"task": "classify", **(settings or {})}}, FinetuneRunConfig))
    if settings is None:
        config = "\n".join(line for line in config.splitlines() if "pooling:" not in line)
    model = GPTClassifier(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=257)), ["a", "b"])
    ckpt = save_checkpoint(tmp_path / "cls", model, BytesTokenizer(), config)
    if exports:
        assert (export_hf(ckpt, tmp_path / "exported") / "config.json").is_file()
        return
    with pytest.raises(GptcliError, match=r"cannot be exported: it was trained with finetune.pooling: \w+ and "
                                          r"finetune.long_text: \w+, .*--set finetune.pooling=last"):
        export_hf(ckpt, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@needs_gpt2_ranks
@pytest.mark.parametrize("truncate", ["keep_end", "keep_start"])
def test_an_exported_classifier_reads_long_texts_as_gptcli(tmp_path, truncate):
    """The exported tokenizer cuts a text longer than the context from the side training
    cut it (finetune.truncate), so transformers classifies it as gptcli does."""
    from gptcli.config import FinetuneRunConfig, config_from_dict, dump_yaml
    from gptcli.infer.load import load
    from gptcli.model.heads import GPTClassifier

    config = dump_yaml(config_from_dict({"finetune": {"task": "classify", "pooling": "last", "truncate": truncate}},
                                        FinetuneRunConfig))
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257))
    ckpt = save_checkpoint(tmp_path / "cls", GPTClassifier(trunk, ["a", "b"]), tiktoken_from_file(GPT2_TIKTOKEN),
                           config)
    out = export_hf(ckpt, tmp_path / "exported")
    text = "The first words of this text differ from its last words, which are many more than sixteen tokens."
    classifier = load(ckpt, "cpu")
    assert len(classifier.tokenizer.encode(text)) > 16
    expected = classifier.probabilities(text)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer(text, truncation=True, return_tensors="pt")["input_ids"]
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[0], dim=-1).tolist()
    assert ids.shape == (1, 16)
    assert probs == pytest.approx([expected["a"], expected["b"]], abs=1e-5)


@needs_gpt2_ranks
def test_exported_tokenizer_files_match_tiktoken(tmp_path):
    tok = tiktoken_from_file(GPT2_TIKTOKEN)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, "# test\n")
    out = export_hf(ckpt, tmp_path / "exported")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world! Grüße aus München — 東京タワー, Ελληνικά, emoji 🤖🚀 and   spaces\n\ttabs."
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.eos_token_id == 50256
    # And back: vocab.json alone rebuilds the ranks (what import uses offline).
    vocab = json.loads((out / "vocab.json").read_text())
    assert ranks_from_vocab(vocab) == tok.encoding._mergeable_ranks


@needs_gpt2_ranks
def test_import_with_tiktoken_file_and_sample_via_cli(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    code, _, err = run_cli(["import-hf", tmp_path / "hf", "--out", tmp_path / "ckpt",
                            "--tokenizer", GPT2_TIKTOKEN], capsys)
    assert code == 0, err
    _, tok = load_model(tmp_path / "ckpt")
    assert tok.vocab_size == 50257 and tok.encode("Hello") == [15496]
    code, out, err = run_cli(["sample", "-c", tmp_path / "ckpt", "-p", "Hello", "-n", "5", "--seed", "0"], capsys)
    assert code == 0 and out.startswith("Hello"), err


@needs_gpt2_ranks
def test_hf_dir_used_directly_as_checkpoint(tmp_path):
    """An HF dir with vocab.json (as the hub serves gpt2) works as --checkpoint / init_from."""
    tok = tiktoken_from_file(GPT2_TIKTOKEN)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    out = export_hf(save_checkpoint(tmp_path / "ckpt", model, tok, "# t\n"), tmp_path / "hfdir")
    resolved = resolve_checkpoint(out)
    assert resolved != out and resolve_checkpoint(out) == resolved  # imported once, cached
    again, tok2 = load_model(resolved)
    assert tok2.encode("naïve café") == tok.encode("naïve café")
    assert torch.equal(again.h[0].mlp.c_fc.weight, model.h[0].mlp.c_fc.weight)


def test_byte_table_is_a_bijection_onto_printables():
    table = byte_alphabet()
    assert len(table) == len(set(table)) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_merges_rebuild_tokens():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    ranks[b"abc"] = 257
    ranks[b"abcab"] = 258
    vocab, merges = tokenizer_files(ranks)
    assert merges == ["a b", "ab c", "abc ab"]
    assert vocab["abc"] == 257


@pytest.mark.parametrize("setup, message", [
    ("pickle", "only pytorch_model.bin"),
    ("llama", "holds a 'llama' model"),
    ("act", "activation_function='relu' is not supported"),
    ("missing", "is not a directory"),
])
def test_import_errors(tmp_path, setup, message, capsys):
    folder = tmp_path / "hf"
    if setup != "missing":
        folder.mkdir()
        config = {"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8,
                  "vocab_size": 10}
        config.update({"llama": {"model_type": "llama"}, "act": {"activation_function": "relu"}}.get(setup, {}))
        (folder / "config.json").write_text(json.dumps(config))
        (folder / ("pytorch_model.bin" if setup == "pickle" else "model.safetensors")).write_bytes(b"x")
    code, out, err = run_cli(["import-hf", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(GptcliError):
        import_hf(folder, tmp_path / "out")
