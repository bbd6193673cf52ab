"""train.optimizer=muon: which parameters Muon gets, the combined optimizer's state dict,
the learning-rate schedule of its groups, and Muon under torchrun (DDP trains, FSDP is
refused; FSDP with AdamW still trains a llama model)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from safetensors.torch import load_file
from test_distributed import losses, torchrun, write_config
from torch import nn

from gptcli.config import ModelConfig, TrainConfig, config_from_dict
from gptcli.errors import GptcliError
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import load_trainer_state
from gptcli.tasks.pretrain import pretrain
from gptcli.train.loop import _check_same_optimizer
from gptcli.train.muon import Muon
from gptcli.train.optim import Optimizers, build_optimizer, lr_at

CPU = torch.device("cpu")
MUON = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.05, muon_momentum=0.9, weight_decay=0.1)
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def llama(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                              "block_size": 16, "vocab_size": 60, "qk_norm": True, "attn_bias": True,
                              **overrides}))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 60, (2, 4, 16), generator=generator)) for _ in range(n)]


def train_steps(model: torch.nn.Module, optimizer, data) -> None:
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        (model(x, y) / y.numel()).backward()
        optimizer.step()


def names_of(model: torch.nn.Module, params) -> set[str]:
    by_id = {id(p): name.removeprefix("trunk.") for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


# --- which parameters Muon gets --------------------------------------------------------------

def test_muon_gets_exactly_the_2d_block_weights():
    model = llama()
    opt = build_optimizer(model, MUON, CPU)
    assert isinstance(opt, Optimizers) and len(opt.parts) == 2
    adamw, muon = opt.parts
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    matrices = {f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    in_muon = names_of(model, [p for g in muon.param_groups for p in g["params"]])
    in_adamw = names_of(model, [p for g in adamw.param_groups for p in g["params"]])
    assert in_muon == matrices
    assert in_adamw == {n for n, _ in model.named_parameters()} - matrices
    assert {"wte.weight", "lm_head.weight", "ln_f.weight", "h.0.ln_1.weight", "h.1.attn.q_norm.weight",
            "h.1.attn.k_norm.weight", "h.0.attn.c_attn.bias"} <= in_adamw
    # AdamW decays its matrices (embeddings, head) and not its vectors (norm gains, biases).
    decayed, plain = adamw.param_groups
    assert names_of(model, decayed["params"]) == {"wte.weight", "lm_head.weight"}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in plain["params"])
    # Muon at its own learning rate, momentum and decay; lr_scale is its height over train.lr.
    (group,) = muon.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 0.1)
    assert group["lr_scale"] == pytest.approx(0.05 / 3e-3)
    assert [g["lr_scale"] for g in adamw.param_groups] == [1.0, 1.0]
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 3e-3, 0.05]


def test_muon_split_under_a_head_with_frozen_and_tied_weights():
    """A classifier's score matrix is outside the blocks (AdamW); frozen weights are in
    neither optimizer; a tied head is the embedding, counted once."""
    trunk = llama(tie_embeddings=True)
    model = GPTClassifier(trunk, ["a", "b", "c"])
    trunk.wte.weight.requires_grad_(False)
    trunk.h[0].attn.c_attn.weight.requires_grad_(False)
    opt = build_optimizer(model, MUON, CPU)
    adamw, muon = opt.parts
    in_muon = names_of(model, [p for g in muon.param_groups for p in g["params"]])
    in_adamw = names_of(model, [p for g in adamw.param_groups for p in g["params"]])
    assert "score.weight" in in_adamw and "h.0.attn.c_attn.weight" not in in_muon | in_adamw
    assert "wte.weight" not in in_adamw and "lm_head.weight" not in in_adamw  # tied: the same tensor
    assert len(in_muon) == 7 and not in_muon & in_adamw
    trainable = {n.removeprefix("trunk.") for n, p in model.named_parameters() if p.requires_grad}
    assert in_muon | in_adamw == trainable


def test_lora_factors_take_adamw():
    """Muon orthogonalises whole matrices; LoRA's rank-r factors go to AdamW (measured 14
    points better on the classify example), so adapters alone train with AdamW only, and
    with unfrozen block matrices beside them Muon keeps exactly those."""
    model = lora_classifier()
    opt = build_optimizer(model, MUON, CPU)
    trainable = {n.removeprefix("trunk.") for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert type(opt) is torch.optim.AdamW
    assert names_of(model, [p for g in opt.param_groups for p in g["params"]]) == trainable
    model.trunk.h[1].mlp.c_fc.weight.requires_grad_(True)
    adamw, muon = build_optimizer(model, MUON, CPU).parts
    assert names_of(model, [p for g in muon.param_groups for p in g["params"]]) == {"h.1.mlp.c_fc.weight"}
    assert not any("c_fc" in n for n in names_of(model, [p for g in adamw.param_groups for p in g["params"]]))


def test_adamw_is_one_plain_optimizer_over_everything():
    model = llama()
    opt = build_optimizer(model, TrainConfig(), CPU)
    assert type(opt) is torch.optim.AdamW
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert not any("ns_steps" in g for g in opt.state_dict()["param_groups"])


# --- the combined state dict -------------------------------------------------------------------

def test_state_dict_has_one_optimizers_layout():
    model = llama()
    opt = build_optimizer(model, MUON, CPU)
    train_steps(model, opt, batches(1))
    state = opt.state_dict()
    flat = [p for group in opt.param_groups for p in group["params"]]
    n_adamw = sum(len(group["params"]) for group in opt.parts[0].param_groups)
    assert n_adamw == 13  # wte, lm_head, ln_f; per block ln_1, ln_2, q_norm, k_norm, c_attn.bias
    assert [i for g in state["param_groups"] for i in g["params"]] == list(range(len(flat)))
    assert sorted(state["state"]) == list(range(len(flat)))  # every parameter has moments
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if slot != "step":  # AdamW's step counter is a scalar
                assert value.shape == flat[index].shape, (index, slot)
        # AdamW's moments for AdamW's parameters, Muon's momentum buffer for Muon's.
        assert set(slots) == ({"momentum_buffer"} if index >= n_adamw else {"step", "exp_avg", "exp_avg_sq"})
    assert ["ns_steps" in g for g in state["param_groups"]] == [False, False, True]
    json.dumps(state["param_groups"])  # the checkpoint writes the groups as JSON


def test_state_dict_round_trip_continues_bit_identically():
    data = batches(6, seed=1)
    original = llama()
    opt = build_optimizer(original, MUON, CPU)
    for group in opt.param_groups:  # a learning rate of the schedule's, as the loop sets
        group["lr"] = 0.5 * group["lr_scale"] * MUON.lr
    train_steps(original, opt, data[:3])
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(original.state_dict())

    restored = llama(seed=99)  # other initial weights, then the saved ones
    restored.load_state_dict(weights)
    fresh = build_optimizer(restored, MUON, CPU)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    loaded = fresh.state_dict()
    for index, slots in saved["state"].items():
        for slot, value in slots.items():
            assert torch.equal(loaded["state"][index][slot], value), (index, slot)

    forgetful = llama(seed=99)  # the same weights, but a new optimizer state
    forgetful.load_state_dict(weights)
    new = build_optimizer(forgetful, MUON, CPU)
    for group in new.param_groups:
        group["lr"] = 0.5 * group["lr_scale"] * MUON.lr

    for model, optimizer in ((original, opt), (restored, fresh), (forgetful, new)):
        train_steps(model, optimizer, data[3:])
    for name, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert not all(torch.equal(forgetful.state_dict()[n], v) for n, v in original.state_dict().items())
    again = fresh.state_dict()
    for index, slots in opt.state_dict()["state"].items():
        for slot, value in slots.items():
            assert torch.equal(again["state"][index][slot], value), (index, slot)


def test_loading_the_other_optimizers_state_is_refused_by_name():
    adamw = build_optimizer(llama(), TrainConfig(), CPU)
    muon = build_optimizer(llama(), MUON, CPU)
    _check_same_optimizer(muon.state_dict()["param_groups"], muon, "muon")
    _check_same_optimizer(adamw.state_dict()["param_groups"], adamw, "adamw")
    with pytest.raises(GptcliError, match=r"^the run was trained with train.optimizer=muon, so it "
                                          r"resumes with it .*set train.optimizer=muon \(drop --set train.optimizer=adamw"):
        _check_same_optimizer(muon.state_dict()["param_groups"], adamw, "adamw")
    with pytest.raises(GptcliError, match=r"train.optimizer=adamw, .*drop --set train.optimizer=muon"):
        _check_same_optimizer(adamw.state_dict()["param_groups"], muon, "muon")


def lora_classifier() -> GPTClassifier:
    from gptcli.model.lora import LoRASpec, apply_lora

    model = GPTClassifier(llama(), ["a", "b"])
    apply_lora(model, LoRASpec(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj")))
    for name, p in model.named_parameters():  # as finetune does: adapters and the head train
        p.requires_grad_("lora_" in name or name.startswith("score"))
    return model


def test_a_lora_run_under_muon_resumes_its_adamw_state():
    """Under train.optimizer=muon a LoRA run saves AdamW's moments; resuming it with the same
    config is accepted. State saved when its adapters still took Muon is refused in one line."""
    built = build_optimizer(lora_classifier(), MUON, CPU)
    _check_same_optimizer(build_optimizer(lora_classifier(), MUON, CPU).state_dict()["param_groups"], built, "muon")
    older = Optimizers([build_optimizer(lora_classifier(), TrainConfig(), CPU),
                        Muon([nn.Parameter(torch.zeros(4, 4))], lr=0.02, weight_decay=0.0,
                                             momentum=0.95)]).state_dict()["param_groups"]
    with pytest.raises(GptcliError, match=r"^the run's saved optimizer state \(3 parameter groups of muon\) does "
                                          r"not fit .*\(2 of adamw; .*start a new run$"):
        _check_same_optimizer(older, built, "muon")


# --- the learning-rate schedule in the training loop -----------------------------------------------

def test_muon_groups_follow_the_schedule_at_muon_lr(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=5, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                      save_every=1, eval_every=5, log_every=1, optimizer="muon", muon_lr=0.05)
    cfg["model"].update(arch="llama", block_size=16)
    run = config_from_dict(cfg)
    pretrain(run)
    schedule = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                if "lr" in r]
    assert schedule == pytest.approx([lr_at(s, run.train) for s in range(5)])
    assert len(set(schedule)) == 5  # warmup then decay: every step its own rate
    for step in range(1, 6):
        groups = load_trainer_state(tmp_path / "run" / "checkpoints" / f"step-{step:06d}").optimizer["param_groups"]
        factor = lr_at(step - 1, run.train) / run.train.lr
        assert [g["lr"] for g in groups] == pytest.approx([3e-3 * factor, 3e-3 * factor, 0.05 * factor])
        assert ["ns_steps" in g for g in groups] == [False, False, True]


# --- under torchrun ------------------------------------------------------------------------------

# Runs `gptcli` in each process and, after training, saves that process's weights, so the
# ranks can be compared with each other (not only rank 0's checkpoint).
SPY = """
import os, sys, torch
import gptcli.tasks.run as run
from gptcli.cli.app import main

