"""export-gguf: the file's settings, vocabulary and tensors read back with gguf's reader;
llama.cpp (through llama-cpp-python, when installed) computing the same logits and greedy
tokens as gptcli for each GGUF architecture; every refusal, with nothing written."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GPT2_TIKTOKEN, needs_gpt2_ranks, run_cli

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.bpe import GPT2_PATTERN, train_bpe
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS
from gptcli.data.tokenizers.tokenizer import (
    BytesTokenizer,
    WithAddedTokens,
    tiktoken_from_file,
    tiktoken_from_ranks,
)
from gptcli.errors import GptcliError
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import save_checkpoint
from gptcli.store.gguf_export import export_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gptcli[gguf]')")

SRC = Path(__file__).resolve().parents[2] / "src" / "gptcli"
TEXT = "def forward(self, idx):\n    return self.lm_head(self.ln_f(x))  # logits, (B, T, V)\n"
# Each GGUF architecture: gptcli components that export to it.
SHAPES = {
    "gpt2": dict(arch="gpt2"),
    "llama": dict(arch="llama", n_kv_head=2),
    "qwen2": dict(arch="llama", attn_bias=True),
    "qwen3": dict(arch="llama", qk_norm=True, head_dim=32, tie_embeddings=True),
}


@pytest.fixture(scope="module")
def bpe():
    """A 320-id byte-level BPE with GPT-2's pattern, trained on gptcli's own source."""
    texts = [p.read_text() for p in sorted(SRC.rglob("*.py"))[:30]]
    return tiktoken_from_ranks(train_bpe(texts, 320), "bpe-320", GPT2_PATTERN)


def checkpoint(folder: Path, tokenizer, seed: int = 0, **shape):
    """A random model (weights large enough that greedy text depends on every layer)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=128), **shape},
                      vocab_size=tokenizer.vocab_size)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), save_checkpoint(folder, model, tokenizer, "# test\n")


def read(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_gpt2_file_holds_the_settings_vocabulary_and_weights(tmp_path, bpe):
    model, ckpt = checkpoint(tmp_path / "ckpt", bpe, **SHAPES["gpt2"])
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.context_length"]) == (2, 64, 128)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == bpe.vocab_size and tokens[bpe.eot_id] == "<|endoftext|>"
    assert fields["tokenizer.ggml.eos_token_id"] == bpe.eot_id
    assert len(fields["tokenizer.ggml.merges"]) == bpe.vocab_size - 1 - 256
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["wte.weight"][:bpe.vocab_size].numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"].data, state["h.1.attn.c_attn.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"].data, state["h.0.mlp.c_proj.weight"].numpy())
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("dtype, qtype, tolerance", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 1 / 127)])
def test_smaller_types_hold_the_weights_within_their_precision(tmp_path, bpe, dtype, qtype, tolerance):
    model, ckpt = checkpoint(tmp_path / "ckpt", bpe, **SHAPES["llama"])
    export_gguf(ckpt, tmp_path / "m.gguf", dtype)
    _, tensors = read(tmp_path / "m.gguf")
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type.name == qtype and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    weight = model.state_dict()["h.0.mlp.c_proj.weight"].numpy()
    values = gguf.quants.dequantize(down.data, down.tensor_type).reshape(weight.shape)
    blocks = np.abs(weight).reshape(-1, 32).max(axis=1, keepdims=True)  # q8_0's scale per 32 values
    assert np.all(np.abs(values - weight).reshape(-1, 32) <= tolerance * blocks + 1e-7)


