import json
import shutil

import pytest
import torch
from conftest import pretrain_split_and_resumed, tiny_config
from conftest import step_losses as losses

from gptcli.config import config_from_dict, load_config
from gptcli.errors import GptcliError
from gptcli.events import CheckpointSaved, EvalDone, RunStarted, StepLogged
from gptcli.store.checkpoint import load_model, load_trainer_state
from gptcli.store.rundir import read_pointer, resolve_checkpoint
from gptcli.tasks.pretrain import pretrain


def test_loss_falls_and_run_dir_layout(tmp_path, corpus_dir):
    events = []
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=60, log_every=5))
    result = pretrain(cfg, on_event=events.append)
    run = tmp_path / "run"
    logged = losses(run)
    assert logged[60] < logged[5] - 1.0  # bytes start near ln(320)=5.8 and fall fast on repetitive code
    assert result.steps == 60 and result.best_metric < 4.0  # uniform over 257 bytes is 5.55
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best", "latest", "step-000010", "step-000020", "step-000030", "step-000040",
        "step-000050", "step-000060"]
    assert read_pointer(run, "latest").name == "step-000060"
    resolved = load_config(run / "config.yaml")
    assert resolved.model.vocab_size == 257 and resolved.train.max_steps == 60
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_sec", "mfu"} <= set(rows[0])
    assert any("val_bpb" in r for r in rows)
    kinds = {type(e) for e in events}
    assert {RunStarted, StepLogged, EvalDone, CheckpointSaved} <= kinds


def test_checkpoint_round_trip(tmp_path, corpus_dir):
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=10))
    pretrain(cfg)
    ckpt = resolve_checkpoint(tmp_path / "run")
    shutil.copytree(ckpt, tmp_path / "moved")  # travels alone: no corpus or cache needed
    shutil.rmtree(tmp_path / "cache")
    model, tok = load_model(tmp_path / "moved")
    again, _ = load_model(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok.name == "bytes" and model.config.n_embd == 32
    assert load_config(tmp_path / "moved" / "config.yaml").train.max_steps == 10
    state = load_trainer_state(ckpt)
    assert state.step == 10 and state.optimizer["state"] and "cpu" in state.rng
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))


def test_resume_is_bit_identical(tmp_path, corpus_dir):
    """2N steps straight == N steps, then --resume for N more (CPU, fp32, with dropout)."""
    base = tiny_config([str(corpus_dir)], tmp_path / "straight", max_steps=20, log_every=1,
                       save_every=10, eval_every=10, lr_decay_steps=20)
    base["model"]["dropout"] = 0.1
    pretrain(config_from_dict(base))
    pretrain_split_and_resumed(base, tmp_path / "split", first_steps=10)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 21))
    assert straight == resumed


def test_existing_run_needs_resume_or_overwrite(tmp_path, corpus_dir):
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=10))
    pretrain(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(GptcliError, match="already holds a run; pass --resume .* or --overwrite"):
        pretrain(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    pretrain(cfg, overwrite=True)
    with pytest.raises(GptcliError, match="no checkpoint to resume"):
        pretrain(config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "fresh")), resume=True)


def test_resume_refuses_shape_change(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=10)
    pretrain(config_from_dict(cfg))
    cfg["model"]["n_embd"] = 64
    with pytest.raises(GptcliError, match=r"model settings differ from the checkpoint \(n_embd, head_dim, mlp_hidden\)"):
        pretrain(config_from_dict(cfg), resume=True)
    cfg["model"]["n_embd"] = 32
    cfg["train"]["batch_size"] = 8
    with pytest.raises(GptcliError, match=r"global batch \(batch_size x grad_accum x processes\) was 4, now 8"):
        pretrain(config_from_dict(cfg), resume=True)


def test_tokenized_dir_input_and_cache_reuse(tmp_path, corpus_dir):
    from gptcli.data.tokenized.shards import tokenize_corpus

    tokenize_corpus([str(corpus_dir)], tmp_path / "tok", tokenizer="char")
    cfg = tiny_config([str(tmp_path / "tok")], tmp_path / "run", max_steps=2)
    pretrain(config_from_dict(cfg))
    assert not (tmp_path / "cache").exists()  # a tokenized directory is used as is
    assert load_config(tmp_path / "run" / "config.yaml").model.vocab_size < 100

    raw = tiny_config([str(corpus_dir)], tmp_path / "raw1", max_steps=2)
    pretrain(config_from_dict(raw))
    cached = list((tmp_path / "cache" / "tokens").iterdir())
    stamp = (cached[0] / "train-00000.bin").stat().st_mtime_ns
    raw["out_dir"] = str(tmp_path / "raw2")
    pretrain(config_from_dict(raw))
    assert list((tmp_path / "cache" / "tokens").iterdir()) == cached
    assert (cached[0] / "train-00000.bin").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_vocab_and_context_mismatches(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=2)
    cfg["model"]["vocab_size"] = 50257
    with pytest.raises(GptcliError, match="model.vocab_size is 50257 but the tokenizer .* has 257 ids"):
        pretrain(config_from_dict(cfg))
    cfg["model"]["vocab_size"] = None
    cfg["model"]["block_size"] = 100_000
    with pytest.raises(GptcliError, match="too few for model.block_size=100000"):
        pretrain(config_from_dict(cfg))
    assert not (tmp_path / "run").exists()


