"""Parity with TRL's DPOTrainer: for the same weights (two small random checkpoints, the
reference and a perturbed policy, exported with export-hf) and the same pairs, in fp32,
gptcli's per-sequence log-probabilities, rewards and losses (sigmoid and IPO) equal TRL's
within 1e-5, per pair and as a batch mean; and gptcli's losses computed from TRL's own
log-probabilities are TRL's losses, so what differs end to end is fp32 rounding alone.

TRL logs only batch means (`trainer._metrics`), so each pair goes through its loss alone,
where the means are that pair's values; one batch of all the pairs then checks the mean
loss (with padding) and, through TRL's reference pass, the reference log-probabilities."""

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.data.text.records import numbered
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import load_model, save_checkpoint
from gptcli.store.hf import export_hf
from gptcli.tasks.dpo import PreferenceModel, pair_rows, read_pairs
from gptcli.train.preference import PreferenceSettings, pair_losses

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
pytestmark = pytest.mark.slow  # importing TRL takes seconds; then about 0.5 s a case on the CPU

BYTES = BytesTokenizer()
TOLERANCE = 1e-5
# beta per loss: DPO's usual 0.1. IPO's loss (margin - 1/(2 beta))^2 moves about 1/beta times
# as much as its margin: at beta 0.1 (losses near 25, where one fp32 step is 2e-6), rounding
# differences of one or two steps in the log-probabilities moved it by up to 2e-5; at 0.5
# (losses near 1), by under 4e-6.
BETAS = {"sigmoid": 0.1, "ipo": 0.5}

# Plain-text pairs: TRL appends its tokenizer's eos_token (gptcli's <|endoftext|>) to each
# answer, as gptcli appends end-of-text. Lengths differ so a batch of them is padded;
# the accented and non-Latin characters are several bytes each. The answers are short
# (at most 5 tokens): a random model gives each byte about -log(257) = -5.5, so every
# log-probability stays above -32, where fp32 resolves 2e-6, well inside TOLERANCE.
PAIRS = [
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " six"},
    {"prompt": "Coffee or tea?", "chosen": " té", "rejected": " no"},
    {"prompt": "Translate 'cat':", "chosen": " 猫", "rejected": " dog"},
    {"prompt": "x", "chosen": "yes", "rejected": " n"},
]

# Beyond the family's defaults: llama with grouped-query attention (two query heads share
# one key/value head), and with blocks that start as more than the identity.
ARCHS = {"gpt2": {}, "llama": {"n_kv_head": 1, "zero_init": False}}


def checkpoints(folder, arch: str):
    """A random 2-layer model of `arch` saved as the reference, then the same weights plus
    small noise saved as the policy, so that the log-ratios are not zero."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64,
                            vocab_size=BYTES.vocab_size, **ARCHS[arch])).eval()
    reference = save_checkpoint(folder / "reference", model, BYTES, "# parity\n")
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.02 * torch.randn_like(weight))
    return reference, save_checkpoint(folder / "policy", model, BYTES, "# parity\n")


def trl_trainer(folder, reference, policy, loss: str):
    """TRL's DPOTrainer on the exported checkpoints and PAIRS: fp32 on the CPU (TRL's
    default is bf16), the reference model run beside the policy (not precomputed)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_hf, policy_hf = export_hf(reference, folder / "reference-hf"), export_hf(policy, folder / "policy-hf")
    tokenizer = AutoTokenizer.from_pretrained(reference_hf)
    assert tokenizer.eos_token_id == BYTES.eot_id  # TRL's end of an answer is gptcli's
    args = trl.DPOConfig(output_dir=str(folder / "trl"), beta=BETAS[loss], loss_type=loss,
                         per_device_train_batch_size=len(PAIRS), precompute_ref_log_probs=False,
                         use_cpu=True, bf16=False, report_to="none")
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_hf, dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_hf, dtype=torch.float32),
                             args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    trainer.model.train()  # as in a training step: its statistics go to _metrics["train"] (dropout is off)
    return trainer


def trl_loss(trainer, batch: dict) -> tuple[float, dict[str, float]]:
    """TRL's loss of a batch of its collator, and the batch means it logged for it."""
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    return float(loss), {name: values[-1] for name, values in logged.items()}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trl_and_gptcli_agree(tmp_path, monkeypatch, arch, loss):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    reference, policy = checkpoints(tmp_path, arch)
    trainer = trl_trainer(tmp_path, reference, policy, loss)
    rows = list(trainer.train_dataset)

    # The same tokens: TRL's split of prompt+answer+eos is gptcli's prompt and answer apart.
    pairs = read_pairs(numbered(PAIRS), "pairs", BYTES)
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == \
        [(p.prompt, p.chosen, p.rejected) for p in pairs]

    # gptcli: all P pairs as one padded batch, idx and labels (2P, T), through the
    # reference's sequence_logps and the policy's pair_losses, as a training run does.
    settings = PreferenceSettings(loss, BETAS[loss])
    idx, labels = pair_rows(pairs, BYTES.eot_id, torch.device("cpu"))
    with torch.no_grad():
        ref_logps, _ = PreferenceModel(load_model(reference)[0], settings).sequence_logps(idx, labels)  # (2P,)
        ours, logps = PreferenceModel(load_model(policy)[0], settings).pair_losses(idx, labels, ref_logps)
    P = len(pairs)
    # The policy is not the reference: its rewards are, on average, far from zero at this tolerance.
    assert torch.cat([ours.chosen_rewards, ours.rejected_rewards]).abs().mean() > 100 * TOLERANCE

    for i, row in enumerate(rows):  # TRL, one pair per batch: its means are this pair's values
        batch = trainer.data_collator([row])  # input_ids (2, T): the chosen row, then the rejected
        their_loss, theirs = trl_loss(trainer, batch)
        assert logps[i].item() == pytest.approx(theirs["logps/chosen"], abs=TOLERANCE)
        assert logps[P + i].item() == pytest.approx(theirs["logps/rejected"], abs=TOLERANCE)
        assert ours.chosen_rewards[i].item() == pytest.approx(theirs["rewards/chosen"], abs=TOLERANCE)
        assert ours.rejected_rewards[i].item() == pytest.approx(theirs["rewards/rejected"], abs=TOLERANCE)
        assert ours.losses[i].item() == pytest.approx(their_loss, abs=TOLERANCE)
        # The formulas alone: gptcli's loss of TRL's own log-probabilities (its policy's,
        # logged; its reference's, from the same reference pass) is TRL's loss.
        their_ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)  # (1,) chosen, (1,) rejected
        counts = [torch.tensor([float(len(row[name]))]) for name in ("chosen_ids", "rejected_ids")]  # answer tokens
        from_theirs = pair_losses(torch.tensor([theirs["logps/chosen"]]), torch.tensor([theirs["logps/rejected"]]),
                                  *counts, settings, *their_ref)
        assert from_theirs.losses.item() == pytest.approx(their_loss, rel=1e-6)

    # TRL, all pairs in one padded batch: the mean loss, and its reference pass per sequence.
    batch = trainer.data_collator(rows)  # input_ids (2P, T)
    their_loss, _ = trl_loss(trainer, batch)
    assert ours.losses.mean().item() == pytest.approx(their_loss, abs=TOLERANCE)
    their_ref_chosen, their_ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)  # (P,) each
    assert torch.allclose(ref_logps, torch.cat([their_ref_chosen, their_ref_rejected]), rtol=0, atol=TOLERANCE)
