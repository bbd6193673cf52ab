"""Classifiers on texts longer than the context (finetune.long_text: pool) and mean pooling
of the hidden states (finetune.pooling): what they compute, that a checkpoint keeps them,
and the config errors."""

import json

import pytest
import torch

from gptcli.config import FinetuneRunConfig, ModelConfig, config_from_dict, dump_yaml
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.data.training.labelled import (
    TextReading,
    encode_windows,
    pad_windows,
    window_starts,
)
from gptcli.errors import GptcliError
from gptcli.evals.classify import predict_probs
from gptcli.infer.load import Classifier, load
from gptcli.infer.sample import classify
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.runtime import Precision
from gptcli.store.checkpoint import (
    classifier_metadata,
    read_metadata,
    save_checkpoint,
    training_config,
)
from gptcli.store.rundir import resolve_checkpoint
from gptcli.tasks.finetune import finetune

CONTEXT = 16
TOKENIZER = BytesTokenizer()
CPU = torch.device("cpu")


def classifier(pooling: str = "last") -> GPTClassifier:
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=CONTEXT, vocab_size=257))
    return GPTClassifier(trunk, ["a", "b", "c"], pooling=pooling).eval()


def loaded(model: GPTClassifier, reading: TextReading = TextReading()) -> Classifier:
    return Classifier(None, model, TOKENIZER, reading)


@pytest.mark.parametrize("length, stride, starts", [
    (10, 2, [0]),  # fits the context: one window
    (16, 8, [0]),
    (17, 8, [0, 1]),  # the last window ends at the text's end
    (40, 8, [0, 8, 16, 24]),
    (40, 16, [0, 16, 24]),
    (41, 5, [0, 5, 10, 15, 20, 25]),
])
def test_windows_cover_the_text_and_end_at_its_end(length, stride, starts):
    assert window_starts(length, CONTEXT, stride) == starts
    covered = set().union(*(range(s, s + CONTEXT) for s in starts))
    assert covered == set(range(max(length, CONTEXT))) or length <= CONTEXT


def in_label_order(model, text, reading: TextReading = TextReading()) -> list[float]:
    probs = loaded(model, reading).probabilities(text)
    return [probs[label] for label in model.labels]


def test_pooled_classification_is_the_mean_of_the_window_logits():
    reading = TextReading("pool", stride=6)
    model = classifier()
    text = "def handler(self, message):\n    return message.get_payload()\n"  # 62 bytes: 9 windows
    ids = torch.tensor(TOKENIZER.encode(text))
    starts = window_starts(len(ids), CONTEXT, 6)
    with torch.no_grad():
        window_logits = torch.cat([model(ids[s:s + CONTEXT][None]) for s in starts])  # (W, K)
    expected = torch.softmax(window_logits.mean(dim=0), dim=-1)
    assert len(starts) == 9
    assert in_label_order(model, text, reading) == pytest.approx(expected.tolist(), abs=1e-6)
    # in a batch with shorter and longer texts (padding, other owners) the same
    texts = ["short", text, text * 3, ""]
    batched = predict_probs(model, encode_windows(TOKENIZER, texts, CONTEXT, reading), TOKENIZER.eot_id, 3,
                            Precision("fp32", "cpu"), CPU)
    assert batched[1] == pytest.approx(expected.numpy(), abs=1e-6)
    assert batched[0] == pytest.approx(in_label_order(model, "short", reading), abs=1e-6)


def test_truncate_keeps_one_row_per_text():
    rows = encode_windows(TOKENIZER, ["x" * 40, "y"], CONTEXT, TextReading("truncate", keep="start"))
    assert [len(r) for r in rows] == [1, 1] and len(rows[0][0]) == CONTEXT
    idx, lengths, owners = pad_windows(rows, TOKENIZER.eot_id, CPU)
    assert idx.shape == (2, CONTEXT) and lengths.tolist() == [CONTEXT, 1] and owners.tolist() == [0, 1]


def test_mean_pooling_ignores_padding():
    model = classifier(pooling="mean")
    short = torch.tensor(TOKENIZER.encode("import asyncio"))
    with torch.no_grad():
        alone = model(short[None])
        hidden = model.hidden_states(short[None])[0]  # (T, C)
        by_hand = model.score(hidden.mean(dim=0))
        for pad in (0, 200):  # whatever fills the padding
            batch = torch.full((2, CONTEXT), pad)
            batch[0, :len(short)] = short
            batch[1] = torch.tensor(TOKENIZER.encode("x" * CONTEXT))
            padded = model(batch, lengths=torch.tensor([len(short), CONTEXT]))
            assert padded[0] == pytest.approx(alone[0], abs=1e-5)
    assert alone[0] == pytest.approx(by_hand, abs=1e-5)
    last = classifier(pooling="last")
    with torch.no_grad():
        assert not torch.allclose(last(short[None]), alone)  # the setting changes what it reads


