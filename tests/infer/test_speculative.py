"""Speculative decoding: greedy tokens equal plain decoding's (both recipes, fp32, bf16 and int8,
a draft model or prompt lookup, past the context), sampled tokens follow the model's own
distribution (a chi-square test against the exact probabilities), the CLI's options and
their refusals."""

import json
import math
import re

import pytest
import torch
from conftest import run_cli

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, CharTokenizer
from gptcli.infer.cpu_layout import for_generation
from gptcli.infer.engine import BatchEngine, Job
from gptcli.infer.generate import SamplingSettings, generate_tokens
from gptcli.infer.speculative import (
    ModelDraft,
    PromptLookup,
    Speculation,
    SpeculationStats,
    speculative_tokens,
)
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import save_checkpoint

BYTES = BytesTokenizer()


def model(arch="gpt2", seed=0, vocab=BYTES.vocab_size, block=64, layers=2, width=32):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, n_layer=layers, n_head=2, n_embd=width, block_size=block,
                      dropout=0.0)
    return GPT(cfg.resolved()).eval()


def greedy(tokens) -> list[int]:
    return [int(t) for t in tokens]


LAYOUTS = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8")}


def for_sampling(net, layout):
    """`net` as `gptcli sample` loads it: cast and laid out for CPU decoding, or int8."""
    dtype, quantize = LAYOUTS[layout]
    return for_generation(net, dtype, quantize)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proposer", ["draft", "itself", "ngram"])
def test_greedy_tokens_are_plain_decodings(arch, layout, proposer):
    """Past the context too (64 tokens, 100 generated)."""
    target = for_sampling(model(arch), layout)
    prompt = BYTES.encode("def add(a, b):\n    return a + b\n\ndef add(")
    plain = greedy(generate_tokens(target, prompt, 100, SamplingSettings(temperature=0)))
    drafts = {"draft": lambda: ModelDraft(for_sampling(model(arch, seed=1, layers=1, width=16), layout)),
              "itself": lambda: ModelDraft(target), "ngram": PromptLookup}
    stats = SpeculationStats()
    got = greedy(speculative_tokens(target, prompt, 100, SamplingSettings(temperature=0), drafts[proposer](), 4,
                                    stats=stats))
    assert got == plain
    assert stats.verifications > 0
    if proposer == "itself":  # a draft that is the model is always right: k + 1 tokens a pass
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_verification > 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_tokens_past_the_context_slide_as_plain_decoding(seed):
    """150 tokens through a 32-token context: four windows. Weights scaled up, so the tokens
    depend on the window (a random model's near-uniform attention hides an off-by-one)."""
    target = model(seed=seed, block=32)
    with torch.no_grad():
        for weight in target.parameters():
            weight.mul_(3)
    prompt = BYTES.encode("def add(a, b):\n    return a + b\n")
    plain = greedy(generate_tokens(target, prompt, 150, SamplingSettings(temperature=0)))
    assert len(set(plain)) > 5
    for proposer in (PromptLookup(), ModelDraft(model(seed=9, layers=1, width=16, block=32))):
        assert greedy(speculative_tokens(target, prompt, 150, SamplingSettings(temperature=0), proposer, 4)) == plain


def exact_distribution(target, prompt, steps, settings) -> dict[tuple[int, ...], float]:
    """The probability of every sequence of `steps` tokens after `prompt`."""
    from gptcli.infer.generate import logits_to_probs

    found = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for seq, p in found.items():
            with torch.no_grad():
                logits = target(torch.tensor([prompt + list(seq)]))[:, -1]
            for token, q in enumerate(logits_to_probs(logits, settings)[0].tolist()):
                grown[seq + (token,)] = p * q
        found = grown
    return found


@pytest.mark.slow  # 10,000 draws each: about 30 s
@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_sampled_tokens_follow_the_models_distribution(proposer):
    """Chi-square of 10,000 speculative draws of 4 tokens (the last three from one pass over two
    guesses: kept or refused, the residual draw, the bonus draw) against their exact
    probabilities. The draft is made peakier than the model, so guesses are often refused."""
    stats_module = pytest.importorskip("scipy.stats")
    settings = SamplingSettings(temperature=1.0)
    target = model(vocab=4, block=16, layers=1, width=16, seed=3)
    prompt = [0, 1, 2, 0, 1]  # repeats, so prompt lookup has guesses to make
    exact = exact_distribution(target, prompt, 4, settings)
    generator = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(exact, 0)
    stats = SpeculationStats()
    small = model(vocab=4, block=16, layers=1, width=8, seed=4)
    with torch.no_grad():
        small.lm_head.weight.mul_(6)  # its guesses far from the model's distribution
    for _ in range(10_000):
        draft = ModelDraft(small) if proposer == "draft" else PromptLookup()
        seq = tuple(int(t) for t in speculative_tokens(target, prompt, 4, settings, draft, 2, generator, stats))
        counts[seq] += 1
    assert 0.05 < stats.acceptance_rate < 0.95 and stats.proposed > 10_000  # kept and refused, two a pass
    observed = [counts[s] for s in exact]
    expected = [10_000 * exact[s] for s in exact]
    assert math.isclose(sum(expected), 10_000, rel_tol=1e-4)
    assert stats_module.chisquare(observed, expected, sum_check=False).pvalue > 0.01


