"""Reinforcement learning with verifiable rewards (`finetune --task grpo`): prompts read with
every refusal naming its line, rewards (built-in, regex, length, a user's function) and their
refusals, rollouts whose completions end with the stop id the model sampled, and runs: the
reward rises, TRL's metric names, the best checkpoint by pass@1, a checkpoint that is a
language model, LoRA with the KL to its adapters-off self, and a bit-identical resume."""

import json
import math
import re

import pytest
import torch
from conftest import pretrained_base, run_cli

from gptcli.config import (
    FinetuneRunConfig,
    GRPOConfig,
    ModelConfig,
    RewardConfig,
    config_from_dict,
)
from gptcli.data.text.records import numbered
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.events import StepLogged
from gptcli.infer.load import checkpoint_kind, language_model
from gptcli.infer.session import GenerationSession, GenerationSettings
from gptcli.model.gpt import GPT
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.finetune import finetune
from gptcli.tasks.grpo import (
    Question,
    RolloutData,
    RolloutStats,
    Scorer,
    _completion,
    fitting,
    read_questions,
)

BYTES = BytesTokenizer()


def session(block_size=32):
    model = GPT(ModelConfig(vocab_size=BYTES.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=block_size))
    return GenerationSession(language_model(None, model, BYTES))


@pytest.mark.parametrize("row, message", [
    ({"answer": "1"}, "give a 'prompt' (text) or 'messages'"),
    ({"prompt": "p", "messages": [], "answer": "1"}, "give a 'prompt' (text) or 'messages'"),
    ({"prompt": "p"}, "no 'answer'"),
    ({"prompt": "p", "answer": "  "}, "no 'answer'"),
    ({"prompt": "p", "answer": True}, "no 'answer'"),
    ({"prompt": "", "answer": "1"}, "'prompt' must be a non-empty text"),
    ({"messages": [{"role": "user", "content": "hi"}], "answer": "1"}, "has no chat format"),
])
def test_bad_prompts_name_their_line(row, message):
    rows = [{"prompt": "fine", "answer": 2}, row]
    with pytest.raises(GptcliError, match=f"^q.jsonl:2: .*{re.escape(message)}"):
        read_questions(numbered(rows), "q.jsonl", session())


def test_questions_keep_their_text_and_answer_and_too_long_ones_are_named():
    questions = read_questions(numbered([{"prompt": "1 + 1 =", "answer": 2}, {"prompt": "x" * 30, "answer": "y"}]),
                               "q.jsonl", session())
    assert questions[0].text == "1 + 1 =" and questions[0].answer == "2"
    assert questions[0].prompt.ids == BYTES.encode("1 + 1 =")
    assert fitting(questions, 32, 8, "drop", "training") == questions[:1]
    with pytest.raises(GptcliError, match=r"^q.jsonl:2: the prompt takes 30 tokens.*finetune.too_long=drop"):
        fitting(questions, 32, 8, "error", "training")
    with pytest.raises(GptcliError, match="no training prompt leaves room for 40 new tokens"):
        fitting(questions, 32, 40, "drop", "training")


def question(answer="42"):
    return Question("q.jsonl:7", "What is 6 x 7?", None, answer)


def test_rewards_are_weighted_and_named(tmp_path):
    user = tmp_path / "mine.py"
    user.write_text("def polite(prompt, completion, answer):\n    return 'please' in completion\n")
    scorer = Scorer([RewardConfig("exact"), RewardConfig("regex", 0.5, r"^\d+$"), RewardConfig("length", 0.1),
                     RewardConfig(f"{user}:polite", 2.0), RewardConfig("regex", 1.0, "z")], max_new_tokens=8)
    assert [t.label for t in scorer.terms] == ["exact", "regex", "length", "polite", "regex_4"]
    assert scorer.score(question(), "so \\boxed{42}", 4) == [1.0, 0.0, -0.5, 0.0, 0.0]
    assert scorer.score(question(), "42", 2) == [1.0, 1.0, -0.25, 0.0, 0.0]
    assert scorer.score(question(), "please 41", 8) == [0.0, 0.0, -1.0, 1.0, 0.0]
    assert scorer.weights.tolist() == pytest.approx([1.0, 0.5, 0.1, 2.0, 1.0])


