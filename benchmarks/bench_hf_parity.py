"""Validation loss of a GPT-2-shaped model under gptcli's eval and under transformers,
on the same tokens.

    python benchmarks/bench_hf_parity.py [--write]

A GPT-2 124M-shaped model (12 x 768, context 1024, vocab 50257) is created randomly in
transformers (no download), saved with save_pretrained, imported with gptcli's import,
and both evaluate the mean next-token loss on the same 8 windows of 1024 tokens of tiny
Shakespeare (GPT-2's tokenizer from ../shared/data/gpt2.tiktoken), in fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import transformers

    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.evals.lm import validation_loss
    from gptcli.runtime import Precision
    from gptcli.store.hf import import_hf_model

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 small's shape
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = import_hf_model(tmp)
    tok = tiktoken_from_file(SHARED / "gpt2.tiktoken")
    ids = torch.tensor(tok.encode((SHARED / "tinyshakespeare.txt").read_text()[:200_000]))
    windows = ids[: 8 * 1025].view(8, 1025)
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(x).logits.reshape(-1, 50257), y.reshape(-1)).item()
    ours_loss = validation_loss(ours, [{"idx": x, "targets": y}], Precision("fp32", "cpu"))["val_loss"]
    lines = [f"### Hugging Face parity: validation loss of an imported GPT-2-shaped model ({time.strftime('%Y-%m-%d')})",
             "", describe_machine(), "",
             "`python benchmarks/bench_hf_parity.py`: GPT-2 124M shape, random weights made in "
             "transformers, imported with `gptcli import-hf`'s code; 8 × 1024 tokens of tiny "
             "Shakespeare; fp32, CPU.", "",
             "| evaluator | val loss (nats/token) |", "|---|---|",
             f"| transformers `GPT2LMHeadModel` | {hf_loss:.6f} |",
             f"| gptcli `validation_loss` (the training loop's eval) | {ours_loss:.6f} |",
             f"| absolute difference | {abs(hf_loss - ours_loss):.2e} |", ""]
    text = "\n".join(lines)
    publish(text, args.write)


if __name__ == "__main__":
    main()
