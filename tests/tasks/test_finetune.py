"""Finetuning: each task learns on tiny data, prompt masking, LoRA, freezing, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import own_cache, tiny_config, write_corpus

from gptcli.config import FinetuneRunConfig, ModelConfig, config_from_dict
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS, END
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.evals.classify import classification_metrics
from gptcli.events import StepLogged
from gptcli.model.gpt import GPT, IGNORE_INDEX
from gptcli.model.heads import GPTClassifier
from gptcli.model.lora import LoRASpec, apply_lora, merge_lora
from gptcli.store.checkpoint import load_model
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.finetune import finetune
from gptcli.tasks.instruct import render
from gptcli.tasks.pretrain import pretrain


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny byte-level model pretrained for a few steps, once for this module: the starting
    point. Tests only read it (each finetunes into its own tmp_path)."""
    root = tmp_path_factory.mktemp("finetune-base")
    cfg = tiny_config([str(write_corpus(root / "corpus"))], root / "base", max_steps=40)
    cfg["model"].update(n_layer=2, n_embd=48, n_head=2, block_size=64)
    with own_cache(root):
        pretrain(config_from_dict(cfg))
    return root / "base"


def ft_config(tmp_path, base_run, task, **finetune_keys):
    return {
        "out_dir": str(tmp_path / f"ft-{task}"),
        "seed": 7,
        "finetune": {"task": task, "init_from": str(base_run), "patience": 0, **finetune_keys},
        "train": {"batch_size": 8, "max_steps": 40, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4,
                  "eval_every": 20, "save_every": 20, "log_every": 5, "precision": "fp32",
                  "device": "cpu"},
    }


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_classify_csv(path, n=120):
    """Two classes any model can learn: texts of 'aaa...' vs 'zzz...' with noise."""
    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for i in range(n):
        label = ["vowel", "consonant"][i % 2]
        letters = "aeiou" if label == "vowel" else "zxqvk"
        lines.append("".join(rng.choice(list(letters), size=20)) + f",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_classify_learns_and_predicts(tmp_path, base_run, capsys):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = config_from_dict(ft_config(tmp_path, base_run, "classify", train_file=str(data)), FinetuneRunConfig)
    result = finetune(cfg)
    rows = [r for r in metrics(result.run_dir) if "val_accuracy" in r]
    assert rows[-1]["val_accuracy"] == 1.0 and result.best_metric == 1.0
    (right0, wrong0), (wrong1, right1) = rows[-1]["confusion"]
    assert wrong0 == wrong1 == 0 and right0 > 0 and right1 > 0  # both classes held out, all right
    assert right0 + right1 == 12  # 10% of the 120 rows
    model, _ = load_model(resolve_checkpoint(result.run_dir))
    assert isinstance(model, GPTClassifier) and model.labels == ["consonant", "vowel"]
    from conftest import run_cli

    code, out, _ = run_cli(["sample", "-c", result.run_dir, "-p", "aeiouaeiouaei"], capsys)
    assert code == 0 and out.strip() == "vowel"
    code, out, _ = run_cli(["eval", "-c", result.run_dir, "--data", data, "--json",
                            "--predictions", tmp_path / "preds.csv"], capsys)
    assert code == 0 and json.loads(out)["accuracy"] > 0.95
    assert (tmp_path / "preds.csv").read_text().startswith("text,label,predicted,p_consonant,p_vowel")
    # Without --data: the validation split it trained with, rebuilt from its config.
    code, out, _ = run_cli(["eval", "-c", result.run_dir, "--json"], capsys)
    own = json.loads(out)
    assert code == 0 and own["data"] == f"{data} (validation split)"
    assert own["confusion"] == rows[-1]["confusion"] and own["accuracy"] == rows[-1]["val_accuracy"]
    assert own["naive_bayes_accuracy"] == rows[-1]["val_naive_bayes_accuracy"]


def test_a_classifier_without_its_config_needs_data(tmp_path, capsys):
    from conftest import run_cli

    from gptcli.store.checkpoint import save_checkpoint

    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257))
    checkpoint = save_checkpoint(tmp_path / "cls", GPTClassifier(trunk, ["a", "b"]), BytesTokenizer(), "# none\n")
    code, out, err = run_cli(["eval", "-c", checkpoint], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {checkpoint} records no finetune config to rebuild its validation split from; "
                           f"give a labelled file with --data")


def test_lm_task_reports_before_and_after(tmp_path, base_run):
    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(30):
        (domain / f"d{i}.txt").write_text(f"SELECT name FROM users WHERE id = {i};\n" * 6)
    cfg = ft_config(tmp_path, base_run, "lm")
    cfg["data"] = {"inputs": [str(domain)]}
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    assert "val_bpb" in result.before
    assert result.best_metric < result.before["val_loss"] - 0.5
    assert metrics(result.run_dir)[0]["step"] == 0  # the "before" evaluation is recorded


