"""The DPO example: does the tuned model's greedy answer read like the chosen answers, more
than the model it started from did?

    python benchmarks/bench_dpo.py [--run runs/dpo-docstrings] [--limit 200] [--write]

The run is a finished `gptcli finetune configs/finetune-dpo.yaml` (any DPO run works). Its
held-out pairs are rebuilt from its config (the same `train_file`, `val_fraction` and seed
that split them), and both the starting checkpoint (`finetune.init_from`) and the run's best
answer every held-out prompt greedily (at most 48 new tokens). An answer prefers the chosen
side when its SQuAD token F1 against the chosen answer beats its F1 against the rejected one
(the rejected one wins the other way; equal scores are ties). Reported with the counts, beside
the run's validation reward accuracy at step 0 and at its best.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from report import describe_machine, publish

from gptcli.config import FinetuneRunConfig, load_config
from gptcli.data.training.examples import finetune_records
from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings
from gptcli.rewards import token_f1
from gptcli.store.checkpoint import CONFIG_YAML
from gptcli.store.rundir import resolve_checkpoint


def preferences(checkpoint: Path, pairs: list[dict]) -> dict[str, int]:
    """How many greedy answers to the pairs' prompts are nearer the chosen answer, nearer
    the rejected one, or neither."""
    session = GenerationSession(load(checkpoint, device="cpu", precision="fp32"))
    prompts = [session.fit(session.prompt(pair["prompt"]), 48) for pair in pairs]
    answers = session.generate_many(prompts, GenerationSettings(48, temperature=0.0), max_batch=32)
    counts = {"chosen": 0, "rejected": 0, "tie": 0}
    for pair, (answer,) in zip(pairs, answers):
        chosen, rejected = token_f1(answer.text, [pair["chosen"]]), token_f1(answer.text, [pair["rejected"]])
        counts["chosen" if chosen > rejected else "rejected" if rejected > chosen else "tie"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/dpo-docstrings")
    parser.add_argument("--limit", type=int, default=200, help="held-out pairs to answer")
    parser.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    args = parser.parse_args()

    run = Path(args.run)
    cfg = load_config(run / CONFIG_YAML, cls=FinetuneRunConfig)
    _, val, _ = finetune_records(cfg)
    pairs = val[:args.limit]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r for r in evals if "val_rewards/accuracies" in r]
    started = time.perf_counter()
    sides = {"start (" + cfg.finetune.init_from + ")": preferences(resolve_checkpoint(cfg.finetune.init_from), pairs),
             "tuned (" + str(run) + ", best)": preferences(resolve_checkpoint(run), pairs)}
    lines = [f"DPO example: greedy answers to {len(pairs)} held-out prompts, nearer (SQuAD token F1) the chosen or "
             f"the rejected answer ({describe_machine()}; {time.perf_counter() - started:.0f} s)", "",
             f"validation reward accuracy: {accuracy[0]['val_rewards/accuracies']:.3f} at step 0, best "
             f"{max(r['val_rewards/accuracies'] for r in accuracy):.3f}", "",
             "| model | nearer chosen | nearer rejected | tie |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['chosen']} | {c['rejected']} | {c['tie']} |" for name, c in sides.items()]
    publish("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