@pytest.mark.parametrize("configs, message", [
    ([], "name at least one reward"),
    ([RewardConfig("bogus")], r"rewards\[0\].name: unknown reward 'bogus'"),
    ([RewardConfig("regex")], r"rewards\[0\].pattern: the regex reward needs a pattern"),
    ([RewardConfig("regex", pattern="(")], r"rewards\[0\].pattern: not a regular expression"),
    ([RewardConfig("exact"), RewardConfig("exact", pattern="a")], r"rewards\[1\].pattern: only the regex reward"),
    ([RewardConfig("missing.py:f")], r"rewards\[0\].name: missing.py does not exist"),
    ([RewardConfig("no_such_module_here:f")], r"no_such_module_here failed to load"),
])
def test_bad_rewards_are_refused(configs, message):
    with pytest.raises(GptcliError, match=message):
        Scorer(configs, 8)


@pytest.mark.parametrize("body, message", [
    ("raise ValueError('boom')", r"q.jsonl:7: the reward .*:judge raised ValueError: boom"),
    ("return 'yes'", r"q.jsonl:7: the reward .*:judge returned 'yes', not a finite number"),
    ("return float('nan')", r"returned nan"),
])
def test_a_failing_user_reward_names_itself_and_the_prompt(tmp_path, body, message):
    user = tmp_path / "judge.py"
    user.write_text(f"def judge(prompt, completion, answer):\n    {body}\n")
    scorer = Scorer([RewardConfig(f"{user}:judge")], 8)
    with pytest.raises(GptcliError, match=message):
        scorer.score(question(), "42", 2)


# --- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return pretrained_base(tmp_path_factory.mktemp("grpo-base"), steps=30)


def prompts_file(path):
    """Prompts whose completions are rewarded for holding a digit: not rare for a model
    trained on Python, not certain either."""
    rows = [{"prompt": f"x{i} = ", "answer": "0"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_config(tmp_path, base_run, name="grpo", **grpo):
    grpo = {"group_size": 6, "max_new_tokens": 4, "rewards": [{"name": "regex", "pattern": "[0-9]"}], **grpo}
    return {"out_dir": str(tmp_path / name), "seed": 3,
            "finetune": {"task": "grpo", "init_from": str(base_run), "patience": 0, "val_fraction": 0.25,
                         "train_file": str(prompts_file(tmp_path / "prompts.jsonl")), "grpo": grpo},
            "train": {"batch_size": 4, "max_steps": 30, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                      "eval_every": 15, "save_every": 15, "log_every": 5, "precision": "fp32", "device": "cpu"}}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRL_NAMES = ("reward", "reward_std", "rewards/regex/mean", "rewards/regex/std", "completions/mean_length",
             "completions/clipped_ratio", "frac_reward_zero_std", "clip_ratio/region_mean",
             "rollout_tokens_per_sec", "generation_share")


def test_grpo_raises_the_reward_and_logs_trls_metrics(tmp_path, base_run):
    result = finetune(config_from_dict(grpo_config(tmp_path, base_run), FinetuneRunConfig))
    rows = metrics(result.run_dir)
    evals = [r for r in rows if "val_pass@1" in r]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert all(set(TRL_NAMES) <= set(r) for r in logged)
    assert logged[-1]["reward"] > logged[0]["reward"] + 0.2, [r["reward"] for r in logged]
    assert evals[-1]["val_pass@1"] > evals[0]["val_pass@1"]
    assert all(0 < r["generation_share"] < 1 and r["completions/mean_length"] <= 4 for r in logged)
    best = max(evals[1:], key=lambda r: r["val_pass@1"])
    assert resolve_checkpoint(result.run_dir).name == f"step-{best['step']:06d}"
    assert checkpoint_kind(resolve_checkpoint(result.run_dir)) == "lm"
    pytest.importorskip("matplotlib")
    from PIL import Image

    from gptcli.cli.plot import plot_runs

    plot_runs([result.run_dir], tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (3 * 660, 462)  # loss, reward, pass@1


def test_sequence_mean_loss_and_reused_rollouts_train(tmp_path, base_run):
    """grpo's per-completion mean, and rollouts trained for 3 steps: the ratio leaves 1 after
    the first, so the clip binds somewhere; train.eval_tasks scored beside pass@1."""
    cfg = grpo_config(tmp_path, base_run, loss="grpo", reuse=3)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "x = ", "reference": "1"}) + "\n")
    cfg["train"].update(max_steps=12, log_every=3, eval_every=12, eval_tasks=[
        {"task": "generate", "data": str(tmp_path / "qa.jsonl"), "name": "qa", "max_new_tokens": 4}])
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    assert all("qa/exact_match" in r for r in metrics(result.run_dir) if "val_pass@1" in r)  # train.eval_tasks too
    logged = [r for r in metrics(result.run_dir) if "loss" in r]
    assert any(r["clip_ratio/region_mean"] > 0 for r in logged)
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_lora_grpo_with_kl_resumes_bit_identically(tmp_path, base_run):
    straight = grpo_config(tmp_path, base_run, "straight", beta=0.05)
    straight["finetune"]["lora"] = {"rank": 4, "alpha": 8}
    straight["train"].update(max_steps=8, log_every=1, eval_every=4, save_every=4, lr_decay_steps=8)
    result = finetune(config_from_dict(straight, FinetuneRunConfig))
    assert result.trainable_params < result.total_params // 4
    assert all(r["kl"] >= 0 for r in metrics(result.run_dir) if "loss" in r)
    split = json.loads(json.dumps(straight))
    split["out_dir"] = str(tmp_path / "split")
    split["train"]["max_steps"] = 4
    finetune(config_from_dict(split, FinetuneRunConfig))
    split["train"]["max_steps"] = 8
    events = []
    finetune(config_from_dict(split, FinetuneRunConfig), resume=True, on_event=events.append)
    assert [e.metrics["step"] for e in events if isinstance(e, StepLogged)] == list(range(5, 9))
    logged = lambda d: {r["step"]: (r["loss"], r["reward"], r.get("kl")) for r in metrics(d) if "loss" in r}
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")