def test_sampling_a_lora_checkpoint_equals_sampling_its_merged_copy(tmp_path, base_run):
    from gptcli.infer.sample import SampleRequest, sample

    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(30):
        (domain / f"d{i}.txt").write_text(f"SELECT name FROM users WHERE id = {i};\n" * 6)
    cfg = ft_config(tmp_path, base_run, "lm", lora={"rank": 4, "dropout": 0.0})
    cfg["data"] = {"inputs": [str(domain)]}
    cfg["train"]["max_steps"] = 20
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    request = SampleRequest(prompt="SELECT", max_new_tokens=30, temperature=0.0)
    adapters = sample(resolve_checkpoint(result.run_dir), request)[1][0]
    merged = sample(resolve_checkpoint(result.run_dir, prefer="merged"), request)[1][0]
    assert adapters.tokens == merged.tokens


def test_instruct_masks_prompt_tokens():
    tok = WithAddedTokens(BytesTokenizer(), CHAT_TOKENS)
    ids, targets = render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    s = tok.special_tokens
    assert ids == [s["<|user|>"], ord("h"), ord("i"), s[END], s["<|assistant|>"], ord("y"), ord("o")]
    # Only predicting "y", "o" and the closing <|end|> is trained.
    assert targets == [IGNORE_INDEX] * 4 + [ord("y"), ord("o"), s[END]]


def test_instruct_trains_and_sample_stops_at_end_of_turn(tmp_path, base_run, capsys):
    rows = [{"prompt": f"add {a} {b}", "response": str(a + b)} for a in range(10) for b in range(6)]
    rows += [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "hi"}]}] * 4
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = ft_config(tmp_path, base_run, "instruct", train_file=str(data), pack=True)
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    rows = metrics(result.run_dir)
    first_train = next(r["loss"] for r in rows if "loss" in r)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < first_train - 2.5  # ~5.3 (untrained) -> ~2.2 per response token
    model, tok = load_model(resolve_checkpoint(result.run_dir))
    assert model.config.vocab_size == 257 + 4 and END in tok.special_tokens
    from conftest import run_cli

    code, out, _ = run_cli(["sample", "-c", result.run_dir, "-p", "hello", "-n", "50", "--greedy"], capsys)
    assert code == 0 and out.startswith("hello") and len(out) < 40  # stopped at <|end|>


def test_instruct_logs_generate_tasks_at_every_evaluation_and_plot_draws_them(tmp_path, base_run, capsys):
    """train.eval_tasks' generate tasks answer through the model in training (its chat
    format, greedy): NAME/METRIC at every evaluation; eval --task generate without --data
    scores the run's own validation split; plot gives each metric a panel."""
    rows = [{"prompt": f"add {a} {b}", "response": str(a + b)} for a in range(10) for b in range(6)]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": r["prompt"], "reference": r["response"]}) + "\n" for r in rows[:8]))
    cfg = ft_config(tmp_path, base_run, "instruct", train_file=str(data), pack=True)
    cfg["train"]["eval_tasks"] = [{"task": "generate", "data": str(qa), "name": "sums", "max_new_tokens": 6,
                                   "metrics": ["exact_match", "f1"]}]
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    evals = [r for r in metrics(result.run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(0 <= r["sums/exact_match"] <= 1 and 0 <= r["sums/f1"] <= 1 for r in evals)
    from conftest import run_cli

    code, out, err = run_cli(["eval", "-c", result.run_dir, "--task", "generate", "--max-new-tokens", "6",
                              "--json"], capsys)
    own = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and own["items"] == 6 and "(validation split)" in own["data"], err  # 10% of 60
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(["plot", result.run_dir, "--out", tmp_path / "p.png"], capsys)
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size == (3 * 660, 462)  # loss, sums exact_match, sums f1


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data),
                    lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    n_embd, layers, rank = 48, 2, 4
    # rank x (in + out) per adapted Linear: c_attn, attn.c_proj, c_fc, mlp.c_proj in each block.
    shapes = [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, 4 * n_embd), (4 * n_embd, n_embd)]
    adapters = layers * sum(rank * (i + o) for i, o in shapes)
    assert result.trainable_params == adapters + 2 * n_embd  # adapters + the head
    base, _ = load_model(resolve_checkpoint(base_run))
    tuned, _ = load_model(resolve_checkpoint(result.run_dir))
    for name, value in base.state_dict().items():  # base weights unchanged by LoRA training
        assert torch.equal(value, tuned.state_dict()[name]), name
    merged, _ = load_model(resolve_checkpoint(result.run_dir, prefer="merged"))
    assert merged.lora_spec is None and not any(".lora_" in k for k in merged.state_dict())
    idx = torch.randint(0, 257, (3, 20))
    torch.testing.assert_close(merged(idx), tuned(idx), atol=1e-5, rtol=1e-4)


