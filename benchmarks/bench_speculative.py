"""Speculative decoding at batch 1: plain greedy decoding against the same model with a draft
model's guesses and with prompt lookup, side by side, same prompts, same run.

    python benchmarks/bench_speculative.py --model runs/demo --draft runs/demo-draft
        [--lookup-model runs/instruct-docstrings] [--tokens 200] [--draft-tokens 4] [--rounds 3] [--write]

Free text: prompts that open Python code (`def `, `class `, `import `, ...), --tokens new
tokens each, greedy, fp32, the models as `gptcli sample` loads them. Prompt lookup is timed on
--lookup-model (an instruct model) answering the built-in docstring task's prompts, where an
answer can copy words of the signature; and on the plain model continuing code that repeats
itself. Reported per side: the median over --rounds of tokens/s, the speed-up over plain
decoding, the acceptance rate and tokens per verification, and whether every greedy token
equals plain decoding's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import describe_machine, publish

from gptcli.data.training.examples import stdlib_docstring_pairs
from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings
from gptcli.infer.speculative import ModelDraft, PromptLookup, Speculation

CODE_PROMPTS = ["def ", "class ", "import os\n", "    def __init__(self", "if __name__ == ", "for i in range("]


def timed(session: GenerationSession, prompts: list, tokens: int) -> tuple[float, list[list[int]]]:
    settings = GenerationSettings(tokens, temperature=0.0)
    start = time.perf_counter()
    outputs = [session.generate(prompt, settings)[0].tokens for prompt in prompts]
    return time.perf_counter() - start, outputs


def compare(name: str, model_path: str, prompts_text: list[str], proposers: dict, args, raw: bool) -> list[str]:
    loaded = load(model_path, device="cpu", precision="fp32")
    plain = GenerationSession(loaded)
    prompts = [plain.prompt(text, raw=raw) for text in prompts_text]
    sides = {"plain": plain, **{label: GenerationSession(loaded, Speculation(make(), args.draft_tokens))
                                for label, make in proposers.items()}}
    with torch.inference_mode():
        for session in sides.values():  # warm-up
            timed(session, prompts[:1], 8)
        runs = {label: [] for label in sides}
        for _ in range(args.rounds):
            for label, session in sides.items():
                runs[label].append(timed(session, prompts, args.tokens))
    reference = runs["plain"][0][1]
    made = sum(len(t) for t in reference)
    rate = {label: statistics.median(made / seconds for seconds, _ in found) for label, found in runs.items()}
    rows = []
    for label, session in sides.items():
        spec = session.speculation
        same = all(outputs == reference for _, outputs in runs[label])
        rows.append(f"| {name} | {label} | {rate[label]:,.0f} | {rate[label] / rate['plain']:.2f}× | "
                    f"{spec.stats.acceptance_rate:.2f} | {spec.stats.tokens_per_verification:.2f} | "
                    f"{'yes' if same else 'NO'} |" if spec else
                    f"| {name} | plain | {rate[label]:,.0f} | 1.00× | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo")
    parser.add_argument("--draft", default="runs/demo-draft")
    parser.add_argument("--lookup-model", default="runs/instruct-docstrings")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    args = parser.parse_args()
    draft = load(args.draft, device="cpu", precision="fp32").model
    rows = compare(f"{args.model}, code prompts", args.model, CODE_PROMPTS,
                   {f"draft {args.draft}": lambda: ModelDraft(draft), "prompt lookup": PromptLookup}, args, raw=True)
    if args.lookup_model:
        docstrings = [r["prompt"] for r in stdlib_docstring_pairs(limit=12, seed=1)]
        rows += compare(f"{args.lookup_model}, docstring prompts", args.lookup_model, docstrings,
                        {"prompt lookup": PromptLookup}, args, raw=False)
    lines = [f"Speculative decoding, batch 1, greedy, {args.tokens} new tokens per prompt, k = {args.draft_tokens}, "
             f"median of {args.rounds} ({describe_machine()}; {torch.get_num_threads()} threads)", "",
             "| model, prompts | side | tokens/s | over plain | acceptance | tokens per verification | "
             "tokens equal plain |", "|---|---|---|---|---|---|---|", *rows]
    publish("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
