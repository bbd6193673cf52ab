"""Runs of the llama recipe end to end: pretrain and the commands that read its checkpoints,
resuming bit-identically with Muon, refusing to resume with the other optimizer, and each
finetuning task (full and LoRA) on a llama base."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import (
    own_cache,
    pretrain_split_and_resumed,
    run_cli,
    tiny_config,
    write_corpus,
)
from safetensors.torch import load_file

from gptcli.config import config_from_dict
from gptcli.model.gpt import count_params
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import load_model, load_trainer_state
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.pretrain import pretrain

UNIFORM = math.log(257)  # the loss of a byte model that knows nothing (a zero head)


def llama_config(inputs, out_dir, **train) -> dict:
    cfg = tiny_config(inputs, out_dir, **train)
    cfg["model"].update(arch="llama", n_kv_head=1, qk_norm=True)  # 2 query heads share 1 kv head
    return cfg


def write_config(path, cfg: dict):
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


# --- pretraining and the commands that read it ---------------------------------------------

def test_pretrain_then_info_eval_and_sample(tmp_path, corpus_dir, capsys):
    config = write_config(tmp_path / "llama.yaml", llama_config([str(corpus_dir)], "runs/llama", max_steps=20))
    code, _, err = run_cli(["pretrain", config, "--set", "model.attn_bias=true"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "llama"
    logged = losses(run)
    assert logged[20] < logged[5] - 0.5  # it learns

    code, out, err = run_cli(["info", run, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    model, tokenizer = load_model(resolve_checkpoint(run))
    assert info["kind"] == "pretrain" and info["step"] == 20 and info["tokenizer"] == "bytes"
    assert info["model"]["arch"] == "llama" == model.arch
    assert {k: info["model"][k] for k in ("position", "norm", "mlp", "bias", "tie_embeddings", "n_kv_head",
                                         "qk_norm", "attn_bias")} == {
        "position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
        "n_kv_head": 1, "qk_norm": True, "attn_bias": True}
    # Every trained tensor is in the checkpoint, the untied head too.
    assert info["parameters"] == model.num_params() == count_params(model.config)
    assert model.lm_head.weight is not model.wte.weight and model.lm_head.weight.abs().sum() > 0
    assert info["checksums"].startswith("ok")
    code, out, err = run_cli(["info", run], capsys)
    assert code == 0 and "llama: rope, rmsnorm, swiglu 128, 1 kv heads, qk-norm, attn bias, untied" in " ".join((out + err).split())

    # eval repeats the run's own validation: the loss the run logged last.
    code, out, err = run_cli(["eval", "-c", run, "--json"], capsys)
    assert code == 0, err
    evaluated = json.loads(out)
    last_val = [r for r in metrics(run) if "val_loss" in r][-1]
    assert evaluated["loss"] == pytest.approx(last_val["val_loss"], rel=1e-5)
    assert evaluated["loss"] < UNIFORM - 0.5 and evaluated["perplexity"] == pytest.approx(math.exp(evaluated["loss"]))

    greedy = [run_cli(["sample", "-c", run, "-p", "def ", "-n", "24", "--greedy", "--json"], capsys)
              for _ in range(2)]
    assert [code for code, _, _ in greedy] == [0, 0], greedy[0][2]
    sampled = json.loads(greedy[0][1])
    assert greedy[0][1] == greedy[1][1] and len(sampled["tokens"]) == 24
    # The cached generation the CLI ran equals the argmax of full forwards of the loaded model.
    window = tokenizer.encode("def ")
    with torch.no_grad():
        for expected in sampled["tokens"]:
            assert int(model(torch.tensor([window]))[0, -1].argmax()) == expected
            window.append(expected)
    code, out, err = run_cli(["sample", "-c", run, "-p", "class ", "-n", "16", "--seed", "3",
                              "--top-k", "5"], capsys)
    assert code == 0 and out.startswith("class "), err


# --- resuming -----------------------------------------------------------------------------------

def test_resume_with_muon_is_bit_identical(tmp_path, corpus_dir):
    """2N steps straight == N steps, then --resume for N more: losses, weights and every
    optimizer moment (AdamW's and Muon's), with dropout."""
    base = llama_config([str(corpus_dir)], tmp_path / "straight", max_steps=8, log_every=1, save_every=4,
                        eval_every=4, lr_decay_steps=8, optimizer="muon", muon_lr=0.02)
    base["model"].update(dropout=0.1, block_size=16)
    pretrain(config_from_dict(base))
    pretrain_split_and_resumed(base, tmp_path / "split", first_steps=4)

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 9)) and straight == resumed
    final = [tmp_path / run / "checkpoints" / "step-000008" for run in ("straight", "split")]
    a, b = (load_file(path / "model.safetensors") for path in final)
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = (load_trainer_state(path) for path in final)
    assert sa.optimizer["param_groups"] == sb.optimizer["param_groups"]
    assert ["ns_steps" in g for g in sa.optimizer["param_groups"]] == [False, False, True]
    assert sa.optimizer["state"].keys() == sb.optimizer["state"].keys()
    slots = set()
    for index, moments in sa.optimizer["state"].items():
        assert moments.keys() == sb.optimizer["state"][index].keys()
        for slot, value in moments.items():
            slots.add(slot)
            assert torch.equal(value, sb.optimizer["state"][index][slot]), (index, slot)
    assert {"exp_avg", "exp_avg_sq", "momentum_buffer"} <= slots
    assert sa.rng.keys() == sb.rng.keys() and all(torch.equal(sa.rng[k], sb.rng[k]) for k in sa.rng)


@pytest.mark.parametrize("trained, resumed", [("muon", "adamw"), ("adamw", "muon")])
def test_resume_with_the_other_optimizer_is_refused(tmp_path, corpus_dir, capsys, trained, resumed):
    cfg = llama_config([str(corpus_dir)], tmp_path / "run", max_steps=2, optimizer=trained)
    cfg["model"]["block_size"] = 16
    config = write_config(tmp_path / "run.yaml", cfg)
    code, _, err = run_cli(["pretrain", config], capsys)
    assert code == 0, err

    def snapshot():  # every file and its time, but the lock the command takes and gives back
        return sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")
                      if p.name != ".gptcli.lock")

    before = snapshot()
    code, out, err = run_cli(["pretrain", config, "--resume", "--set", "train.max_steps=4",
                              "--set", f"train.optimizer={resumed}"], capsys)
    assert code == 2 and out == ""
    message = (f"error: the run was trained with train.optimizer={trained}, so it resumes with it (its saved "
               f"state holds {trained}'s moments); set train.optimizer={trained} (drop --set "
               f"train.optimizer={resumed}), or start a new run")
    assert message in err.splitlines(), err  # one line
    assert "Traceback" not in err
    assert snapshot() == before  # nothing written
    # With its own optimizer the run continues.
    code, _, err = run_cli(["pretrain", config, "--resume", "--set", "train.max_steps=4"], capsys)
    assert code == 0, err
    assert resolve_checkpoint(tmp_path / "run").name == "step-000004"
    assert load_trainer_state(resolve_checkpoint(tmp_path / "run")).step == 4


# --- finetuning a llama base ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A tiny byte-level llama pretrained for a few steps, once for this module."""
    root = tmp_path_factory.mktemp("llama-base")
    cfg = llama_config([str(write_corpus(root / "corpus"))], root / "base", max_steps=20)
    cfg["model"].update(n_embd=48, n_head=4, n_kv_head=2, block_size=48)
    with own_cache(root):
        pretrain(config_from_dict(cfg))
    return root / "base"