def test_merge_lora_same_logits_as_adapters():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("attn.c_attn", "mlp.c_fc")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # non-zero adapters, as after training
    idx = torch.randint(0, 50, (2, 16))
    with_adapters = model(idx)
    merge_lora(model)
    torch.testing.assert_close(model(idx), with_adapters, atol=1e-5, rtol=1e-4)


def test_freeze_embeddings_and_blocks(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data),
                    freeze={"embeddings": True, "blocks": 1})
    cfg["train"]["max_steps"] = 4
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    base, _ = load_model(resolve_checkpoint(base_run))
    tuned, _ = load_model(resolve_checkpoint(result.run_dir))
    base, tuned = base.state_dict(), tuned.state_dict()  # a head's trunk keeps the trunk's names
    assert torch.equal(base["wte.weight"], tuned["wte.weight"])
    assert torch.equal(base["h.0.mlp.c_fc.weight"], tuned["h.0.mlp.c_fc.weight"])
    assert not torch.equal(base["h.1.mlp.c_fc.weight"], tuned["h.1.mlp.c_fc.weight"])


def test_early_stopping(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data), patience=1)
    cfg["train"].update(eval_every=2, max_steps=200)
    result = finetune(config_from_dict(cfg, FinetuneRunConfig))
    assert result.steps < 200  # accuracy reaches 1.0 early, then cannot improve


def test_classification_metrics_by_hand():
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("lora_under_muon", [False, True])
def test_resume_bit_identical_for_finetune(tmp_path, base_run, lora_under_muon):
    """Also for LoRA under train.optimizer=muon, whose optimizer is AdamW (train/optim.py)."""
    data = write_classify_csv(tmp_path / "cls.csv")
    straight = ft_config(tmp_path, base_run, "classify", train_file=str(data))
    straight["train"].update(max_steps=20, log_every=1, eval_every=10, save_every=10, lr_decay_steps=20)
    if lora_under_muon:
        straight["finetune"]["lora"] = {"rank": 4, "alpha": 8}
        straight["train"]["optimizer"] = "muon"
    finetune(config_from_dict(straight, FinetuneRunConfig))
    split = json.loads(json.dumps(straight))
    split["out_dir"] = str(tmp_path / "split")
    split["train"]["max_steps"] = 10
    finetune(config_from_dict(split, FinetuneRunConfig))
    split["train"]["max_steps"] = 20
    events = []
    finetune(config_from_dict(split, FinetuneRunConfig), resume=True, on_event=events.append)
    assert [e.metrics["step"] for e in events if isinstance(e, StepLogged)] == list(range(11, 21))  # resumed
    losses = lambda d: {r["step"]: r["loss"] for r in metrics(d) if "loss" in r}
    resumed = losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 21))
    assert losses(tmp_path / "ft-classify") == resumed


@pytest.mark.parametrize("task, keys, setup, message", [
    ("classify", {"train_file": "{tmp}/nocol.csv"}, "nocol", "has no 'label' column"),
    ("classify", {"train_file": "{tmp}/empty.csv"}, "empty", "has no records"),
    ("classify", {"train_file": "{tmp}/one.csv"}, "one", r"1 class\(es\)"),
    ("instruct", {"train_file": "{tmp}/bad.jsonl"}, "bad", "bad.jsonl:2: invalid JSON"),
    ("instruct", {"train_file": "{tmp}/role.jsonl"}, "role", "unknown role 'robot'"),
    ("instruct", {"train_file": "{tmp}/long.jsonl"}, "long", "longer than the 64-token context"),
    ("classify", {"train_file": "{tmp}/x.csv", "init_from": "{tmp}/nowhere"}, "ok", "does not exist"),
    ("classify", {"train_file": "{tmp}/x.csv", "init_from": "{tmp}"}, "ok", "neither a checkpoint"),
    ("classify", {"train_file": "{tmp}/x.xlsx"}, "ok", "unknown data format"),
    ("lm", {}, "ok", "data.inputs: name the new-domain text"),
])
def test_bad_finetune_input(tmp_path, base_run, task, keys, setup, message):
    files = {
        "nocol": ("nocol.csv", "text,category\nhello,a\nbye,b\n" * 10),
        "empty": ("empty.csv", "text,label\n"),
        "one": ("one.csv", "text,label\n" + "hello,a\n" * 20),
        "bad": ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n'),
        "role": ("role.jsonl", (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n") * 10),
        "long": ("long.jsonl", "\n".join(json.dumps({"prompt": "q" * 100, "response": "a"}) for _ in range(10))),
        "ok": ("x.csv", "text,label\na,b\n"),
    }
    name, text = files[setup]
    (tmp_path / name).write_text(text)
    keys = {k: v.replace("{tmp}", str(tmp_path)) for k, v in keys.items()}
    with pytest.raises(GptcliError, match=message):
        finetune(config_from_dict(ft_config(tmp_path, base_run, task, **keys), FinetuneRunConfig))
    assert not (tmp_path / f"ft-{task}").exists()


def test_config_may_not_contradict_checkpoint(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data))
    cfg["model"] = {"n_layer": 6}
    with pytest.raises(GptcliError, match="model.n_layer: the checkpoint has 2"):
        finetune(config_from_dict(cfg, FinetuneRunConfig))
    cfg["model"] = {"block_size": 1024}
    with pytest.raises(GptcliError, match="beyond the checkpoint's context of 64"):
        finetune(config_from_dict(cfg, FinetuneRunConfig))


def test_resume_refuses_other_task_head(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data))
    cfg["train"]["max_steps"] = 2
    finetune(config_from_dict(cfg, FinetuneRunConfig))
    cfg["finetune"]["task"] = "lm"
    cfg["data"] = {"inputs": [str(data)]}
    with pytest.raises(GptcliError, match="holds a classifier model, not one for --task lm"):
        finetune(config_from_dict(cfg, FinetuneRunConfig), resume=True)


