"""Weighted data mixtures: `data.inputs` as `{path, weight, name}` sources (data/training/mixture.py)."""

import json
from pathlib import Path

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

from gptcli.config import DataSource, FinetuneRunConfig, config_from_dict
from gptcli.data.training.dataset import SplitTokens, TokenDataset
from gptcli.data.training.mixture import (
    Mixture,
    MixtureSampler,
    Weights,
    floor_sum,
    row_sources,
    rows_by_source,
)
from gptcli.errors import GptcliError
from gptcli.store.runlog import read_metrics
from gptcli.tasks.pretrain import pretrain

CPU = torch.device("cpu")
SHARES = {"web": 0.6, "code": 0.3, "books": 0.1}


def fake_mixture(shares: dict[str, float], sizes=(5000, 700, 3000)) -> Mixture:
    """Sources whose token ids tell them apart: source k holds ids k*10000 + 0, 1, 2, ..."""
    datasets = []
    for k, size in enumerate(sizes[:len(shares)]):
        ids = np.arange(size, dtype=np.int64) + 10000 * k
        datasets.append(TokenDataset(Path(f"src{k}"), None, {"train": SplitTokens([ids]), "val": SplitTokens([ids])},
                                     {"train": 1.0, "val": 1.0}, f"sha{k}"))
    sources = [DataSource(path=f"src{k}", weight=w, name=name) for k, (name, w) in enumerate(shares.items())]
    return Mixture(Weights.of(sources), datasets, None)


