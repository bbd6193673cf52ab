"""Preference tuning (`finetune --task dpo`): the losses against the papers' formulas by
hand, pairs read with every refusal naming its line, rows whose labels are exactly the
answers, sequence log-probabilities against a full log-softmax, and runs: TRL's metric
names for training and validation, the best checkpoint by reward accuracy, a checkpoint
that is a language model, LoRA, and a bit-identical resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import pretrained_base

from gptcli.config import FinetuneRunConfig, ModelConfig, config_from_dict
from gptcli.data.text.records import numbered
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS, END
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.events import StepLogged
from gptcli.infer.load import checkpoint_kind
from gptcli.model.gpt import GPT, IGNORE_INDEX
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.dpo import STATS, PreferenceModel, fitting, pair_rows, read_pairs
from gptcli.tasks.finetune import finetune
from gptcli.train.preference import PreferenceSettings, pair_losses

BYTES = BytesTokenizer()


def test_losses_follow_the_papers_formulas():
    pc, pr = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -4.0])  # policy: summed log-probabilities
    rc, rr = torch.tensor([-6.0, -8.0]), torch.tensor([-6.5, -5.0])  # reference
    nc, nr = torch.tensor([4.0, 6.0]), torch.tensor([5.0, 2.0])  # answer tokens
    beta = 0.2
    out = pair_losses(pc, pr, nc, nr, PreferenceSettings("sigmoid", beta), rc, rr)
    for i in range(2):
        x = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert out.losses[i] == pytest.approx(-math.log(1 / (1 + math.exp(-x))))
        assert out.chosen_rewards[i] == pytest.approx(beta * (pc[i] - rc[i]))
    smooth = pair_losses(pc, pr, nc, nr, PreferenceSettings("sigmoid", beta, label_smoothing=0.1), rc, rr)
    x = beta * ((pc - rc) - (pr - rr))
    assert torch.allclose(smooth.losses, -0.9 * F.logsigmoid(x) - 0.1 * F.logsigmoid(-x))
    ipo = pair_losses(pc, pr, nc, nr, PreferenceSettings("ipo", beta), rc, rr)
    margin = (pc - rc) / nc - (pr - rr) / nr
    assert torch.allclose(ipo.losses, (margin - 1 / (2 * beta)) ** 2)
    simpo = pair_losses(pc, pr, nc, nr, PreferenceSettings("simpo", beta, gamma=0.3))
    assert torch.allclose(simpo.losses, -F.logsigmoid(beta * (pc / nc - pr / nr) - 0.3))
    assert torch.allclose(simpo.chosen_rewards, beta * pc / nc)


def records(*rows):
    return numbered(list(rows))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same text"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a text or a list of messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "needs a chat model"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
])
def test_bad_pairs_name_their_line(row, message):
    with pytest.raises(GptcliError, match=rf"^d.jsonl:2: .*{message}"):
        read_pairs(records({"prompt": "ok", "chosen": "x", "rejected": "y"}, row), "d.jsonl", BYTES)


def test_pairs_become_rows_whose_labels_are_the_answers():
    chat = WithAddedTokens(BYTES, CHAT_TOKENS)
    [plain] = read_pairs(records({"prompt": "ab", "chosen": "c", "rejected": "de"}), "d", BYTES)
    assert plain.prompt == list(b"ab") and plain.chosen == [ord("c"), BYTES.eot_id]
    [turns] = read_pairs(records({"prompt": [{"role": "user", "content": "q"}],
                                  "chosen": [{"role": "assistant", "content": "c"}], "rejected": "de"}), "d", chat)
    end = chat.special_tokens[END]
    assert turns.prompt[-1] == chat.special_tokens["<|assistant|>"] and turns.rejected == [ord("d"), ord("e"), end]
    idx, labels = pair_rows([plain], pad_id=BYTES.eot_id, device=torch.device("cpu"))
    # chosen: a b c <eot> -> inputs a b c; rejected: a b d e <eot> -> inputs a b d e
    assert idx.tolist() == [[97, 98, 99, BYTES.eot_id], [97, 98, 100, 101]]
    assert labels.tolist() == [[IGNORE_INDEX, 99, BYTES.eot_id, IGNORE_INDEX], [IGNORE_INDEX, 100, 101, BYTES.eot_id]]
    long = read_pairs(records({"prompt": "x" * 10, "chosen": "y" * 10, "rejected": "z"}), "d", BYTES)
    assert fitting(long + [plain], 12, "drop", "training") == [plain]
    with pytest.raises(GptcliError, match=r"^d:1: the prompt and its longer answer take 21 tokens"):
        fitting(long, 12, "error", "training")


def test_sequence_logps_equal_a_full_log_softmax():
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=BYTES.vocab_size))
    pairs = read_pairs(records({"prompt": "ab", "chosen": "cd", "rejected": "e"},
                               {"prompt": "xyz", "chosen": "w", "rejected": "vu"}), "d", BYTES)
    idx, labels = pair_rows(pairs, BYTES.eot_id, torch.device("cpu"))
    sums, counts = PreferenceModel(trunk, PreferenceSettings()).sequence_logps(idx, labels)
    logprobs = torch.log_softmax(trunk.logits(trunk.hidden_states(idx)), dim=-1)
    mask = labels != IGNORE_INDEX
    by_hand = (logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    assert torch.allclose(sums, by_hand, atol=1e-5) and counts.tolist() == mask.sum(-1).tolist()


# --- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return pretrained_base(tmp_path_factory.mktemp("dpo-base"), steps=20)


def preference_file(path):
    """Pairs any model can learn: answer the letter's name in capitals rather than in lower case."""
    rows = [{"prompt": f"say {c}:", "chosen": f" {c.upper() * 3}", "rejected": f" {c * 3}"}
            for c in "abcdefghijklmnopqrstuvwxyz" * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(tmp_path, base_run, name="dpo", **dpo):
    return {"out_dir": str(tmp_path / name), "seed": 3,
            "finetune": {"task": "dpo", "init_from": str(base_run), "patience": 0, "val_fraction": 0.2,
                         "train_file": str(preference_file(tmp_path / "prefs.jsonl")), "dpo": dpo},
            "train": {"batch_size": 4, "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                      "eval_every": 15, "save_every": 15, "log_every": 5, "precision": "fp32", "device": "cpu"}}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preference_and_logs_trls_metrics(tmp_path, base_run):
    result = finetune(config_from_dict(dpo_config(tmp_path, base_run, beta=0.5), FinetuneRunConfig))
    rows = metrics(result.run_dir)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_rewards/accuracies"] == 0.0  # policy = reference
    assert evals[0]["val_loss"] == pytest.approx(math.log(2))
    assert evals[-1]["val_rewards/accuracies"] >= 0.8 and evals[-1]["val_rewards/margins"] > 0
    logged = [r for r in rows if "loss" in r]
    assert all(set(STATS) <= set(r) for r in logged) and all(f"val_{s}" in evals[-1] for s in STATS)
    best = max(evals[1:], key=lambda r: r["val_rewards/accuracies"])
    assert resolve_checkpoint(result.run_dir).name == f"step-{best['step']:06d}"
    assert checkpoint_kind(resolve_checkpoint(result.run_dir)) == "lm"
    pytest.importorskip("matplotlib")
    from PIL import Image

    from gptcli.cli.plot import plot_runs

    plot_runs([result.run_dir], tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (3 * 660, 462)  # loss, reward accuracy, reward margin


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_the_other_losses_train(tmp_path, base_run, loss):
    cfg = dpo_config(tmp_path, base_run, loss=loss, beta=0.5)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "say a:", "reference": "AAA"}) + "\n")
    cfg["train"]["eval_tasks"] = [{"task": "generate", "data": str(tmp_path / "qa.jsonl"), "name": "qa",
                                   "max_new_tokens": 4}]
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    evals = [r for r in metrics(result.run_dir) if "val_loss" in r]
    assert all("qa/exact_match" in r for r in evals)  # train.eval_tasks beside the preference metrics
    assert evals[-1]["val_rewards/margins"] > evals[0]["val_rewards/margins"]


def test_lora_dpo_trains_only_adapters_and_resumes_bit_identically(tmp_path, base_run):
    straight = dpo_config(tmp_path, base_run, "straight")
    straight["finetune"]["lora"] = {"rank": 4, "alpha": 8}
    straight["train"].update(max_steps=12, log_every=1, eval_every=6, save_every=6, lr_decay_steps=12)
    result = finetune(config_from_dict(straight, FinetuneRunConfig))
    assert result.trainable_params < result.total_params // 4
    split = json.loads(json.dumps(straight))
    split["out_dir"] = str(tmp_path / "split")
    split["train"]["max_steps"] = 6
    finetune(config_from_dict(split, FinetuneRunConfig))
    split["train"]["max_steps"] = 12
    events = []
    finetune(config_from_dict(split, FinetuneRunConfig), resume=True, on_event=events.append)
    assert [e.metrics["step"] for e in events if isinstance(e, StepLogged)] == list(range(7, 13))
    logged = lambda d: {r["step"]: (r["loss"], r["rewards/margins"]) for r in metrics(d) if "loss" in r}
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")


def test_rpo_adds_the_chosen_answers_nll_per_token():
    pc, pr = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -4.0])
    rc, rr = torch.tensor([-6.0, -8.0]), torch.tensor([-6.5, -5.0])
    nc, nr = torch.tensor([4.0, 6.0]), torch.tensor([5.0, 2.0])
    for loss in ("sigmoid", "ipo", "simpo"):
        plain = pair_losses(pc, pr, nc, nr, PreferenceSettings(loss, 0.2), rc, rr)
        rpo = pair_losses(pc, pr, nc, nr, PreferenceSettings(loss, 0.2, rpo_alpha=0.5), rc, rr)
        assert torch.allclose(rpo.losses, plain.losses + 0.5 * torch.tensor([5 / 4, 9 / 6]))
        assert torch.equal(rpo.chosen_rewards, plain.chosen_rewards)


@pytest.mark.parametrize("lora", [0, 4])
def test_a_live_reference_trains_as_the_precomputed_one(tmp_path, base_run, lora):
    """The reference computed with each batch (adapters off, or a frozen copy) gives the
    precomputed reference's numbers: the same losses step for step."""
    runs = {}
    for reference in ("precompute", "live"):
        cfg = dpo_config(tmp_path, base_run, reference, reference=reference)
        cfg["finetune"]["lora"] = {"rank": lora, "alpha": 8, "dropout": 0.0}
        cfg["train"].update(max_steps=6, log_every=1, eval_every=3)
        result = finetune(config_from_dict(cfg, FinetuneRunConfig))
        runs[reference] = {r["step"]: (r.get("loss"), r.get("val_loss")) for r in metrics(result.run_dir)}
    assert runs["live"].keys() == runs["precompute"].keys()
    for step, (loss, val_loss) in runs["live"].items():
        other = runs["precompute"][step]
        assert (loss is None or loss == pytest.approx(other[0], abs=1e-5)) and \
               (val_loss is None or val_loss == pytest.approx(other[1], abs=1e-5)), (step, runs)
