"""int8 + speculative decoding against llama.cpp, on a trained model of GPT-2 124M's shape.

    python benchmarks/bench_speculative_llama_cpp.py --model runs/gpt2-124m-code --draft runs/gpt2-draft
        [--tokens 128] [--draft-tokens 4] [--rounds 3] [--write]

Batch 1, greedy (or gptcli sampling at --temperature, seeded), the same prompts (bench_speculative.py's code prompts), --tokens new tokens
each. gptcli: the model loaded as `gptcli sample --quantize int8` loads it (int8 weights,
the CPU's faster activation precision), plain, with the draft model (`--draft`, loaded the
same way) and with prompt lookup (`--draft ngram`). llama.cpp, through llama-cpp-python
(opt-in: `pip install llama-cpp-python` builds it, about 7 minutes on 2 cores), on the
same weights exported by `gptcli export-gguf --type q8_0`: its plain greedy decode
(bench_sample.py's loop over its C API, no end-of-text stop) and its own prompt-lookup
mode (`Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k))`, temperature 0;
it stops at end-of-text, so its tokens/s is over the tokens it made). Tokens/s over all
prompts, median of --rounds interleaved rounds; both sides use 2 threads.

The models (EPYC-512, 2026-12-07): `gptcli pretrain configs/gpt2-124m.yaml` on the built-in
corpus with GPT-2's tokenizer, context 256, as far as a quarter of an hour allows, and a 2 x 64
draft on the same data and tokenizer (commands in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_sample import LlamaCppGreedy
from bench_speculative import CODE_PROMPTS
from report import describe_machine, publish

from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings
from gptcli.infer.speculative import ModelDraft, PromptLookup, Speculation
from gptcli.store.gguf_export import export_gguf

THREADS = 2


def gptcli_side(session: GenerationSession, prompts: list, tokens: int, temperature: float):
    def run() -> tuple[int, float, list[list[int]]]:
        settings = GenerationSettings(tokens, temperature=temperature, seed=0)
        start = time.perf_counter()
        outputs = [session.generate(prompt, settings)[0].tokens for prompt in prompts]
        return sum(len(o) for o in outputs), time.perf_counter() - start, outputs
    return run


def llama_plain_side(gguf: Path, prompts: list[list[int]], tokens: int):
    runner = LlamaCppGreedy(gguf, 1, max(len(p) for p in prompts) + tokens)

    def run() -> tuple[int, float, list[list[int]]]:
        outputs, seconds = [], 0.0
        for prompt in prompts:
            _, total, out = runner.generate(prompt, tokens)
            outputs.append(out)
            seconds += total
        return sum(len(o) for o in outputs), seconds, outputs
    return run


def llama_lookup_side(gguf: Path, prompts: list[list[int]], tokens: int, k: int):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    llm = Llama(str(gguf), n_ctx=max(len(p) for p in prompts) + tokens + 8, n_threads=THREADS,
                n_threads_batch=THREADS, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k), verbose=False,
                logits_all=True)

    def run() -> tuple[int, float, list[list[int]]]:
        outputs, start = [], time.perf_counter()
        for prompt in prompts:
            llm.reset()
            made = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if token == llm.token_eos() or len(made) == tokens:
                    break
                made.append(token)
            outputs.append(made)
        return sum(len(o) for o in outputs), time.perf_counter() - start, outputs
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="gptcli's sides sample at this temperature (seeded); llama.cpp's stay greedy")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    loaded = load(args.model, device="cpu", quantize="int8")
    draft = load(args.draft, device="cpu", quantize="int8").model
    plain = GenerationSession(loaded)
    prompts = [plain.prompt(text, raw=True) for text in CODE_PROMPTS]
    ids = [p.ids for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "q8_0.gguf"
        export_gguf(loaded.path, gguf, "q8_0")
        draft_session = GenerationSession(loaded, Speculation(ModelDraft(draft), args.draft_tokens))
        lookup_session = GenerationSession(loaded, Speculation(PromptLookup(), args.draft_tokens))
        sides = {
            "gptcli int8": gptcli_side(plain, prompts, args.tokens, args.temperature),
            f"gptcli int8 + draft ({args.draft})": gptcli_side(draft_session, prompts, args.tokens, args.temperature),
            "gptcli int8 + prompt lookup": gptcli_side(lookup_session, prompts, args.tokens, args.temperature),
            "llama.cpp q8_0": llama_plain_side(gguf, ids, args.tokens),
            "llama.cpp q8_0 + prompt lookup": llama_lookup_side(gguf, ids, args.tokens, args.draft_tokens),
        }
        with torch.inference_mode():
            for run in sides.values():
                run()  # warm-up
            results = {label: [] for label in sides}
            for _ in range(args.rounds):
                for label, run in sides.items():
                    results[label].append(run())
    rate = {label: statistics.median(made / seconds for made, seconds, _ in found) for label, found in results.items()}
    reference = results["gptcli int8"][0][2]
    llama = rate["llama.cpp q8_0"]
    lines = [f"#### int8 + speculative decoding against llama.cpp, GPT-2 124M shape ({time.strftime('%Y-%m-%d')})",
             "", describe_machine(), "",
             f"`python benchmarks/bench_speculative_llama_cpp.py --model {args.model} --draft {args.draft} --tokens "
             f"{args.tokens} --draft-tokens {args.draft_tokens} --rounds {args.rounds} --temperature {args.temperature}`: batch 1, "
             f"gptcli {'greedy' if args.temperature == 0 else f'sampling at temperature {args.temperature}'}, "
             f"llama.cpp greedy, "
             f"{len(prompts)} code prompts, {THREADS} threads each side; tokens/s over the tokens each side made.",
             "", "| side | tokens/s | vs llama.cpp q8_0 | acceptance | tokens equal gptcli int8's |",
             "|---|---|---|---|---|"]
    stats = {f"gptcli int8 + draft ({args.draft})": draft_session.speculation.stats,
             "gptcli int8 + prompt lookup": lookup_session.speculation.stats}
    for label, found in results.items():
        outputs = found[0][2]
        equal = sum(a == b for a, b in zip(outputs, reference))
        accepted = f"{stats[label].acceptance_rate:.2f}" if label in stats else "–"
        lines.append(f"| {label} | {rate[label]:,.1f} | {rate[label] / llama:.2f}× | {accepted} | "
                     f"{equal} of {len(reference)} prompts |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
