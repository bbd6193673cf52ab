"""Parity with EleutherAI's lm-evaluation-harness on generation: a small trained checkpoint
of each recipe, exported with export-hf, answers a local `generate_until` task (greedy, at
most 16 new tokens, stopping at a newline or at "that") through the harness's `hf` model and
through `gptcli eval --task generate` on the same items: every item's generated text is the
same, and so is exact_match, the harness's metric configured to normalise answers as SQuAD
does.

The checkpoints read bytes, not GPT-2's tokens: a model of GPT-2's 50k-token vocabulary
trained for seconds answers every line with the same commas or an empty line, while one of
bytes writes words ("That that the th"), so the answers differ between items, hold articles,
capitals and spaces for the metric to normalise, and meet "that", a stop string several
tokens long, at different places. GPT-2's tokenizer through both is test_harness_parity.py's
to check."""

import json
import re
import string

import pytest
import torch
from conftest import needs_shakespeare
from test_harness_parity import shakespeare_lines

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.evals.generation import GenerateRequest, eval_generate_checkpoint
from gptcli.infer.session import GenerationSettings
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import save_checkpoint
from gptcli.store.hf import export_hf

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')")
pytestmark = pytest.mark.slow  # a training of seconds and a harness run per recipe: about a minute

MAX_NEW_TOKENS = 16
STOPS = ("\n", "that")
CONTEXT = 128  # the checkpoints' block_size: a prompt keeps its last CONTEXT - MAX_NEW_TOKENS tokens

# The harness's exact_match (lm_eval.api.metrics.exact_match_hf_evaluate) deletes each of
# `regexes_to_ignore` in turn, then lower-cases. gptcli's (rewards.normalize_answer)
# lower-cases, drops punctuation, then the articles, then collapses whitespace. So here:
# punctuation first (before the articles, as gptcli: "a-b" is the word "ab", not "a" "b"),
# the articles in any case (the text is not lower-cased yet), then every space (a deletion
# cannot collapse runs to one space; so the two differ on texts of the same letters spaced
# differently, which no two texts here are).
SQUAD_REGEXES = ["[" + re.escape(string.punctuation) + "]", r"(?i)\b(a|an|the)\b", r"\s+"]

TASK = """task: gptcli_generate_parity
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: {stops}
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: {regexes}
"""


def writing_checkpoint(folder, arch: str):
    """A 2-layer model of `arch` reading bytes, trained 1000 steps on Shakespeare (about 10 s
    on a CPU): it finishes the word it is given, then writes "the the the"."""
    tok = BytesTokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=64, block_size=CONTEXT, vocab_size=tok.vocab_size))
    ids = torch.tensor(tok.encode("\n".join(shakespeare_lines())))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(1000):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s:s + 65] for s in starts])  # (16, 65): 64 inputs, each with its next byte
        loss = model(batch[:, :-1], batch[:, 1:]) / batch[:, 1:].numel()  # the summed loss, per byte
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(folder, model.eval(), tok, "# generate parity\n")


def prompts() -> list[str]:
    """24 lines of the play, alternately whole with a newline (the answer: the next line) and
    cut three fifths of the way (the answer: the rest of the line, which starts in the middle
    of a word, so the answers differ from item to item); then a passage longer than the room
    the context leaves, which both sides crop to its last CONTEXT - MAX_NEW_TOKENS tokens."""
    lines = [shakespeare_lines()[60 + 41 * i] for i in range(24)]
    asked = [line + "\n" if i % 2 == 0 else line[:len(line) * 3 // 5] for i, line in enumerate(lines)]
    return asked + ["\n".join(shakespeare_lines()[1200:1215]) + "\n"]


def with_references(predictions: list[str]) -> list[str]:
    """References that make exact_match about 0.5: for items 0, 1, 4, 5, ... the prediction
    changed only in what the normalisation drops (an article, case, a full stop), for the
    others a line of the play that is no prediction (each kind on both forms of prompt)."""
    lines = shakespeare_lines()
    return [f"The {p.upper()}." if i % 4 < 2 else lines[1400 + i] for i, p in enumerate(predictions)]


def write_items(path, prompts: list[str], references: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(prompts, references)))


def gptcli_generate(ckpt, data, predictions) -> tuple[list[str], dict]:
    """Each item's prediction (read back from the predictions file) and the metrics."""
    request = GenerateRequest(str(data), metrics=("exact_match",),
                              settings=GenerationSettings(temperature=0.0, stops=STOPS),
                              max_new_tokens=MAX_NEW_TOKENS, predictions=predictions)
    _, metrics = eval_generate_checkpoint(ckpt, request, device="cpu")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return [row["prediction"] for row in rows], metrics


def harness_generate(hf_dir, data, tmp_path, monkeypatch) -> tuple[list[str], list[str], dict]:
    """Each item's raw generation (`resps`), its filtered one (`filtered_resps`, what the
    metric scores) and the results, from the harness's Python API, offline."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gptcli_generate_parity.yaml").write_text(
        TASK.format(data=data, stops=json.dumps(STOPS), max_new_tokens=MAX_NEW_TOKENS,
                    regexes=json.dumps(SQUAD_REGEXES)))
    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,max_length={CONTEXT}",
                          tasks=["gptcli_generate_parity"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          batch_size=1, device="cpu", log_samples=True)
    samples = sorted(out["samples"]["gptcli_generate_parity"], key=lambda s: s["doc_id"])
    return ([s["resps"][0][0] for s in samples], [s["filtered_resps"][0] for s in samples],
            out["results"]["gptcli_generate_parity"])


@needs_shakespeare
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_harness_and_gptcli_generate_the_same_answers(tmp_path, monkeypatch, arch):
    ckpt = writing_checkpoint(tmp_path / "ckpt", arch)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    asked = prompts()
    lengths = [len(p.encode()) for p in asked]  # in tokens: one per byte
    assert max(lengths[:-1]) <= CONTEXT - MAX_NEW_TOKENS < lengths[-1]  # only the last one is cropped

    # gptcli's greedy answers first (the references are made from them), then the real run
    data = tmp_path / "items.jsonl"
    write_items(data, asked, [""] * len(asked))
    first, _ = gptcli_generate(ckpt, data, tmp_path / "first.jsonl")
    write_items(data, asked, with_references(first))
    ours, our_metrics = gptcli_generate(ckpt, data, tmp_path / "predictions.jsonl")
    assert ours == first
    assert sum(bool(p) for p in ours) >= 3 and len(set(ours)) >= 4  # answers, and not all one
    assert our_metrics["generated_tokens"] < MAX_NEW_TOKENS * len(asked)  # some stopped early

    raw, filtered, theirs = harness_generate(hf_dir, data, tmp_path, monkeypatch)
    assert raw == ours and filtered == ours
    assert 0 < our_metrics["exact_match"] < 1
    assert our_metrics["exact_match"] == pytest.approx(theirs["exact_match,none"], abs=1e-12)
    assert our_metrics["exact_match_stderr"] == pytest.approx(theirs["exact_match_stderr,none"], rel=1e-6)
