"""Counts that size an allocation are checked against the memory left before anything is
allocated (model/budget.py): `sample --num-samples` and `--max-new-tokens`, `serve
--max-batch`; the estimates themselves, and that the defaults pass for a GPT-2-sized model
on a small machine."""

import re

import pytest
import torch
from conftest import run_cli
from serving import random_model

from gptcli import runtime
from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.infer.engine import BatchEngine
from gptcli.infer.sample import SampleRequest, sample
from gptcli.model.gpt import GPT
from gptcli.model.kv_cache import KVCache
from gptcli.store.checkpoint import save_checkpoint

MB = 1_000_000


@pytest.fixture
def lm(tmp_path):
    return save_checkpoint(tmp_path / "lm", random_model(BytesTokenizer.vocab_size), BytesTokenizer(), "# lm\n")


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail the test if a KV cache or any sample's text state is made: a refusal must come
    before them (the per-sample Python objects alone took 22 GB at 100,000,000 samples)."""
    def refuse(*args, **kwargs):
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr(KVCache, "empty", classmethod(refuse))
    monkeypatch.setattr("gptcli.infer.session.SampleText", refuse)


def small_machine(monkeypatch, available: int) -> None:
    monkeypatch.setattr(runtime, "available_memory", lambda device: available)


def test_too_many_samples_are_refused_before_allocating(lm, monkeypatch, nothing_allocated):
    small_machine(monkeypatch, 50 * MB)
    with pytest.raises(GptcliError) as info:
        sample(lm, SampleRequest(prompt="x", max_new_tokens=2, num_samples=100_000_000, device="cpu"))
    message = str(info.value)
    assert message.startswith("--num-samples 100000000: the KV cache, activations, logits and texts of "
                              "100,000,000 samples of 2 new tokens need about ")
    assert "this machine has 50.0 MB available; use fewer samples (at most about " in message


def test_too_many_new_tokens_are_refused_before_allocating(lm, monkeypatch, nothing_allocated):
    """Every generated token of a sample is kept (its id and text), so a budget of 10**12
    tokens could never finish in memory, even though the KV cache stops at the context."""
    small_machine(monkeypatch, 50 * MB)
    with pytest.raises(GptcliError) as info:
        sample(lm, SampleRequest(prompt="x", max_new_tokens=10**12, device="cpu"))
    message = str(info.value)
    assert message.startswith("--max-new-tokens 1000000000000: the KV cache, activations, logits and texts of "
                              "one sample of 1,000,000,000,000 new tokens need about 40.0 TB; ")
    assert re.search(r"this machine has 50.0 MB available; generate fewer tokens \(at most about [\d,]+ fit\)$",
                     message), message


def test_num_samples_that_fit_still_run(lm, monkeypatch):
    small_machine(monkeypatch, 50 * MB)
    _, samples = sample(lm, SampleRequest(prompt="x", max_new_tokens=2, num_samples=4, device="cpu", seed=0))
    assert len(samples) == 4


def test_the_largest_count_named_fits_and_one_more_does_not(lm, monkeypatch):
    small_machine(monkeypatch, 2 * MB)
    with pytest.raises(GptcliError, match=r"at most about ([\d,]+) fit") as info:
        sample(lm, SampleRequest(prompt="x", max_new_tokens=8, num_samples=10_000, device="cpu"))
    fits = int(re.search(r"at most about ([\d,]+) fit", str(info.value)).group(1).replace(",", ""))
    assert fits > 1
    sample(lm, SampleRequest(prompt="x", max_new_tokens=8, num_samples=fits, device="cpu", seed=0))
    with pytest.raises(GptcliError, match="--num-samples"):
        sample(lm, SampleRequest(prompt="x", max_new_tokens=8, num_samples=fits + 1, device="cpu"))


def test_the_cli_refuses_huge_num_samples_in_one_line_exit_2(lm, monkeypatch, nothing_allocated, capsys):
    small_machine(monkeypatch, 8 * 10**9)
    code, out, err = run_cli(["sample", "-c", lm, "-p", "x", "--num-samples", "100000000", "-n", "2",
                              "--device", "cpu"], capsys)
    assert code == 2 and out == "", err
    assert err.startswith("error: --num-samples 100000000: ") and len(err.strip().splitlines()) == 1, err
    assert "this machine has 8.0 GB available; use fewer samples" in err and "Traceback" not in err


def test_serve_refuses_a_max_batch_that_cannot_fit(lm, monkeypatch, capsys):
    small_machine(monkeypatch, 50 * MB)

    def refuse(*args, **kwargs):
        raise AssertionError("the engine allocated its rows before the memory check")

    monkeypatch.setattr(BatchEngine, "__init__", refuse)
    code, out, err = run_cli(["serve", "-c", lm, "--max-batch", "100000000", "--port", "0", "--device", "cpu"],
                             capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --max-batch 100000000: the KV cache, activations and logits of 100,000,000 "
                          "rows of 64 tokens need about ")
    assert "lower --max-batch (at most about " in err


def test_the_kv_cache_estimate_is_the_cache_made():
    from gptcli.model.budget import Sizes, kv_cache_bytes

    model = GPT(ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=40,
                            vocab_size=100))
    cache = model.new_kv_cache(3, 40)
    made = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
    assert kv_cache_bytes(Sizes.of(model), 3, 40) == made
    half = model.to(torch.bfloat16)
    assert kv_cache_bytes(Sizes.of(half), 3, 40) == made // 2


def test_generation_estimate_grows_with_the_samples_and_the_cache():
    from gptcli.infer.generate import generation_bytes

    model = random_model(BytesTokenizer.vocab_size)
    one = generation_bytes(model, 1, 8, 16)
    assert generation_bytes(model, 10, 8, 16) == pytest.approx(10 * one, rel=0.01)
    assert generation_bytes(model, 1, 8, 64) > one
    assert BatchEngine.bytes_needed(model, 16) > generation_bytes(model, 16, 1, 64) - 1


def test_defaults_fit_a_small_machine_for_gpt2_124m():
    """The honest sizes at GPT-2 124M in fp32 (500 MB of weights): one sample of 256 tokens
    takes a few tens of MB, the server's 16 rows of 1,024 tokens about 1.3 GB (the cache
    alone is 1.2 GB), an eval batch of 8 windows under 1 GB: all pass on a 4 GB machine."""
    from gptcli.infer.generate import generation_bytes
    from gptcli.model.budget import Sizes, kv_cache_bytes, loss_bytes, pass_bytes

    with torch.device("meta"):  # the shapes without the weights
        model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    sizes = Sizes.of(model)
    assert kv_cache_bytes(sizes, 16, 1024) == 2 * 12 * 16 * 12 * 1024 * 64 * 4
    assert generation_bytes(model, 1, 16, 16 + 255) < 50 * MB
    assert 1200 * MB < BatchEngine.bytes_needed(model, 16) < 1500 * MB
    assert 200 * MB < pass_bytes(sizes, 8, 1024, 1024, masked=False) + loss_bytes(sizes, 8 * 1024) < 1000 * MB
