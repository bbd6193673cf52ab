"""Hugging Face Llama-family interop (Llama, Qwen2, Qwen3, Mistral) against transformers
itself: random small models and a tokenizer trained here, never a download."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TIKTOKEN, needs_gpt2_ranks, run_cli
from safetensors.torch import load_file, save_file

from gptcli.config import ModelConfig
from gptcli.data.text.records import numbered
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, tiktoken_from_file
from gptcli.errors import GptcliError
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import load_model, save_checkpoint
from gptcli.store.hf import export_hf, import_hf, import_hf_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

SRC = Path(__file__).resolve().parents[2] / "src" / "gptcli"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
            bos_token_id=None, eos_token_id=None)
# One of each class, each with a switch that matters: Qwen2's q/k/v biases (always on), Qwen3's
# head_dim of 32 where hidden_size / heads is 16 (with tied embeddings), Mistral's window as long
# as the context (inactive), Llama with every linear layer biased.
KINDS = {
    "llama": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=128)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-token byte-level BPE (as Llama 3 and Qwen ship), trained on gptcli's own source,
    saved as transformers saves one: tokenizer.json and tokenizer_config.json."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([p.read_text() for p in sorted(SRC.rglob("*.py"))[:30]], trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def vocab_of(tokenizer_dir: Path) -> int:
    return tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every weight: norm gains leave one, biases and zero-initialised
    projections leave zero, so a tensor loaded into the wrong place shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def hf_model(folder: Path, kind: str, tokenizer_dir: Path | None = None, vocab_size: int = 400,
             seed: int = 0, **settings):
    """A random transformers model of `kind`, saved (safetensors) in `folder` with the
    tokenizer's files; returns (model in eval mode, folder)."""
    config_class, extra = KINDS[kind]
    config = getattr(transformers, config_class)(**{**BASE, **extra, "vocab_size": vocab_size, **settings})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model, seed)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
        shutil.copy(tokenizer_dir / name, folder / name)
    return model, folder


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def logits_close(hf, ours, vocab_size: int, batch: int = 2, length: int = 128) -> float:
    """Assert both models give the same logits (within 1e-5) for random ids; the largest gap."""
    idx = torch.randint(0, vocab_size, (batch, length))
    with torch.no_grad():
        expected, got = hf(idx).logits[..., :vocab_size], ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return (got - expected).abs().max().item()


def greedy_tokens(hf, ours, steps: int = 20) -> tuple[list[int], list[int]]:
    prompt = [5, 17, 99, 3, 42]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = [t.item() for t in generate_tokens(ours, prompt, steps, SamplingSettings(temperature=0))]
    return got, expected


def llama_config(**settings) -> ModelConfig:
    base = dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128,
                vocab_size=257, rope_theta=5000.0)
    return ModelConfig(**{**base, **settings})


def gptcli_checkpoint(folder: Path, cfg: ModelConfig, seed: int = 1):
    model = GPT(cfg)
    perturb(model, seed)
    return model.eval(), save_checkpoint(folder, model, BytesTokenizer(), "# test\n")


# --- import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers(tmp_path, tokenizer_dir, kind):
    vocab = vocab_of(tokenizer_dir)
    hf, folder = hf_model(tmp_path / "hf", kind, tokenizer_dir, vocab)
    import_hf(folder, tmp_path / "ckpt")
    ours, tokenizer = load_model(tmp_path / "ckpt")
    assert ours.config.arch == "llama" and tokenizer.vocab_size == vocab == ours.config.vocab_size
    logits_close(hf, ours, vocab)
    got, expected = greedy_tokens(hf, ours)
    assert got == expected
    text = "def main():\n    return 0\n"  # as the file encodes it (AutoTokenizer may rebuild Qwen's)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.encode(text) == reference.encode(text).ids