@pytest.mark.parametrize("key, value, message", [
    ("long_text", "chunk", "finetune.long_text: expected one of truncate, pool; got 'chunk'"),
    ("pooling", "max", "finetune.pooling: expected one of last, mean; got 'max'"),
    ("pool_stride", -1, "finetune.pool_stride: must be 0 (half the context) or more, got -1"),
])
def test_bad_settings_are_one_line_errors(key, value, message):
    with pytest.raises(GptcliError) as info:
        config_from_dict({"finetune": {key: value}}, FinetuneRunConfig)
    assert str(info.value) == message


def write_csv(path, n=24):
    """Texts longer than the context: the class is in their first bytes only."""
    rows = [f"{'vowel' if i % 2 else 'other'}: " + ("aeiou" if i % 2 else "zxqvk") * 3 + " pad" * 10
            for i in range(n)]
    path.write_text("text,label\n" + "".join(f"{t},{t.split(':')[0]}\n" for t in rows))
    return path


@pytest.fixture
def base(tmp_path):
    """An untrained language-model checkpoint with a 16-token context to finetune from."""
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=CONTEXT, vocab_size=257))
    return save_checkpoint(tmp_path / "base", trunk, TOKENIZER, "# base\n")


def ft_config(tmp_path, base, **finetune_keys):
    return config_from_dict({
        "out_dir": str(tmp_path / "ft"), "seed": 3,
        "finetune": {"task": "classify", "init_from": str(base), "train_file": str(write_csv(tmp_path / "d.csv")),
                     "patience": 0, **finetune_keys},
        "train": {"batch_size": 4, "max_steps": 4, "eval_every": 4, "save_every": 4, "log_every": 2,
                  "warmup_steps": 1, "precision": "fp32", "compile": "off", "device": "cpu"},
    }, FinetuneRunConfig)


def test_a_checkpoint_keeps_how_it_reads_texts(tmp_path, base):
    result = finetune(ft_config(tmp_path, base, long_text="pool", pool_stride=4, pooling="mean"))
    checkpoint = resolve_checkpoint(result.run_dir)
    own = load(checkpoint, CPU)
    assert isinstance(own, Classifier)
    assert (own.model.pooling, own.reading) == ("mean", TextReading("pool", "end", 4))
    assert json.loads(read_metadata(checkpoint)["classifier"]) == {  # the checkpoint's own, not config.yaml's
        "pooling": "mean", "long_text": "pool", "truncate": "keep_end", "pool_stride": 4}
    record = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= record["val_naive_bayes_accuracy"] <= 1 and "val_naive_bayes_macro_f1" in record
    text = "vowel: " + "aeiou" * 6
    _, probs = classify(result.run_dir, text, device="cpu")
    assert probs == pytest.approx(own.probabilities(text))


def test_a_stride_beyond_the_context_is_refused(tmp_path, base):
    with pytest.raises(GptcliError, match=r"finetune.pool_stride: 17 is beyond the 16-token context"):
        finetune(ft_config(tmp_path, base, long_text="pool", pool_stride=17))
    assert not (tmp_path / "ft").exists()


def test_old_checkpoints_read_as_before(tmp_path):
    """A classifier saved without these settings (or without a finetune config): last token, end kept."""
    path = save_checkpoint(tmp_path / "old", classifier(), TOKENIZER, "# no config\n")
    old = load(path, CPU)
    assert (old.model.pooling, old.reading) == ("last", TextReading("truncate", "end", 0))
    saved = dump_yaml(config_from_dict({"finetune": {"truncate": "keep_start"}}, FinetuneRunConfig))
    before_pooling = "\n".join(line for line in saved.splitlines() if "pooling:" not in line)
    path = save_checkpoint(tmp_path / "start", classifier(), TOKENIZER, before_pooling)
    start = load(path, CPU)
    assert (start.model.pooling, start.reading) == ("last", TextReading("truncate", "start", 0))
    assert training_config(path).finetune.pooling == "last"
    # A checkpoint written before the settings were stored with its weights reads them from
    # its config.yaml; its weights' metadata wins once it has them.
    config = dump_yaml(config_from_dict({"finetune": {"pooling": "mean", "long_text": "pool"}}, FinetuneRunConfig))
    path = save_checkpoint(tmp_path / "config-only", classifier(), TOKENIZER, config)
    assert (load(path, CPU).model.pooling, load(path, CPU).reading.long_text) == ("mean", "pool")
    path = save_checkpoint(tmp_path / "both", classifier(), TOKENIZER, config,
                           metadata=classifier_metadata("last", TextReading("truncate", "start", 0)))
    assert (load(path, CPU).model.pooling, load(path, CPU).reading) == ("last", TextReading("truncate", "start", 0))
