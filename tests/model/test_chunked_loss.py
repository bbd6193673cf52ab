"""The loss in chunks of rows (gpt.chunked_cross_entropy): the same loss and gradients as
one cross-entropy over the whole batch's logits, for both recipes, tied and untied heads,
a soft-capped head, ignored targets, weights, bf16 and fp16 autocast, chunks that do not
divide the rows; and the classifier's auxiliary LM loss through it."""

import pytest
import torch
import torch.nn.functional as F

import gptcli.model.gpt as gpt
from gptcli.config import ModelConfig
from gptcli.model.gpt import GPT, IGNORE_INDEX
from gptcli.model.heads import GPTClassifier

VOCAB = 100  # 128 rows once padded: the padded rows must take no probability
B, T = 3, 17  # 51 rows


def build(arch: str, **overrides) -> GPT:
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=VOCAB,
                      dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # llama starts its projections and head at zero, hiding mistakes
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, T), generator=generator)
    targets = torch.randint(0, VOCAB, (B, T), generator=generator)
    targets[0, :12] = IGNORE_INDEX  # a whole 7-row chunk and part of the next ignored
    targets[2, -1] = IGNORE_INDEX
    return idx, targets


def whole_batch_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss before chunking: every logit of the batch at once."""
    logits = model.logits(model.hidden_states(idx))
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(model: GPT, loss_fn, autocast: torch.dtype | None = None, scale: float = 0.25):
    """The loss and every parameter's gradient of `scale * loss` (as the loop divides by
    the target count), from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = loss_fn()
    (scale * loss).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_fp32_close(grad: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Equal but for fp32 rounding: the head's gradient is summed over chunks in another order."""
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=name)


@pytest.fixture
def chunk_rows_7(monkeypatch):
    monkeypatch.setattr(gpt, "LOSS_CHUNK_LOGITS", 7 * VOCAB)  # 7 rows: 51 = 7 * 7 + 2
    assert gpt.loss_chunk_rows(VOCAB) == 7


CASES = {
    "gpt2 tied": ("gpt2", {}),
    "gpt2 untied": ("gpt2", {"tie_embeddings": False}),
    "llama untied softcap": ("llama", {"logit_softcap": 15.0}),
    "llama tied qk_norm": ("llama", {"tie_embeddings": True, "qk_norm": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_fp32_loss_and_gradients_equal_the_whole_batch_path(case, chunk_rows_7):
    arch, overrides = CASES[case]
    model = build(arch, **overrides)
    idx, targets = batch()
    loss, grads = loss_and_grads(model, lambda: model(idx, targets))
    ref_loss, ref_grads = loss_and_grads(model, lambda: whole_batch_loss(model, idx, targets))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        assert_fp32_close(grad, ref_grads[name], name)
    if not model.config.tie_embeddings:  # an untied head's padding rows: never a probability, no gradient
        assert (grads["lm_head.weight"][VOCAB:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["gpt2 tied", "llama untied softcap"])
def test_autocast_loss_and_gradients_match_the_whole_batch_path(case, dtype, chunk_rows_7):
    """bf16: the gradients formed in the forward pass; fp16: checkpointed chunks (its loss
    scale reaches the logits' gradients). Both round differently from one big product
    (the head's gradient is summed in fp32 over chunks), hence a tolerance."""
    arch, overrides = CASES[case]
    model = build(arch, **overrides)
    idx, targets = batch()
    loss, grads = loss_and_grads(model, lambda: model(idx, targets), autocast=dtype)
    ref_loss, ref_grads = loss_and_grads(model, lambda: whole_batch_loss(model, idx, targets), autocast=dtype)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        error = (grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert error < 1e-2, (name, error.item())


def test_one_chunk_and_many_agree(monkeypatch):
    model = build("gpt2")
    idx, targets = batch()
    losses = {}
    for rows in (1, 7, 50, 51, 1000):
        monkeypatch.setattr(gpt, "LOSS_CHUNK_LOGITS", rows * VOCAB)
        losses[rows], _ = loss_and_grads(model, lambda: model(idx, targets))
    for rows, loss in losses.items():
        torch.testing.assert_close(loss, losses[1000], rtol=1e-6, atol=0, msg=str(rows))


def test_without_gradients_the_loss_is_the_same(chunk_rows_7):
    model = build("llama", logit_softcap=15.0)
    idx, targets = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets), whole_batch_loss(model, idx, targets), rtol=1e-6, atol=0)
    model.requires_grad_(False)  # grads on, but nothing to differentiate
    torch.testing.assert_close(model(idx, targets), whole_batch_loss(model, idx, targets), rtol=1e-6, atol=0)


def test_weighted_rows(chunk_rows_7):
    model = build("gpt2", tie_embeddings=False)
    idx, targets = batch()
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(2))

    def reference():
        logits = model.logits(model.hidden_states(idx)).float()
        per_row = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return (per_row * weights).sum()

    loss, grads = loss_and_grads(model, lambda: model.loss(model.hidden_states(idx), targets, weights))
    ref_loss, ref_grads = loss_and_grads(model, reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        assert_fp32_close(grad, ref_grads[name], name)


def test_a_second_backward_through_the_loss_is_refused(chunk_rows_7):
    model = build("gpt2")
    loss = model(*batch())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_classifier_auxiliary_lm_loss_equals_per_sequence_means(chunk_rows_7):
    torch.manual_seed(0)
    model = GPTClassifier(build("gpt2"), ["a", "b", "c"], aux_lm_weight=0.5)
    idx, _ = batch()
    lengths, labels = torch.tensor([17, 5, 1]), torch.tensor([0, 2, 1])

    def reference():  # the auxiliary loss as it was: every logit at once, a mean per sequence
        hidden = model.hidden_states(idx)
        class_logits = model.score(hidden[torch.arange(B), lengths - 1])
        next_ids = idx[:, 1:].masked_fill(torch.arange(1, T) >= lengths[:, None], IGNORE_INDEX)
        per_token = F.cross_entropy(model.logits(hidden[:, :-1]).float().transpose(1, 2), next_ids,
                                    ignore_index=IGNORE_INDEX, reduction="none")
        lm = (per_token.sum(1) / (lengths - 1).clamp(min=1)).sum()
        return F.cross_entropy(class_logits.float(), labels, reduction="sum") + 0.5 * lm

    loss, grads = loss_and_grads(model, lambda: model(idx, labels, lengths=lengths))
    ref_loss, ref_grads = loss_and_grads(model, reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        assert_fp32_close(grad, ref_grads[name], name)
