"""Parity with EleutherAI's lm-evaluation-harness: a small trained checkpoint of each recipe,
exported with export-hf, scored by the harness (its Python API, its `hf` model) on a local
multiple-choice task over a JSONL made here, and by `gptcli eval --task choice` on the same
items: the same acc, acc_norm and acc_bytes, and every choice's log-likelihood within 1e-3."""

import json

import pytest
import torch
from conftest import GPT2_TIKTOKEN, SHARED, needs_gpt2_ranks

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
from gptcli.evals.choice import eval_choice_checkpoint, read_items, score_items
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import load_model, save_checkpoint
from gptcli.store.hf import export_hf

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')")
pytestmark = pytest.mark.slow  # the harness loads the exported models: about 20 s

TASK = """task: gptcli_parity
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
"""


def shakespeare_lines() -> list[str]:
    text = (SHARED / "tinyshakespeare.txt").read_text()
    return [line for line in text.splitlines()[:3000] if len(line) > 20]


def trained_checkpoint(folder, arch: str):
    """A 2-layer model of `arch` with GPT-2's tokenizer, trained 20 steps on Shakespeare."""
    tok = tiktoken_from_file(GPT2_TIKTOKEN)
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=tok.vocab_size))
    ids = torch.tensor(tok.encode("\n".join(shakespeare_lines())))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        starts = torch.randint(0, len(ids) - 65, (4,))
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(folder, model.eval(), tok, "# parity\n")


def items_file(path) -> None:
    """40 items: a line of the play, then its true next line among three others."""
    lines = shakespeare_lines()
    rows = []
    for i in range(40):
        k = 50 + 37 * i
        others = [lines[(k * 7 + j * 101) % len(lines)] for j in (1, 2, 3)]
        choices = [lines[k + 1], *others]
        label = i % 4
        choices[0], choices[label] = choices[label], choices[0]
        if i % 2:  # non-ASCII choices, where characters and UTF-8 bytes differ (acc_norm, acc_bytes)
            choices = [c.replace("e", "é").replace("'", "’") if j % 2 else c for j, c in enumerate(choices)]
        rows.append({"context": lines[k] + ("\n" if i % 3 else ""), "choices": choices, "label": label})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def harness(hf_dir, data, tmp_path, monkeypatch) -> tuple[dict, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gptcli_parity.yaml").write_text(TASK.format(data=data))
    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["gptcli_parity"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=4, device="cpu",
                          log_samples=True)
    samples = sorted(out["samples"]["gptcli_parity"], key=lambda s: s["doc_id"])
    return out["results"]["gptcli_parity"], [[float(r[0][0]) for r in s["resps"]] for s in samples]


@needs_gpt2_ranks
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_harness_and_gptcli_agree(tmp_path, monkeypatch, arch):
    ckpt = trained_checkpoint(tmp_path / "ckpt", arch)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    data = tmp_path / "items.jsonl"
    items_file(data)
    theirs, their_lls = harness(hf_dir, data, tmp_path, monkeypatch)
    _, ours = eval_choice_checkpoint(ckpt, "choice", data, batch_size=4, device="cpu")
    model, tok = load_model(ckpt)
    our_lls = score_items(model, tok, read_items("choice", data), batch_size=4).loglikelihoods
    for mine, other in zip(our_lls, their_lls):
        assert mine == pytest.approx(other, abs=1e-3)
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    assert ours["acc_bytes"] == theirs["acc_bytes,none"]
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-6)
    assert ours["items"] == 40