# --- in the batching engine (the server) -------------------------------------------------------


def engine_texts(net, jobs, speculation) -> list[str]:
    """Each job's text when the jobs are submitted together to a 4-row engine."""
    engine = BatchEngine(net, BYTES, max_batch=4, speculation=speculation)
    texts = [""] * len(jobs)

    def collect(i):
        def emit(update):
            texts[i] += update.text
        return emit

    engine.run([Job(prompt, new, settings, collect(i), seed=seed) for i, (prompt, new, settings, seed)
                in enumerate(jobs)])
    return texts


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_the_engine_speculates_for_a_row_alone_and_gives_the_same_text(proposer):
    """Three greedy jobs of different lengths (fp64, so batching cannot flip a greedy token):
    while they share the batch the engine steps them together, once the longest is alone it
    verifies guesses; every text is the plain engine's, and guesses were checked. Weights
    scaled up, so that a token at the wrong position changes the text."""
    net = model(block=128).double()
    with torch.no_grad():
        for weight in net.parameters():
            weight.mul_(3)
    make = {"draft": lambda: ModelDraft(model(seed=1, layers=1, width=16, block=128).double()),
            "ngram": PromptLookup}[proposer]
    greedy_settings = SamplingSettings(temperature=0)
    jobs = [(BYTES.encode("def add(a, b):\n    return a + b\n\ndef add("), new, greedy_settings, None)
            for new in (5, 12, 60)]
    speculation = Speculation(make(), 4)
    assert engine_texts(net, jobs, speculation) == engine_texts(net, jobs, None)
    assert speculation.stats.verifications > 0 and speculation.stats.tokens > speculation.stats.verifications


def test_a_seeded_sampled_job_alone_draws_what_sample_with_the_draft_draws():
    """The engine's speculative rounds take the job's generator as `speculative_tokens` does:
    a seeded request to the server gives `gptcli sample --draft --seed`'s text."""
    net = model()
    prompt, settings = BYTES.encode("def f(x):"), SamplingSettings(temperature=1.0, top_k=20)
    (text,) = engine_texts(net, [(prompt, 30, settings, 5)], Speculation(PromptLookup(), 3))
    tokens = speculative_tokens(net, prompt, 30, settings, PromptLookup(), 3, torch.Generator().manual_seed(5))
    assert text == BYTES.decode([int(t) for t in tokens])


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {
        "model": save_checkpoint(root / "model", model(block=128), BYTES, "# model\n"),
        "draft": save_checkpoint(root / "draft", model(seed=1, layers=1, width=16, block=128), BYTES, "# draft\n"),
        "chars": save_checkpoint(root / "chars", model(vocab=CharTokenizer("abc").vocab_size, block=128), CharTokenizer("abc"), "# chars\n"),
        "long": save_checkpoint(root / "long", model(seed=1, layers=1, width=16, block=256), BYTES, "# long\n"),
        "classifier": save_checkpoint(root / "cls", GPTClassifier(model(block=128), ["a", "b"]), BYTES, "# cls\n"),
    }


@pytest.mark.parametrize("draft", ["draft", "ngram"])
def test_sample_with_a_draft_prints_the_plain_greedy_text_and_how_guesses_fared(checkpoints, capsys, draft):
    args = ["sample", "-c", checkpoints["model"], "-p", "def f(x):\n    return x\n\ndef f(", "-n", "40",
            "--temperature", "0", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = run_cli([*args, "--draft", str(checkpoints.get(draft, draft)), "--draft-tokens", "3"], capsys)
    assert code == 0, err
    speculated = json.loads(out)
    assert speculated["text"] == plain["text"]
    assert set(speculated["speculation"]) == {"verifications", "proposed", "accepted", "acceptance_rate",
                                              "tokens_per_verification"}
    assert "speculation:" in err and "tokens per verification" in err


@pytest.mark.parametrize("extra, message", [
    (["--draft", "ngram", "--draft-tokens", "0"], "--draft-tokens must be 1..16, got 0"),
    (["--draft", "ngram", "--num-samples", "2"], "--draft speeds up one sample at a time"),
    (["--draft", "{chars}"], "has another tokenizer"),
    (["--draft", "{long}"], "reads 256 tokens of context, more than the model's 128"),
    (["--draft", "{classifier}"], "--draft: .* is a classifier"),
])
def test_bad_drafts_are_refused_in_one_line(checkpoints, capsys, extra, message):
    extra = [e.format(**checkpoints) for e in extra]
    code, out, err = run_cli(["sample", "-c", checkpoints["model"], "-p", "x", "-n", "4", *extra], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert re.search(message, err), err