def _task_files(tmp_path, task) -> dict:
    """The data each task trains on, written small into tmp_path; the finetune keys naming it."""
    if task == "classify":
        rng = np.random.default_rng(0)
        rows = ["text,label"]
        for i in range(80):
            label, letters = [("vowel", "aeiou"), ("consonant", "zxqvk")][i % 2]
            rows.append("".join(rng.choice(list(letters), size=16)) + f",{label}")
        (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
        return {"finetune": {"train_file": str(tmp_path / "cls.csv")}}
    if task == "lm":
        (tmp_path / "domain").mkdir()
        for i in range(20):
            (tmp_path / "domain" / f"q{i}.txt").write_text(f"SELECT name FROM users WHERE id = {i};\n" * 5)
        return {"data": {"inputs": [str(tmp_path / "domain")]}}
    rows = [{"prompt": f"add {a} {b}", "response": str(a + b)} for a in range(8) for b in range(6)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"finetune": {"train_file": str(tmp_path / "sft.jsonl"), "pack": True}}


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("task", ["classify", "lm", "instruct"])
def test_finetune_llama(tmp_path, llama_base, capsys, task, rank):
    keys = _task_files(tmp_path, task)
    cfg = {"out_dir": str(tmp_path / "ft"), "seed": 3,
           "finetune": {"init_from": str(llama_base), "patience": 0, **keys.get("finetune", {}),
                        "lora": {"alpha": 8, "dropout": 0.0}},
           "train": {"batch_size": 8, "max_steps": 12, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                     "eval_every": 6, "eval_batches": 2, "save_every": 6, "log_every": 2, "precision": "fp32",
                     "device": "cpu"},
           **{k: v for k, v in keys.items() if k != "finetune"}}
    if rank:
        cfg["train"]["lr"] = 1e-2  # adapters start at zero and need a larger step
    code, _, err = run_cli(["finetune", write_config(tmp_path / "ft.yaml", cfg), "--task", task,
                            "--set", f"finetune.lora.rank={rank}"], capsys)
    assert code == 0, err
    run = tmp_path / "ft"
    logged = losses(run)
    assert sorted(logged) == [2, 4, 6, 8, 10, 12]
    assert logged[10] + logged[12] < logged[2] + logged[4]  # it learns (LoRA slowly)
    base, _ = load_model(resolve_checkpoint(llama_base))
    tuned, tokenizer = load_model(resolve_checkpoint(run))
    trunk = tuned.trunk if task == "classify" else tuned
    assert tuned.arch == trunk.arch == "llama" and isinstance(tuned, GPTClassifier) == (task == "classify")
    assert trunk.config.n_kv_head == 2 and trunk.rotary is not None and trunk.wpe is None
    if task == "lm":
        before = metrics(run)[0]
        assert before["step"] == 0 and before["val_loss"] < UNIFORM - 0.2  # the trained base, not a zero head
    if task == "instruct":
        assert tuned.config.vocab_size == tokenizer.vocab_size == 257 + 4

    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    shared = list(base_state)
    if task == "instruct":  # a grown vocabulary: its first 257 rows are the base's
        shared = [k for k in shared if k not in ("wte.weight", "lm_head.weight")]
        assert tuned_state["wte.weight"].shape == (320, 48)
        assert torch.equal(tuned_state["wte.weight"][:257], base_state["wte.weight"][:257]) == bool(rank)
    if rank == 0:
        assert tuned.lora_spec is None
        assert any(not torch.equal(base_state[k], tuned_state[k]) for k in shared)
        assert not (run / "checkpoints" / "merged").exists()
    else:
        _check_lora(run, task, base, tuned, shared)

    prompt = "aeiouaeiouae" if task == "classify" else "add 2 3" if task == "instruct" else "SELECT"
    code, out, err = run_cli(["sample", "-c", run, "-p", prompt, "-n", "12", "--greedy"], capsys)
    assert code == 0, err
    assert out.strip() in ("vowel", "consonant") if task == "classify" else out.startswith(prompt)


def _check_lora(run, task, base, tuned, shared) -> None:
    """The base weights untouched, adapters of the llama shapes trained, and the merged copy
    computing what the adapters compute."""
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for name in shared:
        assert torch.equal(base_state[name], tuned_state[name]), name
    adapters = {k: v for k, v in tuned_state.items() if ".lora_" in k}
    assert len(adapters) == 2 * 4 * 2  # A and B of 4 layers in each of 2 blocks
    # rank 4 x (in + out): the fused q/k/v of 4 query and 2 kv heads of 12, attn.c_proj, the
    # fused SwiGLU gate and up (2 x 128), mlp.c_proj.
    assert sum(v.numel() for v in adapters.values()) == 2 * 4 * ((48 + 96) + (48 + 48) + (48 + 256) + (128 + 48))
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # all trained
    merged, _ = load_model(resolve_checkpoint(run, prefer="merged"))
    assert merged.lora_spec is None and not any(".lora_" in k for k in merged.state_dict())
    idx = torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted, folded = tuned(idx), merged(idx)
        torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=1e-4)
        if task != "classify":  # the adapters changed the function (a classifier's head is new anyway)
            assert not torch.allclose(folded[..., :257], base(idx), atol=1e-4)


def test_a_pretraining_model_section_can_be_copied_into_a_finetune_config():
    """Every model key may appear in a finetune config; each must agree with the checkpoint."""
    import dataclasses

    from gptcli.config import FinetuneModelConfig, ModelConfig
    from gptcli.errors import GptcliError
    from gptcli.tasks.finetune import _model_config

    assert {f.name for f in dataclasses.fields(FinetuneModelConfig)} == {f.name for f in dataclasses.fields(ModelConfig)}
    base = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32,
                       vocab_size=257, qk_norm=True).resolved()
    copied = FinetuneModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                                 qk_norm=True, dropout=0.1)
    assert _model_config(base, copied) == dataclasses.replace(base, block_size=16, dropout=0.1)
    with pytest.raises(GptcliError, match=r"model\.qk_norm: the checkpoint has True, the config says False; "
                                          r"model\.mlp: the checkpoint has 'swiglu', the config says 'relu2'"):
        _model_config(base, FinetuneModelConfig(qk_norm=False, mlp="relu2"))