def test_import_reads_the_classes_switches(tmp_path):
    expected = {"llama": (True, False, False, 16, False), "qwen2": (False, True, False, 16, False),
                "qwen3": (False, False, True, 32, True), "mistral": (False, False, False, 16, False)}
    for kind, switches in expected.items():
        _, folder = hf_model(tmp_path / kind, kind)
        cfg = import_hf_model(folder).config
        assert (cfg.bias, cfg.attn_bias, cfg.qk_norm, cfg.head_dim, cfg.tie_embeddings) == switches, kind
        sizes = (cfg.n_kv_head, cfg.mlp_hidden, cfg.block_size, cfg.rope_theta, cfg.norm_eps)
        assert sizes == (2, 96, 128, 5000.0, 1e-5), kind


def as_4x(config: dict) -> None:
    """config.json as transformers 4.x wrote it: RoPE base at the top, rope_scaling null."""
    params = config.pop("rope_parameters")
    config.update(rope_theta=params["rope_theta"], rope_scaling=None, torch_dtype="float32")
    config.pop("dtype", None)


@pytest.mark.parametrize("kind, settings, change", [
    ("llama", {}, as_4x),
    ("qwen2", {}, as_4x),
    ("mistral", {}, lambda c: (as_4x(c), c.update(rope_scaling={"type": "default"}))),
    ("llama", {}, lambda c: c.pop("head_dim")),
    ("mistral", dict(head_dim=None), lambda c: c.update(head_dim=None)),
    ("llama", dict(num_key_value_heads=4), lambda c: c.pop("num_key_value_heads")),
    ("qwen2", dict(num_key_value_heads=4), lambda c: c.update(num_key_value_heads=None)),
    ("mistral", dict(num_attention_heads=16, num_key_value_heads=8), lambda c: c.pop("num_key_value_heads")),
], ids=["4.x-llama", "4.x-qwen2", "rope_scaling-default", "no-head_dim", "null-head_dim", "no-kv-heads",
        "null-kv-heads", "no-kv-heads-class-default"])
def test_config_json_variants(tmp_path, kind, settings, change):
    hf, folder = hf_model(tmp_path / "hf", kind, **settings)
    edit_config(folder, change)
    logits_close(hf, import_hf_model(folder), 400)


def test_bfloat16_weights_become_fp32(tmp_path):
    hf, folder = hf_model(tmp_path / "hf", "qwen2")
    hf.to(torch.bfloat16).save_pretrained(folder)
    ours = import_hf_model(folder)
    assert ours.wte.weight.dtype == torch.float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    logits_close(reference, ours, 400)


