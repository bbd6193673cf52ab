"""The batching engine: jobs decoded together give what each gives alone (`generate_tokens`,
draw for draw), rows are reused and kept contiguous, cancelled and failed jobs end with
their reason and free their rows; and per-row positions in the model itself."""

import threading

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.infer.engine import BatchEngine, Job, Update
from gptcli.infer.generate import SampleText, SamplingSettings, generate_tokens
from gptcli.model.gpt import GPT

TOKENIZER = BytesTokenizer()


def fp64_model(arch: str) -> GPT:
    """fp64, so batching cannot flip a greedy choice through rounding."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=32,
                            block_size=64, vocab_size=257)).eval().double()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # the llama recipe starts its head at zero
    return model


class Collected:
    """Every update of one job; `done` is set when all its choices have finished."""

    def __init__(self, n: int):
        self.texts, self.finish, self.tokens = [""] * n, [None] * n, [0] * n
        self.done = threading.Event()

    def __call__(self, update: Update) -> None:
        self.texts[update.choice] += update.text
        if update.finish:
            self.finish[update.choice], self.tokens[update.choice] = update.finish, update.tokens
            if None not in self.finish:
                self.done.set()


def alone(model, job: Job) -> list[str]:
    """The texts `generate_tokens` gives the job on its own, as `sample` assembles them."""
    generator = None if job.seed is None else torch.Generator().manual_seed(job.seed)
    texts = [SampleText(TOKENIZER, job.stops) for _ in range(job.n)]
    for tokens in generate_tokens(model, job.prompt, job.max_new_tokens, job.settings, job.n, generator):
        for text, token in zip(texts, tokens.tolist()):
            text.add(token)
    return [t.text + t.finish() for t in texts]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_jobs_batched_together_give_what_each_gives_alone(arch):
    model = fp64_model(arch)
    engine = BatchEngine(model, TOKENIZER, max_batch=4).start()
    settings = [SamplingSettings(0), SamplingSettings(1.0, top_k=20), SamplingSettings(0.7, top_p=0.9)]
    jobs = []
    for i in range(10):  # 15 rows through 4: jobs wait, join mid-batch and reuse freed rows
        collected = Collected(1 + i % 2)
        job = Job(list(range(1 + i, 5 + 2 * i)), 8 + 2 * i, settings[i % 3], collected, n=1 + i % 2, seed=100 + i)
        jobs.append((job, collected))
        engine.submit(job)
    for _, collected in jobs:
        assert collected.done.wait(30)
    engine.stop()
    for job, collected in jobs:
        assert collected.texts == alone(model, job)
        assert all(reason in ("stop", "length") for reason in collected.finish)
    assert engine.load == (0, 0)


class WithIds(Collected):
    """Also the ids each choice's last update carries."""

    def __init__(self, n: int):
        super().__init__(n)
        self.ids = [()] * n

    def __call__(self, update: Update) -> None:
        super().__call__(update)
        if update.finish:
            self.ids[update.choice] = update.ids


def test_run_drains_jobs_on_the_callers_thread_as_the_thread_would():
    """`run` (evaluation, rollouts): 9 rows through 3, each job's text what it gives alone,
    its ids those of its text; a failing step raises after ending every job with "error"."""
    model = fp64_model("llama")
    engine = BatchEngine(model, TOKENIZER, max_batch=3)
    jobs = [Job(list(range(2 + i, 6 + i)), 6 + i, SamplingSettings(0.0 if i % 2 else 1.0), WithIds(1 + i % 3),
                n=1 + i % 3, seed=i) for i in range(5)]
    engine.run(jobs)
    for job in jobs:
        assert job.emit.done.is_set() and job.emit.texts == alone(model, job)
        assert [TOKENIZER.decode(list(ids)) for ids in job.emit.ids] == job.emit.texts
    assert engine.load == (0, 0)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(model, "logits", lambda hidden: (_ for _ in ()).throw(RuntimeError("injected")))
    failed = Collected(2)
    with pytest.raises(RuntimeError, match="injected"):
        engine.run([Job([1, 2], 5, SamplingSettings(0), failed, n=2), Job([3], 5, SamplingSettings(0), Collected(1))])
    monkeypatch.undo()
    assert failed.finish == ["error", "error"] and engine.load == (0, 0)