original = run.train_loop

def train_loop(model, *args, **kwargs):
    state = original(model, *args, **kwargs)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(weights, os.path.join(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}.pt"))
    return state

run.train_loop = train_loop
sys.argv = ["gptcli", *sys.argv[1:]]
main()
"""


def torchrun_spied(args, cwd, nproc=2):
    (cwd / "spy.py").write_text(SPY)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(cwd / "spy.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SPY_DIR": str(cwd)})


@pytest.fixture
def llama_base(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], str(tmp_path / "two"), max_steps=6, log_every=1, eval_every=6,
                      save_every=6, batch_size=4, grad_accum=1, lr_decay_steps=6, eval_batches=1)
    cfg["model"].update(arch="llama", n_kv_head=1, block_size=16, dropout=0.0)
    return cfg


def _single_process(tmp_path, cfg):
    single = json.loads(json.dumps(cfg))
    single["out_dir"] = str(tmp_path / "one")
    single["train"]["batch_size"] = 8  # 2 processes x 4 sequences
    pretrain(config_from_dict(single))
    return tmp_path / "one"


@pytest.mark.slow
@needs_gloo
def test_ddp_with_muon_keeps_the_ranks_identical(tmp_path, llama_base):
    llama_base["train"].update(optimizer="muon", parallel="ddp")
    done = torchrun_spied(["pretrain", write_config(tmp_path / "two.yaml", llama_base)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (ddp)" in done.stderr
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name, value in rank0.items():  # every step kept the two copies bit-identical
        assert torch.equal(rank1[name], value), name
    saved = _muon_run_matches_one_process(tmp_path, llama_base)
    # Rank 0's checkpoint holds exactly its weights.
    assert saved.keys() == rank0.keys()  # untied: lm_head is a tensor of its own
    for name, value in saved.items():
        assert torch.equal(value, rank0[name]), name


def _muon_run_matches_one_process(tmp_path, llama_base) -> dict[str, torch.Tensor]:
    """The two-process Muon run in tmp_path/two against one process with the same global
    batch: the same losses and weights, up to Muon's bf16 orthogonalisation of gradients
    that were summed in another order; it learns; its checkpoint holds Muon's state.
    Returns the two-process run's saved weights."""
    one = _single_process(tmp_path, llama_base)
    two, single = losses(tmp_path / "two"), losses(one)
    assert sorted(two) == list(range(1, 7))
    assert max(abs(two[s] - single[s]) for s in two) < 2e-3
    assert two[6] < two[1] - 0.1  # it learns
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000006"
    trained = load_trainer_state(checkpoint).optimizer
    assert ["ns_steps" in g for g in trained["param_groups"]] == [False, False, True]
    saved = load_file(checkpoint / "model.safetensors")
    reference = load_file(one / "checkpoints" / "step-000006" / "model.safetensors")
    assert max((reference[n] - saved[n]).abs().max().item() for n in saved) < 2e-2
    return saved


@pytest.mark.slow
@needs_gloo
def test_fsdp_with_muon_computes_the_single_process_update(tmp_path, llama_base):
    """Each matrix's update gathered whole, orthogonalised on every rank, each rank applying
    its shard: the losses and weights of one process with the same global batch (up to
    Muon's bf16 orthogonalisation of gradients summed in another order, as under ddp)."""
    llama_base["train"].update(optimizer="muon", parallel="fsdp")
    done = torchrun(["pretrain", write_config(tmp_path / "two.yaml", llama_base)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (fsdp)" in done.stderr
    _muon_run_matches_one_process(tmp_path, llama_base)


@pytest.mark.slow
@needs_gloo
def test_fsdp_with_adamw_trains_llama_as_one_process_does(tmp_path, llama_base):
    llama_base["train"]["parallel"] = "fsdp"
    done = torchrun(["pretrain", write_config(tmp_path / "two.yaml", llama_base)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (fsdp)" in done.stderr
    one = _single_process(tmp_path, llama_base)
    two, single = losses(tmp_path / "two"), losses(one)
    assert sorted(two) == list(range(1, 7))
    assert max(abs(two[s] - single[s]) for s in two) < 1e-5
    # Whole tensors in the checkpoint, untied head included, equal to one process's.
    saved = load_file(tmp_path / "two" / "checkpoints" / "step-000006" / "model.safetensors")
    reference = load_file(one / "checkpoints" / "step-000006" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["wte.weight"])
    assert max((reference[n] - saved[n]).abs().max().item() for n in saved) < 1e-5


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_equals_torch_muon(nesterov):
    """gptcli's Muon stacks matrices of one shape; its steps equal torch.optim.Muon's."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 40), (48, 16), (16, 16)]  # tall, square, wide; repeated
    ours = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov}
    ours_opt, theirs_opt = Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_opt.state_dict()["state"][0]["momentum_buffer"],
                               theirs_opt.state_dict()["state"][0]["momentum_buffer"])


def test_a_resume_uses_the_configs_settings_not_the_saved_ones():
    """Loading the saved state brings back the moments; muon_lr, momentum and weight decay
    changed for the resume are the ones used (the resume note says they changed)."""
    from gptcli.train.loop import restore_moments

    model = GPT(ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=40))
    first = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    x = torch.randint(0, 40, (2, 8))
    model(x, x).backward()
    first.step()
    saved = copy.deepcopy(first.state_dict())
    changed = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.005, muon_momentum=0.5, weight_decay=0.0)
    second = build_optimizer(model, changed, torch.device("cpu"))
    restore_moments(second, lambda: second.load_state_dict(saved))
    muon_group = second.param_groups[-1]
    assert (muon_group["lr_scale"], muon_group["momentum"], muon_group["weight_decay"]) == (5.0, 0.5, 0.0)
    moments = second.state_dict()["state"]
    assert all(torch.equal(moments[i][k], saved["state"][i][k]) for i in saved["state"] for k in saved["state"][i])


def test_muon_with_every_block_frozen_is_a_one_line_error():
    model = GPT(ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=40))
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    with pytest.raises(GptcliError, match="no trainable matrix inside the blocks"):
        build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))


# --- the Newton-Schulz dtype, chosen by what the device multiplies fast ------------------------

def test_fp32_orthogonalisation_gives_the_bf16_update_up_to_bf16_rounding():
    """The same stack orthogonalised in fp32 and in bf16 agrees to bf16's rounding, and
    both land the singular values near 1 (what the iteration is for)."""
    from gptcli.train.muon import NS_COEFFICIENTS, orthogonalise

    g = torch.randn(4, 128, 384, generator=torch.Generator().manual_seed(0))
    fp32 = orthogonalise(g, NS_COEFFICIENTS, 5, 1e-7, torch.float32)
    bf16 = orthogonalise(g, NS_COEFFICIENTS, 5, 1e-7, torch.bfloat16).float()
    assert fp32.dtype == torch.float32
    assert ((fp32 - bf16).norm() / fp32.norm()).item() < 0.02
    for x in (fp32, bf16):
        singular = torch.linalg.svdvals(x)
        assert singular.min() > 0.5 and singular.max() < 1.3


@pytest.mark.parametrize("fast", [True, False])
def test_muon_orthogonalises_in_bf16_only_where_the_device_multiplies_it_fast(monkeypatch, fast):
    import gptcli.train.muon as muon
    import gptcli.train.optim as optim

    monkeypatch.setattr(optim, "bf16_matmul_is_fast", lambda device: fast)
    seen = []
    real = muon.orthogonalise
    monkeypatch.setattr(muon, "orthogonalise", lambda *a: seen.append(a[-1]) or real(*a))
    model = llama()
    optimizer = build_optimizer(model, MUON, CPU)
    train_steps(model, optimizer, batches(1))
    assert seen and set(seen) == {torch.bfloat16 if fast else torch.float32}
    assert optimizer.state_dict()["param_groups"][-1]["ns_dtype"] == ("bf16" if fast else "fp32")


def test_a_resumed_run_keeps_its_ns_dtype_and_old_state_keeps_bf16(monkeypatch):
    """The dtype is the run's: resuming on a machine that would choose the other one keeps
    the saved choice (exact resume); state saved before the choice existed was bf16."""
    import gptcli.train.optim as optim
    from gptcli.train.loop import restore_moments

    model = llama()
    monkeypatch.setattr(optim, "bf16_matmul_is_fast", lambda device: False)
    first = build_optimizer(model, MUON, CPU)
    train_steps(model, first, batches(1))
    saved = copy.deepcopy(first.state_dict())
    monkeypatch.setattr(optim, "bf16_matmul_is_fast", lambda device: True)
    second = build_optimizer(model, MUON, CPU)
    restore_moments(second, lambda: second.load_state_dict(saved))
    assert second.param_groups[-1]["ns_dtype"] == "fp32"
    for group in saved["param_groups"]:
        group.pop("ns_dtype", None)
    third = build_optimizer(model, MUON, CPU)
    restore_moments(third, lambda: third.load_state_dict(saved))
    assert third.param_groups[-1]["ns_dtype"] == "bf16"


def test_bf16_speed_is_measured_once_per_device(monkeypatch):
    """The probe times fp32 then bf16 once per process and device; bf16 counts as fast only
    when clearly faster (under BF16_MARGIN of fp32's time)."""
    import gptcli.runtime as runtime

    calls, real_probe = [], runtime._probe_matmul_seconds

    def fake_seconds(device):
        calls.append(device)
        return 1.0, 0.95  # bf16 barely faster: not fast

    monkeypatch.setattr(runtime, "_probe_matmul_seconds", fake_seconds)
    monkeypatch.setattr(runtime, "_BF16_FAST", {})
    assert runtime.bf16_matmul_is_fast(CPU) is False
    assert runtime.bf16_matmul_is_fast(CPU) is False
    assert calls == [CPU]
    fp32, bf16 = real_probe(CPU, repeats=2)  # the real probe: two timings
    assert 0 < fp32 < 1 and 0 < bf16 < 10


def test_auto_precision_skips_the_bf16_trial_where_bf16_is_slow(monkeypatch):
    """On a CPU whose bf16 products are slow, `auto` is fp32 without timing a bf16 step
    (that trial was a minute of silence before the first step on an AVX2-only CPU)."""
    import gptcli.runtime as runtime

    trials = []
    monkeypatch.setattr(runtime, "bf16_matmul_is_fast", lambda device: False)
    assert runtime.resolve_precision("auto", CPU, lambda p: trials.append(p.name) or 1.0).name == "fp32"
    assert trials == []
    monkeypatch.setattr(runtime, "bf16_matmul_is_fast", lambda device: True)
    assert runtime.resolve_precision("auto", CPU, lambda p: trials.append(p.name) or {"fp32": 1.0, "bf16": 0.5}[p.name]).name == "bf16"
    assert trials == ["fp32", "bf16"]