def test_special_tokens_are_control_tokens(tmp_path):
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip("needs ../shared/data/gpt2.tiktoken")
    tok = WithAddedTokens(tiktoken_from_file(GPT2_TIKTOKEN), CHAT_TOKENS)  # an instruct checkpoint's
    export_gguf(checkpoint(tmp_path / "ckpt", tok, n_layer=1, n_embd=32)[1], tmp_path / "m.gguf")
    fields, _ = read(tmp_path / "m.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size
    for name, i in tok.special_tokens.items():
        assert tokens[i] == name and types[i] == gguf.TokenType.CONTROL
    assert types[0] == types[50255] == gguf.TokenType.NORMAL


# --- refusals ----------------------------------------------------------------------------------


def test_refusals_write_nothing(tmp_path, bpe, capsys, monkeypatch):
    _, ckpt = checkpoint(tmp_path / "ckpt", bpe, **SHAPES["gpt2"])
    out = tmp_path / "m.gguf"
    _, byte_ckpt = checkpoint(tmp_path / "bytes", BytesTokenizer(), **SHAPES["gpt2"])
    with pytest.raises(GptcliError, match="uses the bytes tokenizer"):
        export_gguf(byte_ckpt, out)
    _, odd = checkpoint(tmp_path / "odd", bpe, arch="llama", norm="layernorm")
    with pytest.raises(GptcliError, match="model.norm=layernorm"):
        export_gguf(odd, out)
    with pytest.raises(GptcliError, match="--type must be one of f32, f16, q8_0"):
        export_gguf(ckpt, out, "q4_k")
    with pytest.raises(GptcliError, match="would overwrite the input"):
        export_gguf(ckpt, ckpt / "m.gguf")
    assert not out.exists() and not list(tmp_path.glob(".*partial"))

    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    code, _, err = run_cli(["export-gguf", ckpt, "--out", notes], capsys)
    assert code == 2 and "is not a GGUF file" in err and notes.read_text() == "my notes"
    assert run_cli(["export-gguf", ckpt, "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["export-gguf", ckpt, "--out", out], capsys)
    assert code == 2 and "pass --overwrite" in err
    assert run_cli(["export-gguf", ckpt, "--out", out, "--overwrite", "--type", "q8_0"], capsys)[0] == 0

    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(GptcliError, match=r"pip install 'gptcli\[gguf\]'"):
        export_gguf(ckpt, tmp_path / "other.gguf")


# --- llama.cpp ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: `pip install llama-cpp-python` builds llama.cpp "
                            "(about 7 minutes on 2 cores), so CI leaves it out (README: export-gguf)")


def llama_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, V) for `ids`, fp32 throughout."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def llama_greedy(llama_cpp, path: Path, ids: list[int], steps: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=2)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == steps:
            return out
    return out


@pytest.mark.parametrize("kind", SHAPES)
def test_llama_cpp_computes_gptclis_logits_and_greedy_tokens(tmp_path, bpe, llama_cpp, kind):
    model, ckpt = checkpoint(tmp_path / "ckpt", bpe, **SHAPES[kind])
    ids = bpe.encode(TEXT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :bpe.vocab_size].numpy()
    export_gguf(ckpt, tmp_path / "f32.gguf", "f32")
    theirs = llama_logits(llama_cpp, tmp_path / "f32.gguf", ids)
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()
    export_gguf(ckpt, tmp_path / "f16.gguf", "f16")
    expected = [t.item() for t in generate_tokens(model, ids, 20, SamplingSettings(temperature=0))]
    assert llama_greedy(llama_cpp, tmp_path / "f16.gguf", ids, 20) == expected
    export_gguf(ckpt, tmp_path / "q8_0.gguf", "q8_0")  # 8-bit: close, not equal
    theirs = llama_logits(llama_cpp, tmp_path / "q8_0.gguf", ids)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()  # activations are 8-bit too
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


@needs_gpt2_ranks
def test_llama_cpp_tokenizes_as_gptcli(tmp_path, llama_cpp):
    tok = tiktoken_from_file(GPT2_TIKTOKEN)
    _, ckpt = checkpoint(tmp_path / "ckpt", tok, n_layer=1, n_embd=32)
    export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    text = "Hello world! Grüße aus München — 東京タワー, emoji 🤖 and   spaces\n\ttabs. <|endoftext|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode_with_specials(text)