def test_sharded_weights(tmp_path, capsys, tokenizer_dir):
    vocab = vocab_of(tokenizer_dir)
    hf, folder = hf_model(tmp_path / "hf", "llama", tokenizer_dir, vocab)
    hf.save_pretrained(folder, max_shard_size="100KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    assert (folder / "model.safetensors.index.json").is_file()
    logits_close(hf, import_hf_model(folder), vocab)
    code, out, err = run_cli(["sample", "-c", folder, "-p", "def", "-n", "5", "--temperature", "0"], capsys)
    assert code == 0 and out.startswith("def"), err


def test_old_files_rotary_buffers_are_ignored(tmp_path):
    hf, folder = hf_model(tmp_path / "hf", "llama")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    logits_close(hf, import_hf_model(folder), 400)


def test_embedding_rows_beyond_the_tokenizer(tmp_path, tokenizer_dir):
    """Qwen pads its embedding (to a multiple of 128): the rows no token has are left out."""
    vocab = vocab_of(tokenizer_dir)
    hf, folder = hf_model(tmp_path / "hf", "qwen2", tokenizer_dir, vocab_size=512)
    import_hf(folder, tmp_path / "ckpt")
    ours, tokenizer = load_model(tmp_path / "ckpt")
    assert ours.config.vocab_size == tokenizer.vocab_size == vocab < 512
    assert not ours.lm_head.weight[vocab:].any() and not ours.wte.weight[vocab:].any()
    logits_close(hf, ours, vocab)


# --- export -----------------------------------------------------------------------------------


EXPORTS = {  # gptcli components -> the class that computes them
    "llama": ({}, "LlamaForCausalLM"),
    "llama-biases-tied": (dict(bias=True, tie_embeddings=True, norm_eps=1e-6), "LlamaForCausalLM"),
    "qwen2": (dict(attn_bias=True), "Qwen2ForCausalLM"),
    "qwen3": (dict(qk_norm=True, head_dim=32, mlp_hidden=96), "Qwen3ForCausalLM"),
    "mistral": (dict(n_head=3, n_kv_head=1, head_dim=32), "MistralForCausalLM"),  # 64 % 3: not Llama
}


@pytest.mark.parametrize("variant", EXPORTS)
def test_export_loads_in_transformers(tmp_path, variant):
    settings, architecture = EXPORTS[variant]
    model, ckpt = gptcli_checkpoint(tmp_path / "ckpt", llama_config(**settings))
    out = export_hf(ckpt, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5000.0
    assert (config["vocab_size"], config["max_position_embeddings"], config["eos_token_id"]) == (257, 128, 256)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == architecture and getattr(hf.config, "sliding_window", None) is None
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    logits_close(hf.eval(), model, 257)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_identical(tmp_path, tokenizer_dir, kind):
    _, folder = hf_model(tmp_path / "hf", kind, tokenizer_dir, vocab_of(tokenizer_dir))
    first = import_hf(folder, tmp_path / "a")
    exported = export_hf(first, tmp_path / "exported")
    for name in TOKENIZER_FILES:  # export writes GPT-2's tokenizer files only
        shutil.copy(tokenizer_dir / name, exported / name)
    second = import_hf(exported, tmp_path / "b")
    direct = import_hf_model(folder).state_dict()  # what the checkpoints must hold
    a, _ = load_model(first)
    b, _ = load_model(second)
    assert a.config == b.config
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, direct[name]) and torch.equal(x, y), name


def test_classifier_exports_as_sequence_classification(tmp_path):
    torch.manual_seed(2)
    model = GPTClassifier(GPT(llama_config(qk_norm=True)), ["neg", "pos", "neutral"])
    perturb(model, 3)
    ckpt = save_checkpoint(tmp_path / "cls", model.eval(), BytesTokenizer(), "# test\n")
    out = export_hf(ckpt, tmp_path / "exported")
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "Qwen3ForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    idx = torch.randint(0, 256, (2, 20))  # no padding id (256) inside: the last token is read
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx), atol=1e-5, rtol=0)


@needs_gpt2_ranks
def test_gpt2_tokenizer_travels_with_a_llama_export(tmp_path):
    tok = tiktoken_from_file(GPT2_TIKTOKEN)
    model = GPT(llama_config(vocab_size=50257))
    out = export_hf(save_checkpoint(tmp_path / "ckpt", model, tok, "# t\n"), tmp_path / "exported")
    text = "Hello world! naïve café"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == tok.encode(text)
    _, again = load_model(import_hf(out, tmp_path / "back"))  # vocab.json read back, offline
    assert again.encode(text) == tok.encode(text)