def test_packing_fills_rows_without_exceeding_context():
    from gptcli.tasks.instruct import _pack

    rows = [(np.arange(n), np.arange(n)) for n in [10, 20, 30, 5, 60, 1]]
    packed = _pack(rows, block_size=64)
    assert [len(ids) for ids, _ in packed] == [60, 5, 61]
    assert np.concatenate([ids for ids, _ in packed]).tolist() == np.concatenate([r for r, _ in rows]).tolist()


def test_resume_refuses_a_different_global_batch(tmp_path, base_run):
    data = write_classify_csv(tmp_path / "cls.csv")
    cfg = ft_config(tmp_path, base_run, "classify", train_file=str(data))
    cfg["train"]["max_steps"] = 2
    finetune(config_from_dict(cfg, FinetuneRunConfig))
    cfg["train"].update(max_steps=4, batch_size=4)
    with pytest.raises(GptcliError, match="global batch .* was 8, now 4"):
        finetune(config_from_dict(cfg, FinetuneRunConfig), resume=True)


def test_the_builtin_example_is_the_shipped_config():
    """`gptcli finetune --task classify` without a config runs configs/finetune-classify.yaml
    (on the latest pretrained run instead of runs/demo), as its comment says."""
    import dataclasses
    from pathlib import Path

    from gptcli.config import load_config
    from gptcli.tasks.finetune import builtin_example

    shipped = load_config(Path(__file__).parents[2] / "configs/finetune-classify.yaml", [], FinetuneRunConfig)
    builtin = load_config(None, builtin_example("classify"), FinetuneRunConfig)
    assert builtin.finetune.init_from == ""  # the latest pretrained run
    assert dataclasses.replace(builtin, finetune=dataclasses.replace(builtin.finetune, init_from="runs/demo")) == shipped


@pytest.mark.parametrize("task", ["instruct", "lm"])
def test_finetune_without_a_config_takes_its_data_from_set(tmp_path, base_run, task, capsys):
    """`--set` is the YAML: `finetune --task instruct|lm` with its data given by --set trains
    (it was refused as 'needs a config naming its data')."""
    from conftest import run_cli

    if task == "instruct":
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(20)))
        given = [f"finetune.train_file={data}"]
    else:
        domain = tmp_path / "domain"
        domain.mkdir()
        for i in range(10):
            (domain / f"d{i}.txt").write_text(f"SELECT {i};\n" * 20)
        given = [f"data.inputs=[{domain}]"]
    settings = [*given, f"finetune.init_from={base_run}", f"out_dir={tmp_path / 'ft'}", "train.max_steps=2",
                "train.eval_every=2", "train.batch_size=2", "train.device=cpu", "train.precision=fp32"]
    code, _out, err = run_cli(["finetune", "--task", task, *[a for s in settings for a in ("--set", s)]], capsys)
    assert code == 0, err
    assert (tmp_path / "ft" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize(("task", "message"), [
    ("bogus", "error: finetune.task: expected one of classify, lm, instruct, dpo, grpo; got 'bogus'"),
    ("instruct", "error: finetune.train_file: required for --task instruct"),
    ("lm", "error: data.inputs: name the new-domain text for --task lm"),
])
def test_finetune_without_a_config_names_what_is_missing(tmp_path, base_run, task, message, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["finetune", "--task", task, "--set", f"finetune.init_from={base_run}"], capsys)
    assert code == 2 and out == "" and err.startswith(message), err
