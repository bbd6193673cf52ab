"""The explicit CPU bf16 attention path against SDPA: same function, same gradients."""

import pytest
import torch
import torch.nn.functional as F

from gptcli.config import ModelConfig
from gptcli.model.attention import (
    EXPLICIT_MAX_CONTEXT,
    explicit_causal_attention,
    use_explicit_attention,
)
from gptcli.model.gpt import GPT


def _qkv(dtype, B=2, nh=3, T=17, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, T, hs, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _output_and_grads(fn, q, k, v):
    y = fn(q, k, v)
    y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.size(-1), dtype=y.dtype))
    return [y.detach().double()] + [t.grad.double() for t in (q, k, v)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_explicit_attention_equals_sdpa_in_fp64():
    # Same mathematics: in fp64 the two agree to rounding, output and all three gradients.
    ours = _output_and_grads(explicit_causal_attention, *_qkv(torch.float64))
    ref = _output_and_grads(_sdpa, *_qkv(torch.float64))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_explicit_attention_in_bf16_is_as_close_to_fp64_as_sdpa_is():
    ref = _output_and_grads(_sdpa, *_qkv(torch.float64, T=64, hs=32))
    ours = _output_and_grads(explicit_causal_attention, *_qkv(torch.bfloat16, T=64, hs=32))
    flash = _output_and_grads(_sdpa, *_qkv(torch.bfloat16, T=64, hs=32))
    for a, b, r in zip(ours, flash, ref):
        ours_err = ((a - r).norm() / r.norm()).item()
        flash_err = ((b - r).norm() / r.norm()).item()
        assert ours_err < 1e-2 and ours_err < 2 * flash_err + 1e-3


def test_explicit_attention_with_sharp_scores_stays_within_bf16_score_rounding():
    # Scores of std ~16 (q, k scaled by 4): the explicit path rounds them to bf16 before the
    # softmax (flash keeps them in fp32), so it is less exact here; measured ~0.8% vs 0.13%.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 32, generator=g).mul(4 if i < 2 else 1).bfloat16() for i in range(3))
    ref = _sdpa(q.double(), k.double(), v.double())
    ours = explicit_causal_attention(q, k, v).double()
    assert ((ours - ref).norm() / ref.norm()).item() < 0.02


def test_explicit_attention_is_causal():
    q, k, v = _qkv(torch.float64)
    y = explicit_causal_attention(q, k, v)
    v2 = v.detach().clone()
    v2[:, :, 10:] += 5.0  # change only later positions' values
    y2 = explicit_causal_attention(q, k, v2)
    torch.testing.assert_close(y[:, :, :10], y2[:, :, :10])
    assert not torch.allclose(y[:, :, 10:], y2[:, :, 10:])


def test_explicit_attention_dropout_zeroes_probabilities():
    torch.manual_seed(0)
    q, k, v = _qkv(torch.float64, T=32)
    v = torch.ones_like(v)  # with all-ones values, each output is the sum of kept probabilities
    y = explicit_causal_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(y, torch.ones_like(y))  # dropout changed some sums from 1
    assert abs(y.mean().item() - 1.0) < 0.1  # kept probabilities are scaled by 1/(1-p)


def test_explicit_path_chosen_only_for_cpu_bf16_training_at_short_context():
    def q(dtype=torch.bfloat16, T=64, grad=True):
        return torch.zeros(1, 1, T, 8, dtype=dtype, requires_grad=grad)

    assert use_explicit_attention(q())
    assert use_explicit_attention(q(T=EXPLICIT_MAX_CONTEXT))
    assert not use_explicit_attention(q(T=EXPLICIT_MAX_CONTEXT + 1))
    assert not use_explicit_attention(q(dtype=torch.float32))
    assert not use_explicit_attention(q(grad=False))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_bf16_training_step_matches_the_sdpa_path(monkeypatch, dropout):
    # The same model and batch under bf16 autocast, once through the explicit path and once
    # with it switched off: losses and gradients agree to bf16 precision.
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=dropout)
    idx = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        torch.manual_seed(0)
        model = GPT(cfg)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx) / idx.numel()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    import gptcli.model.attention as attention

    chosen = []
    decide = attention.use_explicit_attention
    monkeypatch.setattr(attention, "use_explicit_attention", lambda q: chosen.append(decide(q)) or chosen[-1])
    explicit_loss, explicit_grads = loss_and_grads()
    assert chosen == [True, True]  # both layers took the explicit path
    monkeypatch.setattr(attention, "use_explicit_attention", lambda q: False)
    sdpa_loss, sdpa_grads = loss_and_grads()
    if dropout == 0:
        assert explicit_loss == pytest.approx(sdpa_loss, rel=1e-2)
        cosine = F.cosine_similarity(explicit_grads, sdpa_grads, dim=0).item()
        assert cosine > 0.999
    else:  # different dropout masks: only the loss scale agrees
        assert explicit_loss == pytest.approx(sdpa_loss, rel=5e-2)


def test_activation_checkpointing_replays_the_explicit_path_exactly():
    # Recomputing blocks in backward (non-reentrant checkpoint) takes the same explicit path
    # with the same dropout mask: bit-identical loss and gradients under bf16 autocast.
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=0.1)
    idx = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(recompute):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.train()
        model.activation_checkpointing = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(False)
    recomputed_loss, recomputed_grads = loss_and_grads(True)
    assert plain_loss == recomputed_loss
    for a, b in zip(plain_grads, recomputed_grads):
        assert torch.equal(a, b)