def test_gpt2_export_writes_q_k_v_biases_and_mlp_width(tmp_path):
    """GPT-2 can hold what gptcli's gpt2 arch varies within it: q/k/v-only biases (the
    others exported as zeros) and an MLP of another width (n_inner)."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, bias=False,
                      attn_bias=True, mlp_hidden=48, norm_eps=1e-6)
    model, ckpt = gptcli_checkpoint(tmp_path / "ckpt", cfg)
    out = export_hf(ckpt, tmp_path / "exported")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.n_inner == 48 and hf.config.layer_norm_epsilon == 1e-6
    logits_close(hf.eval(), model, 257, length=64)
    # and back: the width and epsilon are gptcli settings, so the export imports again
    back = import_hf_model(out)
    assert (back.config.mlp_hidden, back.config.norm_eps) == (48, 1e-6)
    logits_close(hf.eval(), back, 257, length=64)


# --- refusals ---------------------------------------------------------------------------------


def set_(**values):
    return lambda config: config.update(values)


def without(name):
    return lambda config: config.pop(name)


IMPORT_REFUSALS = [
    ("llama", set_(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     'rope_type="linear" is not supported'),
    ("llama", set_(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     'rope_type="llama3"'),
    ("qwen2", set_(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), 'rope_type="yarn"'),
    ("llama", set_(rope_scaling={"type": "dynamic", "factor": 2.0}), 'rope_type="dynamic"'),  # as 4.x wrote it
    ("qwen3", set_(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
    ("mistral", set_(sliding_window=64), "sliding_window=64 is shorter than the context"),
    ("qwen2", set_(use_sliding_window=True, sliding_window=64), "use_sliding_window=true"),
    ("qwen3", set_(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ("llama", set_(hidden_act="gelu"), 'hidden_act="gelu" is not supported'),
    ("llama", set_(attention_bias=True, mlp_bias=False), "attention_bias=true without mlp_bias"),
    ("llama", set_(attention_bias=False, mlp_bias=True), "mlp_bias=true without attention_bias"),
    ("qwen3", set_(attention_bias=True), "attention_bias=true (Qwen3 has no MLP biases)"),
    ("llama", without("hidden_size"), "holds a 'llama' model but config.json lacks 'hidden_size'"),
    ("qwen2", set_(num_key_value_heads=3), "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ("mistral", set_(rms_norm_eps=0), "rms_norm_eps must be a number greater than 0"),
    ("llama", set_(model_type="phi3"), "holds a 'phi3' model"),
    ("llama", set_(num_hidden_layers=10**9), "holds 2 blocks but config.json says num_hidden_layers=1000000000"),
    ("qwen3", set_(hidden_size=2**30), "parameters need at least"),
    ("llama", set_(intermediate_size=100), "model.layers.0.mlp.gate_proj.weight has shape [96, 64], but "
                                           "config.json implies [100, 64]"),
    ("qwen3", set_(tie_word_embeddings=False), "missing ['lm_head.weight']"),
    ("qwen2", set_(model_type="llama"), "unexpected ['model.layers.0.self_attn.k_proj.bias'"),
]


@pytest.mark.parametrize("kind, change, message", IMPORT_REFUSALS,
                         ids=[f"{kind}-{message[:30]}" for kind, _, message in IMPORT_REFUSALS])
def test_import_refuses(tmp_path, capsys, tokenizer_dir, kind, change, message):
    _, folder = hf_model(tmp_path / "hf", kind, tokenizer_dir)
    edit_config(folder, change)
    capsys.readouterr()  # transformers' progress bars
    code, _, err = run_cli(["import-hf", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup, message", [
    ("pickle", "has only pytorch_model.bin (a pickle"),
    ("lost shard", "which is not a file beside it"),
    ("lost tensor", "missing ['model.layers.1.mlp.up_proj.weight']"),
    ("no tokenizer", "has no tokenizer.json"),
    ("small tokenizer", "the tokenizer has 400 ids but the model 384 embedding rows"),
])
def test_import_refuses_files(tmp_path, capsys, tokenizer_dir, setup, message):
    hf, folder = hf_model(tmp_path / "hf", "llama", tokenizer_dir, vocab_size=384 if "small" in setup else 400)
    if setup == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    if setup == "lost shard":
        hf.save_pretrained(folder, max_shard_size="100KB")
        (folder / "model.safetensors").unlink(missing_ok=True)
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    if setup == "lost tensor":
        weights = load_file(folder / "model.safetensors")
        del weights["model.layers.1.mlp.up_proj.weight"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if setup == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    capsys.readouterr()  # transformers' progress bars
    code, _, err = run_cli(["import-hf", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, message", [
    (dict(mlp="relu2"), "model.mlp=relu2"),
    (dict(mlp="gelu"), "model.mlp=gelu"),
    (dict(logit_softcap=15.0), "model.logit_softcap=15.0"),
    (dict(position="learned"), "model.position=learned"),
    (dict(norm="layernorm"), "model.norm=layernorm"),
    (dict(qk_norm=True, attn_bias=True), "model.qk_norm with model.attn_bias"),
    (dict(qk_norm=True, bias=True), "model.qk_norm with model.bias"),
    (dict(bias=True, n_head=3, n_kv_head=1, head_dim=32), "model.bias with n_embd=64 not a multiple of n_head=3"),
    (dict(arch="gpt2", position="rope"), "model.position=rope"),
    (dict(arch="gpt2", norm="rmsnorm"), "model.norm=rmsnorm"),
    (dict(arch="gpt2", mlp="swiglu"), "model.mlp=swiglu"),
    (dict(arch="gpt2", mlp="relu2"), "model.mlp=relu2"),
    (dict(arch="gpt2", n_kv_head=2), "model.n_kv_head=2 with n_head=4"),
    (dict(arch="gpt2", head_dim=32), "model.head_dim=32"),
    (dict(arch="gpt2", qk_norm=True), "model.qk_norm"),
    (dict(arch="gpt2", tie_embeddings=False), "model.tie_embeddings=false"),
    (dict(arch="gpt2", logit_softcap=30.0), "model.logit_softcap=30.0"),
])
def test_export_refuses_what_no_class_computes(tmp_path, capsys, settings, message):
    cfg = llama_config(**{**({"n_kv_head": None} if settings.get("arch") == "gpt2" else {}), **settings})
    _, ckpt = gptcli_checkpoint(tmp_path / "ckpt", cfg)
    code, _, err = run_cli(["export-hf", ckpt, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and "cannot be exported" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(GptcliError, match="cannot be exported"):
        export_hf(ckpt, tmp_path / "out")


# --- the command line -------------------------------------------------------------------------


def test_cli_import_sample_export(tmp_path, capsys, tokenizer_dir):
    _, folder = hf_model(tmp_path / "hf", "qwen3", tokenizer_dir, vocab_of(tokenizer_dir))
    code, _, err = run_cli(["import-hf", folder, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["sample", "-c", tmp_path / "ckpt", "-p", "def", "-n", "8", "--temperature", "0"],
                             capsys)
    assert code == 0 and out.startswith("def"), err
    code, _, err = run_cli(["export-hf", tmp_path / "ckpt", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "qwen3"


# --- an imported chat model, used with no other file ------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A Qwen2-shaped chat model directory: a byte-level BPE with ChatML's special tokens
    (end of text <|endoftext|>, end of turn <|im_end|>) and its chat template."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=380, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([p.read_text() for p in sorted(SRC.rglob("*.py"))[:30]], trainer)
    folder = tmp_path_factory.mktemp("chat")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>",
                                                chat_template=CHATML)
    fast.save_pretrained(folder)
    hf_model(folder, "qwen2", vocab_size=model.get_vocab_size())
    return folder


def test_an_imported_chat_model_samples_with_its_template(tmp_path, capsys, chat_dir):
    from gptcli.data.tokenizers.chat_format import chat_stop_ids, prompt_ids

    code, _, err = run_cli(["import-hf", chat_dir, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _, tokenizer = load_model(tmp_path / "ckpt")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(chat_dir)
    expected = hf_tokenizer.apply_chat_template([{"role": "user", "content": "def f(x):"}],
                                                add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert prompt_ids(tokenizer, "def f(x):") == list(expected)
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in chat_stop_ids(tokenizer)
    code, out, err = run_cli(["sample", "-c", tmp_path / "ckpt", "-p", "def f(x):", "-n", "6",
                              "--temperature", "0"], capsys)
    assert code == 0, err
    assert "<|im_start|>" not in out  # the template's tokens are not echoed as text
    # --raw continues the prompt as plain text: the tokens a plain greedy decode gives
    model, _ = load_model(tmp_path / "ckpt")
    plain = generate_tokens(model.eval(), tokenizer.encode("def f(x):"), 6, SamplingSettings(temperature=0))
    expected_text = tokenizer.decode([t.item() for t in plain])
    code, out, err = run_cli(["sample", "-c", tmp_path / "ckpt", "-p", "def f(x):", "-n", "6",
                              "--temperature", "0", "--raw", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["text"] == expected_text


@pytest.mark.parametrize("task", ["lm", "instruct"])
def test_finetune_an_imported_directory_with_no_other_file(tmp_path, capsys, chat_dir, task):
    """The HF directory itself as init_from: its tokenizer.json alone tokenizes the data."""
    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    rows = [{"prompt": f"add {a} {b}", "response": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = {"out_dir": str(tmp_path / "ft"), "model": {"block_size": 64},
           "finetune": {"init_from": str(chat_dir), "patience": 0},
           "train": {"max_steps": 4, "eval_every": 2, "eval_batches": 1, "batch_size": 4,
                     "device": "cpu", "precision": "fp32"}}
    if task == "lm":
        cfg["data"] = {"inputs": [str(tmp_path / "corpus.txt")]}
    else:
        cfg["finetune"]["train_file"] = str(tmp_path / "sft.jsonl")
    (tmp_path / "ft.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    code, _, err = run_cli(["finetune", tmp_path / "ft.yaml", "--task", task], capsys)
    assert code == 0, err
    tuned, tokenizer = load_model(tmp_path / "ft" / "checkpoints" / "step-000004")
    assert tuned.arch == "llama" and tuned.config.attn_bias  # Qwen2's q/k/v biases came through
    assert tokenizer.encode("def add") == tokenizers.Tokenizer.from_file(
        str(chat_dir / "tokenizer.json")).encode("def add", add_special_tokens=False).ids


def test_post_training_an_imported_chat_model_uses_its_template(tmp_path, capsys, chat_dir):
    """instruct, dpo and grpo on an imported ChatML model: its template and end of turn, not
    gptcli's <|user|> tokens, and the loss covers exactly each reply's tokens and <|im_end|>."""
    from gptcli.data.tokenizers.chat_format import conversation_ids
    from gptcli.tasks.dpo import read_pairs

    code, _, err = run_cli(["import-hf", chat_dir, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _, tokenizer = load_model(tmp_path / "ckpt")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(chat_dir)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"},
                {"role": "user", "content": "and sub?"}, {"role": "assistant", "content": "return a - b"}]
    ids, learn = conversation_ids(tokenizer, messages)
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    learned = [token for token, wanted in zip(ids, learn) if wanted]
    replies = [hf_tokenizer.encode(m["content"], add_special_tokens=False) + [im_end] for m in messages[1::2]]
    assert learned == replies[0] + replies[1]
    (pair,) = read_pairs(numbered([{"prompt": "def add(a, b):", "chosen": "return a + b", "rejected": "pass"}]),
                         "p.jsonl", tokenizer)
    assert pair.chosen == replies[0] and pair.rejected == hf_tokenizer.encode("pass", add_special_tokens=False) + [im_end]

    rows = [{"prompt": f"add {a} {b}", "response": str(a + b), "answer": str(a + b),
             "chosen": str(a + b), "rejected": str(a - b - 1)} for a in range(6) for b in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for task in ("instruct", "dpo", "grpo"):
        cfg = {"out_dir": str(tmp_path / task), "model": {"block_size": 64},
               "finetune": {"init_from": str(tmp_path / "ckpt"), "patience": 0, "train_file": str(tmp_path / "data.jsonl"),
                            "grpo": {"group_size": 2, "max_new_tokens": 4}},
               "train": {"max_steps": 2, "eval_every": 2, "batch_size": 2, "device": "cpu", "precision": "fp32"}}
        (tmp_path / f"{task}.yaml").write_text(json.dumps(cfg))
        code, _, err = run_cli(["finetune", tmp_path / f"{task}.yaml", "--task", task], capsys)
        assert code == 0, err
        tuned, tuned_tokenizer = load_model(tmp_path / task / "checkpoints" / "step-000002")
        assert tuned_tokenizer.chat_template == tokenizer.chat_template and "<|user|>" not in tuned_tokenizer.special_tokens
        assert tuned.config.vocab_size == load_model(tmp_path / "ckpt")[0].config.vocab_size