def test_proportions_over_1000_steps_within_2_percent_of_the_weights():
    mixture = fake_mixture(SHARES)
    sampler = MixtureSampler(mixture, batch_size=4, block_size=16, seed=1234, device=CPU, grad_accum=2)
    rows = np.zeros(3, dtype=np.int64)
    for step in range(1000):
        for micro in range(2):
            x, y = sampler.batch(step, micro)
            source = x[:, 0].numpy() // 10000  # (B,): every window lies inside one source
            assert (x.numpy() // 10000 == source[:, None]).all() and torch.equal(x[:, 1:], y[:, :-1])
            rows += np.bincount(source, minlength=3)
    got = rows / rows.sum()
    for share, weight in zip(got, SHARES.values()):
        assert abs(share - weight) < 0.02
    # what the metrics report is what was drawn, without drawing it again
    assert sampler.tokens_by_source(1000) == {name: int(n) * 16 for name, n in zip(SHARES, rows)}


def test_draws_are_deterministic_and_any_split_of_the_global_batch_sees_the_same_rows():
    mixture = fake_mixture(SHARES)

    def global_rows(batch_size, grad_accum, world_size, step):
        sampler = MixtureSampler(mixture, batch_size, 16, 7, CPU, grad_accum, world_size)
        return torch.cat([sampler.batch(step, micro, rank)[0]
                          for micro in range(grad_accum) for rank in range(world_size)])

    for step in (0, 1, 123):
        whole = global_rows(8, 1, 1, step)
        assert torch.equal(whole, global_rows(8, 1, 1, step))
        assert torch.equal(whole, global_rows(4, 2, 1, step))
        assert torch.equal(whole, global_rows(2, 2, 2, step))
        assert torch.equal(whole, global_rows(1, 4, 2, step))
    assert not torch.equal(global_rows(8, 1, 1, 0), global_rows(8, 1, 1, 1))


def test_rows_per_source_are_counted_exactly_without_drawing():
    weights = Weights.of([DataSource("a", 3.0, "a"), DataSource("b", 1.0, "b"), DataSource("c", 0.01, "c")])
    for seed in (0, 99, 2**64 - 1):
        for rows in (0, 1, 13, 4096, 50_001):
            drawn = np.bincount(row_sources(weights, seed, 0, 0, rows), minlength=3).tolist()
            assert rows_by_source(weights, seed, 0, rows) == drawn
    counts = rows_by_source(weights, 5, 0, 10**12)  # a huge run: instant, and on the weights
    assert sum(counts) == 10**12 and abs(counts[2] / 10**12 - 0.01 / 4.01) < 1e-9
    assert floor_sum(10, 7, 3, 5) == sum((3 * i + 5) // 7 for i in range(10))


@pytest.mark.parametrize(("inputs", "message"), [
    ([{"path": "a", "weight": 0}], r"^data.inputs\[0\].weight: must be greater than 0, got 0.0$"),
    ([{"path": "a", "weight": 1}, {"path": "b", "weight": -2}], r"^data.inputs\[1\].weight: must be greater"),
    ([{"path": "a", "weight": 1}, {"weight": 1}], r"^data.inputs\[1\].path: missing"),
    ([{"path": "a"}], r"^data.inputs\[0\].weight: missing"),
    ([{"path": "a", "weight": "lots"}], r"^data.inputs\[0\].weight: expected a number, got 'lots'$"),
    ([{"path": "a", "wieght": 1}], r"^data.inputs\[0\].wieght: unknown key \(did you mean 'weight'\?\)$"),
    ([{"path": "a", "weight": 1, "name": "x"}, {"path": "b", "weight": 1, "name": "x"}],
     r"^data.inputs\[1\].name: 'x' is already the name of data.inputs\[0\]"),
    ([{"path": "a", "weight": 1, "name": "a b"}], r"^data.inputs\[0\].name: use letters"),
    ([{"path": "a", "weight": 1}, "b"], r"^data.inputs\[1\]: expected a mapping \{path, weight\}"),
    (["a", {"path": "b", "weight": 1}], r"^data.inputs\[0\]: expected a mapping"),
])
def test_bad_mixtures_are_one_line_errors_naming_the_key(inputs, message):
    with pytest.raises(GptcliError, match=message) as caught:
        config_from_dict({"data": {"inputs": inputs}})
    assert "\n" not in str(caught.value)


def test_names_default_to_short_unique_names_from_the_paths():
    cfg = config_from_dict({"data": {"inputs": [
        {"path": "data/web/", "weight": 0.7}, {"path": "code/*.py", "weight": 0.2},
        {"path": "more/web", "weight": 0.1}, {"path": "wiki.jsonl", "weight": 1, "name": "web-2"},
        {"path": "x/web", "weight": 1}]}})
    assert [s.name for s in cfg.data.inputs] == ["web", "code", "web-3", "web-2", "web-4"]
    plain = config_from_dict({"data": {"inputs": ["a", "b"]}})
    assert plain.data.inputs == ["a", "b"] and not plain.data.is_mixture
    with pytest.raises(GptcliError, match=r"^data.inputs: a weighted mixture of sources is for pretraining"):
        config_from_dict({"data": {"inputs": [{"path": "a", "weight": 1}]}}, FinetuneRunConfig)


def test_sources_must_share_one_tokenizer(tmp_path):
    from gptcli.data.tokenized.shards import tokenize_corpus

    corpus = write_corpus(tmp_path / "corpus")
    tokenize_corpus([str(corpus)], tmp_path / "bytes", tokenizer="bytes")
    tokenize_corpus([str(corpus)], tmp_path / "chars", tokenizer="char")
    data = config_from_dict({"data": {"inputs": [{"path": str(tmp_path / "bytes"), "weight": 1},
                                                 {"path": str(tmp_path / "chars"), "weight": 1}]}}).data
    with pytest.raises(GptcliError, match=r"^data.inputs: the sources do not share one tokenizer: bytes has "
                                          r"bytes \(257 ids\), chars has char\(54\) .*use bytes or a fixed"):
        Mixture.open(data, 1)


def write_prose(folder: Path) -> Path:
    """20 documents of English-like text, unlike the Python of write_corpus."""
    folder.mkdir(parents=True)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    for i in range(20):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(300)) + ".\n"
        (folder / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A 20-step run on code 75% + prose 25% straight, and the same as 10 steps + --resume."""
    root = tmp_path_factory.mktemp("mixture")
    with own_cache(root):
        inputs = [{"path": str(write_corpus(root / "code")), "weight": 3},
                  {"path": str(write_prose(root / "prose")), "weight": 1}]
        cfg = tiny_config(inputs, root / "runs" / "straight", max_steps=20, log_every=1, lr_decay_steps=20)
        pretrain(config_from_dict(cfg))
        pretrain_split_and_resumed(cfg, root / "runs" / "split", first_steps=10)
    return root, cfg


def test_resume_of_a_mixture_run_is_exact(mixture_run):
    root, _ = mixture_run
    straight, split = read_metrics(root / "runs" / "straight"), read_metrics(root / "runs" / "split")
    assert straight == [{**r, "tokens_per_sec": s["tokens_per_sec"], "mfu": s["mfu"]} if "mfu" in r else r
                        for r, s in zip(split, straight)]  # losses, val losses and token counts
    last = straight[-1]
    assert set(last["tokens_by_source"]) == {"code", "prose"} and last["tokens_seen"] == 20 * 4 * 32
    assert sum(last["tokens_by_source"].values()) == last["tokens_seen"]
    assert abs(last["tokens_by_source"]["code"] / last["tokens_seen"] - 0.75) < 0.05
    assert {"val_loss/code", "val_loss/prose", "val_bpb/code", "val_bpb/prose"} <= set(last)
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss/code"] + 0.25 * last["val_loss/prose"])


def test_resume_refuses_a_changed_mixture(mixture_run, tmp_path):
    root, cfg = mixture_run
    changed = json.loads(json.dumps(cfg))
    changed["data"]["inputs"][0]["weight"] = 2
    with own_cache(root), pytest.raises(GptcliError, match=r"the mixture in data.inputs .* differs"):
        pretrain(config_from_dict(changed), resume=True)


def test_info_runs_and_eval_of_a_mixture_run(mixture_run, capsys):
    root, _ = mixture_run
    run = root / "runs" / "straight"
    at_10 = next(r for r in read_metrics(run) if r["step"] == 10 and "val_loss" in r)
    with own_cache(root):
        code, out, _ = run_cli(["info", run / "checkpoints" / "step-000010", "--json"], capsys)
        assert code == 0 and json.loads(out)["tokens_by_source"] == at_10["tokens_by_source"]
        code, _, err = run_cli(["info", run], capsys)
        code_tokens = read_metrics(run)[-1]["tokens_by_source"]["code"]  # 61 of 80 rows: 76.2%
        assert code == 0 and f"tokens by source   code {code_tokens:,} (76.2%)  prose" in err
        code, out, _ = run_cli(["runs", root / "runs", "--json"], capsys)
        assert [json.loads(line)["tokens_by_source"]["code"] for line in out.splitlines()] == [code_tokens] * 2
        code, _, err = run_cli(["runs", root / "runs"], capsys)
        assert code == 0 and "(code 76% prose 24%)" in err
        # eval -c repeats the run's validation exactly: the mixture's and each source's
        code, out, _ = run_cli(["eval", "-c", run / "checkpoints" / "step-000010", "--json"], capsys)
        result = json.loads(out)
        assert code == 0 and result["loss"] == at_10["val_loss"]
        assert result["by_source"]["prose"]["bpb"] == at_10["val_bpb/prose"]
