"""The compiled decode step (infer/compiled.py) on CPU: the code path CUDA takes minus CUDA
graphs. Greedy tokens equal the eager loop's, past the end of the context too (the sliding
window re-prefills the same fixed-shape cache); one compile serves every request; a failed
compile falls back to eager with a note; `--compile` through the CLI."""

import pytest
import torch
from conftest import run_cli
from serving import random_model

from gptcli.config import ModelConfig
from gptcli.infer import compiled as compiled_module
from gptcli.infer.compiled import CompiledDecode, wants_compiled_decode
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.infer.sample import SampleRequest, sample
from gptcli.model.gpt import GPT

GREEDY = SamplingSettings(temperature=0)


def tokens(model, prompt, steps, compiled=None, num_samples=1):
    return torch.stack(list(generate_tokens(model, prompt, steps, GREEDY, num_samples, compiled=compiled))).tolist()


def llama_model() -> GPT:
    torch.manual_seed(1)
    model = GPT(ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, vocab_size=97))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_greedy_tokens_equal_eager(arch):
    model = random_model(256) if arch == "gpt2" else llama_model()
    step = CompiledDecode(cuda_graphs=False)
    context = model.config.block_size
    steps = context + 20  # past the context: the window slides and the prompt is prefilled again
    prompt = [5, 17, 99 % model.config.vocab_size, 3]
    assert tokens(model, prompt, steps, step) == tokens(model, prompt, steps)
    assert step.fallback is None
    # Another request of the same batch size reuses the compiled step: same shapes, no new compile.
    other = [1, 2, 3, 4, 5, 6, 7]
    with _no_recompile():
        assert tokens(model, other, 10, step) == tokens(model, other, 10)
    assert tokens(model, prompt, 12, step, num_samples=3) == tokens(model, prompt, 12, num_samples=3)


class _no_recompile:
    """Fail if the block compiles anything (dynamo's frame counter stays put)."""

    def __enter__(self):
        from torch._dynamo.utils import counters

        self.counters = counters
        self.before = dict(counters["stats"])

    def __exit__(self, *exc):
        if exc[0] is None:
            assert self.counters["stats"].get("unique_graphs", 0) == self.before.get("unique_graphs", 0)


def test_a_failed_compile_decodes_eagerly_with_a_note(monkeypatch, lm_checkpoint):
    def broken(fn, **options):
        def step(*args):
            raise RuntimeError("no compiler here\nmore detail")
        return step

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    model = random_model(256)
    step = CompiledDecode(cuda_graphs=False)
    assert tokens(model, [1, 2, 3], 8, step) == tokens(model, [1, 2, 3], 8)
    assert step.fallback == "RuntimeError: no compiler here"
    notes = []
    request = SampleRequest(prompt="ab", max_new_tokens=5, temperature=0, compile="on")
    sample(lm_checkpoint, request, on_event=lambda event: notes.append(event.message))
    assert notes == ["the compiled decode step failed (RuntimeError: no compiler here); decoded eagerly"]


def test_auto_compiles_on_cuda_only():
    assert wants_compiled_decode("auto", torch.device("cuda")) and not wants_compiled_decode("auto", torch.device("cpu"))
    assert wants_compiled_decode("on", torch.device("cpu")) and not wants_compiled_decode("off", torch.device("cuda"))


def test_compile_option_through_the_cli(capsys, lm_checkpoint):
    args = ["sample", "-c", lm_checkpoint, "-p", "hello", "-n", "12", "--greedy", "--json"]
    code, eager, _ = run_cli(args + ["--compile", "off"], capsys)
    assert code == 0
    code, compiled, err = run_cli(args + ["--compile", "on"], capsys)
    assert code == 0 and compiled == eager and "decoded eagerly" not in err
    code, _, err = run_cli(args + ["--compile", "sometimes"], capsys)
    assert code == 2 and "--compile must be one of auto, on, off" in err
