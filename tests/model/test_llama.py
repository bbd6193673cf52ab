"""The llama recipe and the component keys: rotary positions, grouped-query attention with
a KV cache, parameter counts, the layouts of both recipes, config resolution, vocabulary
and context surgery, and activation checkpointing."""

import math

import pytest
import torch
from conftest import gpt2_shapes
from torch import nn

from gptcli.config import ModelConfig, load_config
from gptcli.errors import GptcliError
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.model.gpt import GPT, count_params
from gptcli.model.rope import RotaryEmbedding, apply_rotary

VOCAB = 100  # 128 rows once padded


def build(**overrides) -> GPT:
    cfg = ModelConfig(**{"arch": "llama", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32,
                         "vocab_size": VOCAB, **overrides})
    torch.manual_seed(0)
    return GPT(cfg).eval()


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """Add noise to every weight: llama starts its output projections and head at zero,
    which would hide most mistakes in attention and in the head."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


# --- rotary embeddings ---------------------------------------------------------------------

def _rotated_score(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """q at position m against k at position n, both rotated; q, k (1, 1, 1, hs)."""
    cos, sin = rope(torch.tensor([m, n]), torch.float64)
    return (apply_rotary(q, cos[:1], sin[:1]) * apply_rotary(k, cos[1:], sin[1:])).sum()


@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_rope_scores_depend_only_on_the_gap(head_dim):
    rope = RotaryEmbedding(head_dim, 10000.0)
    generator = torch.Generator().manual_seed(head_dim)
    for _ in range(3):
        q, k = torch.randn(2, 1, 1, 1, head_dim, generator=generator, dtype=torch.float64)
        for m, n in [(5, 2), (0, 0), (3, 9)]:
            base = _rotated_score(rope, q, k, m, n)
            for shift in (1, 7, 50, 300):
                shifted = _rotated_score(rope, q, k, m + shift, n + shift)
                # The angles are computed in fp32 (rope.py): rounding of order 1e-5 at position 300.
                torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
            # Another gap gives another score: the positions are not ignored.
            assert abs(_rotated_score(rope, q, k, m + 1, n) - base) > 1e-3
            assert abs(_rotated_score(rope, q, k, m, n + 3) - base) > 1e-3


def test_rope_is_a_rotation_and_position_zero_is_the_identity():
    rope = RotaryEmbedding(16, 10000.0)
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cos, sin = rope(torch.arange(5) * 11, torch.float64)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # lengths kept
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0], rtol=0, atol=0)  # angle 0
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:])
    # Hugging Face's "rotate half" layout: dimension i pairs with i + hs/2 (same angle).
    torch.testing.assert_close(cos[:, :8], cos[:, 8:], rtol=0, atol=0)
    # The first pair turns one radian per position, the slowest theta^(-14/16) of that.
    torch.testing.assert_close(cos[1, 0], torch.tensor(math.cos(11.0), dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[1, 7], torch.tensor(math.sin(11 * 10000 ** (-14 / 16)), dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


# --- KV cache with grouped-query attention -------------------------------------------------

GQA_VARIANTS = [
    {"n_kv_head": 2, "qk_norm": True, "attn_bias": True},
    {"n_kv_head": 1, "qk_norm": True, "attn_bias": True, "logit_softcap": 15.0},  # multi-query
    {"n_kv_head": 2, "head_dim": 12, "mlp": "relu2"},
]


@pytest.mark.parametrize("overrides", GQA_VARIANTS)
def test_llama_kv_cache_decoding_equals_the_full_forward(overrides):
    model = perturb(build(**overrides))
    cfg = model.config
    idx = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(batch_size=2, length=24)
        # The cache keeps the key/value heads only: n_kv_head, not n_head.
        assert len(cache.k) == len(cache.v) == 2
        assert cache.k[0].shape == cache.v[1].shape == (2, cfg.n_kv_head, 24, cfg.head_dim)
        hidden = model.hidden_states(idx[:, :6], cache, torch.arange(6))
        torch.testing.assert_close(model.logits(hidden), full[:, :6], atol=1e-5, rtol=1e-4)
        for t in range(6, 14):
            step = model.logits(model.hidden_states(idx[:, t:t + 1], cache, torch.tensor([t])))
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4)
        assert cache.k[0][:, :, :14].abs().sum() > 0 and cache.k[0][:, :, 14:].abs().sum() == 0


def test_grouped_query_attention_equals_full_attention_with_shared_heads():
    """A GQA model computes what a multi-head model computes when each key/value head is
    copied to the query heads of its group (heads 0, 1 -> kv 0; heads 2, 3 -> kv 1)."""
    gqa = perturb(build(n_kv_head=2, qk_norm=True, attn_bias=True))
    mha = build(n_kv_head=4, qk_norm=True, attn_bias=True)
    hs, nh = 8, 4
    state = gqa.state_dict()
    for i in range(2):
        name = f"h.{i}.attn.c_attn"
        for suffix in ("weight", "bias"):
            fused = state[f"{name}.{suffix}"]
            q, k, v = fused.split([nh * hs, 2 * hs, 2 * hs])
            # kv head j serves query heads 2j and 2j + 1: repeat every head's rows twice.
            grouped = [t.reshape(2, hs, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(nh * hs, *t.shape[1:])
                       for t in (k, v)]
            state[f"{name}.{suffix}"] = torch.cat([q, *grouped])
    mha.load_state_dict(state)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-5, rtol=1e-4)
        wrong = {**state, "h.0.attn.c_attn.weight": state["h.0.attn.c_attn.weight"].flip(0)}
        mha.load_state_dict(wrong)
        assert not torch.allclose(mha(idx), gqa(idx), atol=1e-3)


def _greedy_by_full_forwards(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens, recomputing every step from the token window: once the window passes
    the context it restarts from its last half (generate_tokens' sliding rule)."""
    context, window, out = model.config.block_size, list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([window]))[0, -1].argmax())
            out.append(token)
            window.append(token)
            if len(window) > context:
                window = window[-(context // 2):]
    return out


@pytest.mark.parametrize("block_size, steps", [(32, 12), (16, 30)])
def test_llama_greedy_generation_equals_argmax_of_full_forwards(block_size, steps):
    model = perturb(build(n_kv_head=2, qk_norm=True, attn_bias=True, block_size=block_size), scale=0.3)
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        cached = [int(t) for t in generate_tokens(model, prompt, steps, SamplingSettings(temperature=0))]
    expected = _greedy_by_full_forwards(model, prompt, steps)
    assert cached == expected
    assert len(set(expected)) > 1  # the weights say something: not one token repeated


# --- parameter counts and layouts ----------------------------------------------------------

COUNTED = {
    "llama": {},
    "llama-gqa": {"n_kv_head": 2},
    "llama-mqa-wide-heads": {"n_kv_head": 1, "head_dim": 12},
    "llama-n_embd-not-divisible": {"n_embd": 30, "head_dim": 8},
    "llama-qk_norm": {"qk_norm": True},
    "llama-attn_bias": {"attn_bias": True},
    "llama-relu2": {"mlp": "relu2"},
    "llama-gelu": {"mlp": "gelu"},
    "llama-tied": {"tie_embeddings": True},
    "llama-layernorm": {"norm": "layernorm"},  # bias false: a gain only
    "llama-mlp_hidden-softcap": {"mlp_hidden": 40, "logit_softcap": 15.0},
    "llama-all": {"n_kv_head": 2, "head_dim": 6, "qk_norm": True, "attn_bias": True, "bias": True,
                  "norm": "layernorm", "mlp": "relu2", "tie_embeddings": True},
    "gpt2": {"arch": "gpt2"},
    "gpt2-untied": {"arch": "gpt2", "tie_embeddings": False},
    "gpt2-no-bias": {"arch": "gpt2", "bias": False},
    "gpt2-rope": {"arch": "gpt2", "position": "rope"},
    "gpt2-rope-gelu-rmsnorm": {"arch": "gpt2", "position": "rope", "norm": "rmsnorm"},
    "gpt2-swiglu-gqa-attn_bias": {"arch": "gpt2", "mlp": "swiglu", "n_kv_head": 2, "attn_bias": True,
                                  "bias": False},
}


@pytest.mark.parametrize("overrides", COUNTED.values(), ids=COUNTED.keys())
def test_count_params_equals_the_built_model(overrides):
    cfg = ModelConfig(**{"arch": "llama", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16,
                         "vocab_size": VOCAB, **overrides})
    model = GPT(cfg)
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}  # a tied head once
    assert count_params(cfg) == model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params() == sum(unique.values())
    positions = 16 * model.config.n_embd if model.wpe is not None else 0
    assert model.num_params(include_positions=False) == model.num_params() - positions
    idx = torch.randint(0, VOCAB, (1, 16))
    assert model(idx).shape == (1, 16, VOCAB)  # every combination runs


def test_gpt2_state_dict_is_exactly_gpt2s():
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=VOCAB))
    expected = gpt2_shapes(n_layer=2, C=32, vocab_rows=128, block_size=16) | {"lm_head.weight": (128, 32)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.wte.weight and model.rotary is None
    assert isinstance(model.h[0].ln_1, nn.LayerNorm) and model.h[0].attn.q_norm is None
    assert not any(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith("weight")
                   and "ln" not in n)  # gpt2 initialises nothing at zero but biases


def test_llama_layout_and_initialisation():
    model = build(n_kv_head=2)
    C, hs, H = 32, 8, 128  # swiglu: 8/3 * 32 rounded up to a multiple of 64
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.wpe is None and not any(k.startswith("wpe") for k in shapes)
    assert not any(k.endswith("bias") for k in shapes)
    assert shapes["h.0.attn.c_attn.weight"] == ((4 + 2 * 2) * hs, C)  # q: 4 heads, k and v: 2 each
    assert shapes["h.0.attn.c_proj.weight"] == (C, 4 * hs)
    assert shapes["h.1.mlp.c_fc.weight"] == (2 * H, C) and shapes["h.1.mlp.c_proj.weight"] == (C, H)
    assert shapes["lm_head.weight"] == shapes["wte.weight"] == (128, C)
    assert isinstance(model.h[0].ln_1, nn.RMSNorm) and isinstance(model.ln_f, nn.RMSNorm)
    # Untied: two tensors, two storages.
    assert model.lm_head.weight is not model.wte.weight
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    # Zero-initialised: every block's output projections and the head; the rest is N(0, 0.02).
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert torch.all(p == 0), name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.005, name
        else:
            assert torch.all(p == 1), name  # RMSNorm gains
    # So each block starts as the identity and the first loss is exactly uniform.
    idx, targets = torch.randint(0, VOCAB, (2, 2, 16))
    torch.testing.assert_close(model(idx, targets) / idx.numel(), torch.tensor(math.log(VOCAB)))
    # Training moves the head away from zero: the untied head is a trainable tensor of its own.
    model.train()
    model(idx, targets).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert not torch.equal(model.lm_head.weight.grad, model.wte.weight.grad)


# --- config ---------------------------------------------------------------------------------

def test_arch_fills_empty_component_keys():
    llama = load_config(None, ["model.arch=llama"]).model
    assert (llama.position, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings, llama.zero_init) == (
        "rope", "rmsnorm", "swiglu", False, False, True)
    assert (llama.n_kv_head, llama.head_dim, llama.mlp_hidden) == (12, 64, 2048)  # 8/3 * 768 = 2048
    gpt2 = load_config(None, []).model
    assert (gpt2.arch, gpt2.position, gpt2.norm, gpt2.mlp, gpt2.bias, gpt2.tie_embeddings, gpt2.zero_init) == (
        "gpt2", "learned", "layernorm", "gelu", True, True, False)
    assert (gpt2.n_kv_head, gpt2.head_dim, gpt2.mlp_hidden) == (12, 64, 3072)
    assert (gpt2.qk_norm, gpt2.attn_bias, gpt2.logit_softcap) == (False, False, 0.0)
    assert llama.resolved() == llama and ModelConfig(arch="llama").resolved().resolved() == llama
    # swiglu's default hidden width rounds 8/3 x n_embd up to a multiple of 64.
    assert ModelConfig(arch="llama", n_embd=32, n_head=4).resolved().mlp_hidden == 128
    assert ModelConfig(arch="llama", n_embd=100, n_head=4).resolved().mlp_hidden == 320


def test_explicit_keys_beat_the_arch():
    cfg = load_config(None, ["model.arch=llama", "model.mlp=relu2", "model.tie_embeddings=true",
                             "model.zero_init=false"]).model
    assert (cfg.mlp, cfg.tie_embeddings, cfg.zero_init) == ("relu2", True, False)
    assert cfg.mlp_hidden == 4 * 768 and (cfg.position, cfg.norm, cfg.bias) == ("rope", "rmsnorm", False)
    cfg = load_config(None, ["model.position=rope", "model.n_kv_head=4", "model.head_dim=32",
                             "model.mlp_hidden=1000"]).model  # arch gpt2 with llama parts
    assert (cfg.arch, cfg.position, cfg.norm, cfg.bias, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden) == (
        "gpt2", "rope", "layernorm", True, 4, 32, 1000)
    model = GPT(ModelConfig(**{**cfg.__dict__, "n_layer": 1, "n_embd": 64, "n_head": 4, "n_kv_head": 2,
                               "head_dim": 8, "mlp_hidden": 24, "vocab_size": 50}))
    assert model.wpe is None and model.rotary is not None and model.h[0].mlp.c_fc.out_features == 24


def test_n_kv_head_must_divide_n_head():
    assert load_config(None, ["model.arch=llama", "model.n_kv_head=3"]).model.n_kv_head == 3  # 12 = 4 x 3
    with pytest.raises(GptcliError, match=r"model\.n_kv_head: 5 does not divide model\.n_head=12"):
        load_config(None, ["model.arch=llama", "model.n_kv_head=5"])
    with pytest.raises(GptcliError, match=r"model\.n_kv_head: 24 does not divide model\.n_head=12"):
        load_config(None, ["model.n_kv_head=24"])
    with pytest.raises(GptcliError, match=r"model\.n_kv_head: must be at least 1, got 0"):
        load_config(None, ["model.n_kv_head=0"])


def test_rope_needs_an_even_head_width():
    with pytest.raises(GptcliError, match=r"model\.head_dim: rotary embeddings rotate pairs.*got 7"):
        load_config(None, ["model.arch=llama", "model.head_dim=7"])
    with pytest.raises(GptcliError, match=r"model\.head_dim: .*must be even, got 9"):
        load_config(None, ["model.arch=llama", "model.n_embd=36", "model.n_head=4"])  # 36 / 4 = 9
    with pytest.raises(GptcliError, match=r"must be even, got 9"):
        load_config(None, ["model.position=rope", "model.n_embd=36", "model.n_head=4"])
    # Learned positions rotate nothing: an odd head width is fine there.
    assert load_config(None, ["model.n_embd=36", "model.n_head=4"]).model.head_dim == 9
    assert load_config(None, ["model.arch=llama", "model.position=learned", "model.head_dim=7"]).model.head_dim == 7


def test_n_embd_not_divisible_by_n_head_needs_head_dim():
    with pytest.raises(GptcliError, match=r"model\.n_embd: 100 is not divisible by model\.n_head=12; "
                                          r"change one, or set model\.head_dim"):
        load_config(None, ["model.arch=llama", "model.n_embd=100"])
    cfg = load_config(None, ["model.arch=llama", "model.n_embd=100", "model.head_dim=8"]).model
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (100, 12, 8)
    model = GPT(ModelConfig(arch="llama", n_layer=1, n_head=3, n_embd=20, head_dim=8, block_size=8, vocab_size=30))
    assert model.h[0].attn.c_attn.weight.shape == (3 * 3 * 8, 20) and model.h[0].attn.c_proj.weight.shape == (20, 24)
    assert model(torch.randint(0, 30, (2, 8))).shape == (2, 8, 30)


# --- vocabulary and context surgery ---------------------------------------------------------

@pytest.mark.parametrize("new_vocab, tied", [(130, False), (110, False), (130, True)])
def test_resize_vocab_on_llama(new_vocab, tied):
    model = perturb(build(tie_embeddings=tied))
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(idx)
    wte, head = model.wte.weight.clone(), model.lm_head.weight.clone()
    model.resize_vocab(new_vocab)
    rows = math.ceil(new_vocab / 64) * 64
    assert model.config.vocab_size == new_vocab
    assert model.wte.weight.shape == model.lm_head.weight.shape == (rows, 32)
    assert (model.lm_head.weight is model.wte.weight) == tied
    # Old rows kept; new rows start at the mean of the old ones, of each matrix its own.
    assert torch.equal(model.wte.weight[:VOCAB], wte[:VOCAB])
    assert torch.equal(model.lm_head.weight[:VOCAB], head[:VOCAB])
    for new, old in ((model.wte.weight, wte), (model.lm_head.weight, head)):
        torch.testing.assert_close(new[VOCAB:new_vocab], old[:VOCAB].mean(0).expand(new_vocab - VOCAB, -1))
    if not tied:
        assert not torch.allclose(wte[:VOCAB].mean(0), head[:VOCAB].mean(0))  # two different means
    with torch.no_grad():
        after = model(idx)
        assert after.shape == (2, 12, new_vocab)
        torch.testing.assert_close(after[..., :VOCAB], before, rtol=0, atol=0)  # old ids: same logits
        # A new token is read as the average known token, and every new id scores the same.
        assert torch.equal(after[..., VOCAB], after[..., new_vocab - 1])
        model(torch.full((1, 4), new_vocab - 1))  # the new ids embed


def test_crop_context_on_llama_keeps_outputs():
    model = perturb(build(n_kv_head=2, qk_norm=True))
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(idx)
    parameters = {n: p.clone() for n, p in model.state_dict().items()}
    model.crop_context(16)
    assert model.config.block_size == 16 and model.wpe is None  # rope: no table to crop
    assert model.state_dict().keys() == parameters.keys()
    assert all(torch.equal(model.state_dict()[n], p) for n, p in parameters.items())
    assert model.new_kv_cache(1, 100).length == 16
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    # The gpt2 recipe crops its position table in the same call.
    gpt2 = build(arch="gpt2")
    gpt2.crop_context(8)
    assert gpt2.wpe.weight.shape == (8, 32) and gpt2(torch.randint(0, VOCAB, (1, 8))).shape == (1, 8, VOCAB)


# --- activation checkpointing ---------------------------------------------------------------

def test_activation_checkpointing_on_llama_gives_the_same_loss_and_gradients():
    x, y = torch.randint(0, VOCAB, (2, 3, 24), generator=torch.Generator().manual_seed(8))
    results = []
    for recompute in (False, True):
        model = perturb(build(n_layer=3, n_kv_head=2, qk_norm=True, attn_bias=True, dropout=0.2)).train()
        model.activation_checkpointing = recompute
        torch.manual_seed(7)  # the same dropout stream for both
        loss = model(x, targets=y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name  # every weight, q_norm and the zero-init ones too, learns
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-7)
    # Checkpointing is for training only: in eval mode or without gradients nothing changes.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