def test_a_cancelled_job_ends_and_frees_its_rows():
    model = fp64_model("gpt2")
    engine = BatchEngine(model, TOKENIZER, max_batch=1)
    long, short = Collected(1), Collected(1)
    first = Job([1, 2], 60, SamplingSettings(0), long)
    engine.submit(first)
    engine.submit(Job([3], 4, SamplingSettings(0), short))
    first.cancel()  # before the engine runs: it is dropped at admission
    engine.start()
    assert long.done.wait(30) and short.done.wait(30)
    engine.stop()
    assert long.finish == ["cancelled"] and short.finish == ["length"] and short.tokens == [4]
    assert engine.finished == {"cancelled": 1, "length": 1}


def test_stop_cancels_waiting_and_running_jobs():
    model = fp64_model("gpt2")
    engine = BatchEngine(model, TOKENIZER, max_batch=1)
    jobs = [Collected(1) for _ in range(3)]
    for collected in jobs:
        engine.submit(Job([1], 60, SamplingSettings(0), collected))
    engine.start()
    engine.stop()
    assert all(c.done.is_set() for c in jobs)
    assert {c.finish[0] for c in jobs} <= {"length", "cancelled"} and "cancelled" in jobs[-1].finish
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(Job([1], 2, SamplingSettings(0), Collected(1)))


def test_a_failing_step_ends_its_jobs_with_error_and_the_engine_goes_on(monkeypatch):
    model = fp64_model("gpt2")
    engine = BatchEngine(model, TOKENIZER, max_batch=2)
    real = model.logits
    calls = {"n": 0}

    def fail_once(hidden):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(hidden)

    monkeypatch.setattr(model, "logits", fail_once)
    failed, later = Collected(1), Collected(1)
    engine.start()
    engine.submit(Job([1, 2], 10, SamplingSettings(0), failed))
    assert failed.done.wait(30)
    engine.submit(Job([1, 2], 10, SamplingSettings(0), later))
    assert later.done.wait(30)
    engine.stop()
    assert failed.finish == ["error"] and later.finish == ["length"] and later.tokens == [10]


def test_jobs_that_cannot_fit_are_refused():
    engine = BatchEngine(fp64_model("gpt2"), TOKENIZER, max_batch=2)
    for job in (Job([1] * 60, 5, SamplingSettings(0), print), Job([1], 5, SamplingSettings(0), print, n=3),
                Job([], 5, SamplingSettings(0), print)):
        with pytest.raises(ValueError):
            engine.submit(job)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_at_their_own_positions_equal_each_row_alone(arch):
    """Per-row input_pos (B, T): two sequences of different lengths decode one token each
    in one batch, with the logits each gets from a batch of its own."""
    model = fp64_model(arch)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    cache = model.new_kv_cache(2, 16)
    alone_logits = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            own = model.new_kv_cache(1, 16)
            model.hidden_states(torch.tensor([prompt]), own.prefix(len(prompt)), torch.arange(len(prompt)))
            model.hidden_states(torch.tensor([prompt]), cache.rows(row, row + 1).prefix(len(prompt)),
                                torch.arange(len(prompt)))
            hidden = model.hidden_states(torch.tensor([[3]]), own, torch.tensor([len(prompt)]))
            alone_logits.append(model.logits(hidden[:, -1]))
        positions = torch.tensor([[len(p)] for p in prompts])  # (B, 1): 5 and 2
        together = model.logits(model.hidden_states(torch.tensor([[3], [3]]), cache, positions)[:, -1])
    torch.testing.assert_close(together, torch.cat(alone_logits), rtol=0, atol=1e-12)


def test_rows_moved_into_holes_keep_their_choices():
    """A finished job's rows are refilled from the end, which can put a job's choices out
    of order; each choice must still get its own row's tokens (what it gets alone)."""
    model = fp64_model("gpt2")
    engine = BatchEngine(model, TOKENIZER, max_batch=4)
    short, sampled = Collected(1), Collected(2)
    engine.submit(Job([97, 98, 99], 1, SamplingSettings(0), short))
    job = Job([1, 2, 3], 20, SamplingSettings(1.0, top_k=3), sampled, n=2, seed=1)
    engine.submit(job)
    engine.start()
    assert short.done.wait(30) and sampled.done.wait(30)
    engine.stop()
    assert sampled.texts == alone(model, job)


def test_a_tiny_temperature_or_top_p_samples_the_most_likely_token():
    model = fp64_model("gpt2")
    greedy = alone(model, Job([1, 2, 3], 10, SamplingSettings(0), print))
    for settings in (SamplingSettings(1e-300), SamplingSettings(1.0, top_p=1e-320)):
        assert alone(model, Job([1, 2, 3], 10, settings, print, seed=0)) == greedy