def test_lr_schedule():
    from gptcli.config import TrainConfig
    from gptcli.train.optim import lr_at

    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1 / 11) and lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    pinned = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=50, lr_decay_steps=110)
    assert [lr_at(s, pinned) for s in range(50)] == [lr_at(s, cfg) for s in range(50)]


def test_grad_accumulation_matches_one_big_batch(tmp_path, corpus_dir):
    """Loss normalised over the whole step: 2 micro-batches of 2 give the same update as 1 of 4."""
    from gptcli.config import ModelConfig
    from gptcli.model.gpt import GPT
    from gptcli.runtime import Precision
    from gptcli.train.loop import _forward_backward

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    x, y = torch.randint(0, 50, (2, 4, 8))
    y[0, :3] = -1  # uneven target counts across micro-batches
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    fp32 = Precision("fp32", "cpu")
    big = _forward_backward(model, [{"idx": x, "targets": y}], fp32, scaler)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    small = _forward_backward(model, [{"idx": x[:2], "targets": y[:2]}, {"idx": x[2:], "targets": y[2:]}],
                              fp32, scaler)
    torch.testing.assert_close(big, small)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_cpu_peak_is_measured_once_per_device_and_dtype_unless_fresh(monkeypatch):
    from gptcli import runtime

    timings = iter([5.0, 7.0, 3.0, 9.0])  # FLOP/s each new measurement reports
    calls = []

    def measure(device, dtype):
        calls.append((str(device), dtype))
        return next(timings)

    monkeypatch.setattr(runtime, "measure_matmul_flops", measure)
    monkeypatch.setattr(runtime, "_MEASURED_PEAKS", {})
    cpu, fp32, bf16 = torch.device("cpu"), runtime.Precision("fp32", "cpu"), runtime.Precision("bf16", "cpu")
    assert runtime.peak_flops(cpu, fp32) == 5.0
    assert runtime.peak_flops(cpu, fp32) == 5.0  # cached: no second timing
    assert runtime.peak_flops(cpu, bf16) == 7.0  # another dtype is timed on its own
    assert runtime.peak_flops(cpu, fp32, fresh=True) == 5.0  # timed again (3.0); the best is kept
    assert runtime.peak_flops(cpu, fp32, fresh=True) == 9.0
    assert runtime.peak_flops(cpu, fp32) == 9.0
    assert calls == [("cpu", torch.float32), ("cpu", torch.bfloat16)] + [("cpu", torch.float32)] * 2


@pytest.mark.parametrize("bf16_fast", [True, False])
def test_auto_precision_says_what_it_times_and_skips_slow_bf16(tmp_path, corpus_dir, monkeypatch, bf16_fast):
    """Before the run header, `precision: auto` on CPU says it is timing steps; on a CPU
    with slow bf16 it times nothing and trains in fp32 (that trial was a silent minute)."""
    import gptcli.runtime as runtime
    import gptcli.train.loop as loop
    from gptcli.events import Notice, RunStarted

    monkeypatch.setattr(runtime, "bf16_matmul_is_fast", lambda device: bf16_fast)
    timed = []
    real_timer = loop.cpu_step_timer
    monkeypatch.setattr(loop, "cpu_step_timer",
                        lambda model, data: (lambda p, t=real_timer(model, data): timed.append(p.name) or t(p)))
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=1, precision="auto"))
    events = []
    pretrain(cfg, on_event=events.append)
    started = next(i for i, e in enumerate(events) if isinstance(e, RunStarted))
    notes = [i for i, e in enumerate(events) if isinstance(e, Notice) and "timing a training step" in e.message]
    if bf16_fast:
        assert timed == ["fp32", "bf16"] and len(notes) == 1 and notes[0] < started
    else:
        assert timed == [] and notes == [] and events[started].facts["precision"] == "fp32"
