import math

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.model.gpt import GPT, IGNORE_INDEX


def make(**overrides) -> GPT:
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16,
                         "vocab_size": 100, **overrides})
    torch.manual_seed(0)
    return GPT(cfg).eval()


def test_shapes_and_padded_vocab():
    model = make()
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100)  # padding (to 128 rows) never reaches the softmax
    assert model.lm_head.weight.shape == (128, 32) and model.lm_head.weight is model.wte.weight


def test_gpt2_parameter_names():
    names = set(make(bias=True).state_dict())
    expected = {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight",
                "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.ln_2.weight", "h.0.mlp.c_fc.weight",
                "h.1.mlp.c_proj.bias", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    assert expected <= names
    assert not any(n.endswith("bias") for n in make(bias=False).state_dict())


def test_causality():
    """Changing token t never changes the outputs at positions before t."""
    model = make()
    idx = torch.randint(0, 100, (1, 16))
    base = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 100
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_loss_is_summed_cross_entropy_with_ignored_targets():
    model = make()
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    targets[0, :5] = IGNORE_INDEX
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), targets.view(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(model(idx, targets), expected)


def test_initial_loss_is_near_uniform():
    model = make(vocab_size=100)
    idx, targets = torch.randint(0, 100, (2, 4, 16))
    loss = model(idx, targets) / idx.numel()
    assert abs(loss.item() - math.log(100)) < 0.3


def test_residual_projections_scaled():
    model = make(n_layer=8, n_embd=256, n_head=4)
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("bias", [True, False])
def test_kv_cache_matches_full_forward(bias):
    """Prefill a prompt then decode token by token: logits equal a full causal pass."""
    model = make(bias=bias)
    idx = torch.randint(0, 100, (2, 12))
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2, length=16)
    hidden = model.hidden_states(idx[:, :5], cache, torch.arange(5))
    torch.testing.assert_close(model.logits(hidden), full[:, :5], atol=1e-5, rtol=1e-4)
    for t in range(5, 12):
        step = model.logits(model.hidden_states(idx[:, t:t + 1], cache, torch.tensor([t])))
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4)


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    idx = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_kv_cache_takes_chunks_anywhere_and_hides_stale_slots():
    """A sequence written in chunks at any position equals a full pass, also in a cache that
    still holds a longer earlier sequence (the sliding-window rewrite): the mask hides it."""
    model = make()
    old, idx = torch.randint(0, 100, (2, 1, 16))
    full = model(idx[:, :10])
    cache = model.new_kv_cache(batch_size=1, length=16)
    model.hidden_states(old, cache, torch.arange(16))
    model.hidden_states(idx[:, :4], cache, torch.arange(4))
    hidden = model.hidden_states(idx[:, 4:10], cache, torch.arange(4, 10))
    torch.testing.assert_close(model.logits(hidden), full[:, 4:], atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputed blocks replay the same dropout masks: identical numbers, less memory."""
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.2)
    x, y = torch.randint(0, 50, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.activation_checkpointing = recompute
        torch.manual_seed(7)  # the same dropout stream for both
        loss = model(x, targets=y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)