def test_a_raising_reward_stops_the_run_with_one_line_and_its_checkpoint_intact(tmp_path, base_run, capsys):
    judge = tmp_path / "judge.py"
    judge.write_text("import os\n\ndef judge(prompt, completion, answer):\n"
                     "    if os.environ.get('GPTCLI_TEST_FAIL'):\n        raise RuntimeError('judge is down')\n"
                     "    return 1.0 if '0' in completion else 0.0\n")
    cfg = grpo_config(tmp_path, base_run, rewards=[{"name": f"{judge}:judge"}])
    cfg["train"].update(max_steps=4, save_every=2, eval_every=2)
    finetune(config_from_dict(cfg, FinetuneRunConfig))
    kept = sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir())
    cfg["train"]["max_steps"] = 6
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTCLI_TEST_FAIL", "1")
        code, out, err = run_cli(["finetune", tmp_path / "cfg.yaml", "--resume"], capsys)
    last = err.strip().splitlines()[-1]  # after the run's header table: one line, no traceback
    assert code == 2 and err.count("error:") == 1 and last.startswith("error: ") and "Traceback" not in err, err
    assert "prompts.jsonl:" in last and "judge raised RuntimeError: judge is down" in last
    assert sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir()) == kept


@pytest.mark.parametrize("favoured", ["eot", "a"])
def test_samples_say_which_stop_id_ended_them(favoured):
    """A rollout is trained with the id that ended it (`_completion`): the model learns to stop."""
    chat = session()
    token = BYTES.eot_id if favoured == "eot" else ord("a")
    plain = chat.model.logits
    chat.model.logits = lambda hidden: plain(hidden) + 100 * torch.nn.functional.one_hot(
        torch.tensor(token), BYTES.vocab_size)
    samples = chat.generate_many([chat.prompt("ab")], GenerationSettings(max_new_tokens=5, temperature=0), n=2)[0]
    for sample in samples:
        if favoured == "eot":
            assert (sample.tokens, sample.stop_id, _completion(sample)) == ([], BYTES.eot_id, [BYTES.eot_id])
        else:
            assert (sample.tokens, sample.stop_id, _completion(sample)) == ([token] * 5, None, [token] * 5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ(dynamic):
    """A random model writes a digit in about one completion of five: many groups of four
    are all wrong. Dynamic sampling draws more prompts and keeps only mixed groups."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=BYTES.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    records = numbered([{"prompt": f"x{i} = ", "answer": "0"} for i in range(40)])
    cfg = GRPOConfig(group_size=4, max_new_tokens=6, dynamic_sampling=dynamic,
                     rewards=[RewardConfig("regex", pattern="[0-9]")])
    stats = RolloutStats(("regex",))
    data = RolloutData(model, BYTES, records, records[:4], "q.jsonl", "q.jsonl", cfg, Scorer(cfg.rewards, 6), stats,
                       batch_size=4, seed=0, device=torch.device("cpu"))
    batch = data.train_batch(0, 0)
    teaching = batch["advantages"].view(-1, 4).abs().sum(dim=1) > 0  # per group
    assert len(teaching) == 4
    if dynamic:
        assert teaching.all() and len(stats.totals) > 1  # more than one draw was needed
    else:
        assert not teaching.all() and len(stats.totals) == 1
    assert data.train_batch(0, 0) is batch  # drawn once per step and micro-batch
