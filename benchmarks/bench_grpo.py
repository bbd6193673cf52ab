"""GRPO rollouts: the batching engine against generating the group one sequence at a time.

    python benchmarks/bench_grpo.py [--checkpoint runs/sft-letters] [--prompts 16] [--group 8]
                                    [--max-new-tokens 8] [--rounds 3] [--write]

The model: a checkpoint of the GRPO example's starting point (configs/finetune-sft-letters.yaml;
any language model works). The prompts: the first --prompts of the built-in `later-letter`
task, through the model's chat format. Both sides sample at temperature 1 from the same
per-prompt seeds, --group completions per prompt, at most --max-new-tokens each:

- engine: one `GenerationSession.generate_many` call, as tasks/grpo.py draws a step's
  rollouts (each prompt prefilled once, its group decoded as rows of one batch with every
  other prompt's);
- one at a time: `GenerationSession.generate` once per completion (n=1), prompt prefilled each
  time, a KV cache of one row.

Reported per side: the median over --rounds of the seconds and of the completion tokens per
second (a completion's tokens: its text's and the stop id that ended it, what GRPO trains
on), and the engine's tokens/s over the other's. The two sides draw differently (a group's
rows share one generator in the engine), so their completions differ; both are valid samples.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import describe_machine, publish

from gptcli.data.training.examples import later_letter_questions
from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings, Sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/sft-letters")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    args = parser.parse_args()

    # generate=False: the weights as training holds them (fp32, training layout), as GRPO samples
    session = GenerationSession(load(args.checkpoint, device="cpu", generate=False))
    prompts = [session.prompt(r["prompt"]) for r in later_letter_questions()[:args.prompts]]
    settings = GenerationSettings(args.max_new_tokens, temperature=1.0)
    seeds = list(range(1000, 1000 + len(prompts)))

    def engine() -> int:
        groups = session.generate_many(prompts, settings, args.group, max_batch=len(prompts) * args.group,
                                       seeds=seeds)
        return sum(_trained_tokens(s) for group in groups for s in group)

    def one_at_a_time() -> int:
        tokens = 0
        for prompt, seed in zip(prompts, seeds):
            generator = session.seeded_generator(seed)
            for _ in range(args.group):
                (sample,) = session.generate(prompt, settings, 1, generator=generator)
                tokens += _trained_tokens(sample)
        return tokens

    sides = {"engine": engine, "one at a time": one_at_a_time}
    timings: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
    with torch.no_grad():
        engine()  # warm-up: first-call costs out of both timings
        for _ in range(args.rounds):
            for name, run in sides.items():
                start = time.perf_counter()
                tokens = run()
                timings[name].append((time.perf_counter() - start, tokens))
    rates = {name: statistics.median(tokens / seconds for seconds, tokens in runs) for name, runs in timings.items()}
    lines = [f"GRPO rollouts: {args.prompts} prompts x {args.group} completions, at most {args.max_new_tokens} new "
             f"tokens, temperature 1, {args.checkpoint} ({describe_machine()})", "",
             "| side | seconds (median) | completion tokens | tokens/s |", "|---|---|---|---|"]
    for name, runs in timings.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = statistics.median(t for _, t in runs)
        lines.append(f"| {name} | {seconds:.3f} | {tokens:.0f} | {rates[name]:,.0f} |")
    lines += ["", f"engine / one at a time: {rates['engine'] / rates['one at a time']:.2f}x tokens/s "
                  f"(target: at least 3x)"]
    publish("\n".join(lines), args.write)


def _trained_tokens(sample: Sample) -> int:
    """A completion's tokens as GRPO trains them: its text's, and the stop id that ended it."""
    return len(sample.tokens) + (sample.stop_id is not None)


if __name__ == "__main__":
    main()
