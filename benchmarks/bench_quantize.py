"""Weight-only int8 generation (`--quantize int8`): decode speed and what it costs in quality.

    python benchmarks/bench_quantize.py [--shapes mid 124M] [--tokens 128] [--checkpoint runs/demo]
        [--threads N] [--skip-speed] [--skip-quality] [--write]

Speed: a random GPT-2-shaped model made in transformers and imported (bench_sample.py's
shapes), prepared as `gptcli sample` prepares it (`for_generation(model, dtype, quantize)`),
greedy decoding of --tokens new tokens after an 8-token prompt at batch 1 and 8; tokens/s
after the first token, median of interleaved rounds, for fp32 and bf16 weights and int8
weights with fp32 and with bf16 activations. On a machine shared with other work, torch's
threads wait on each other's descheduled peers at every op; --threads 1 gives steadier numbers.

Quality, per model, of bf16 weights and of int8 weights with fp32 and with bf16 activations
against fp32 (each model prepared as sampling prepares it): validation loss, through
`eval_lm_checkpoint` (a trained checkpoint's own validation, as `gptcli eval -c CKPT`
computes it) or `validation_loss` (the random GPT-2-shaped model, on 8 windows of text it
sampled itself at temperature 1: a random model's loss on any other text is about ln(vocab)
whatever its weights); and greedy agreement: 200 steps decoded along fp32's greedy
tokens (rows of prompts cut from the evaluated text; each step feeds both models fp32's
token), the share of steps where the int8 model's most likely token is fp32's, and how
many tokens free-running greedy generation of both agree on before they first differ. A
random GPT-2 with transformers' initialisation is nearly uniform and agrees trivially: the
trained checkpoint is the telling row.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import describe_machine, publish

SHAPES = {"mid": (6, 6, 384, 256, 65), "124M": (12, 12, 768, 1024, 50257)}  # bench_sample.py's
VARIANTS = (("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("bf16", "int8"))
AGREEMENT_STEPS = 200


def random_gpt2(shape: str):
    """A random GPT-2 of `shape` made in transformers and imported (fp32)."""
    import transformers

    from gptcli.store.hf import import_hf_model

    transformers.logging.set_verbosity_error()
    n_layer, n_head, n_embd, ctx, vocab = SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=ctx,
                                     vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp)
        return import_hf_model(tmp).eval()


def prepared(model, precision: str, quantize: str):
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.runtime import DTYPES

    return for_generation(copy.deepcopy(model), DTYPES[precision], quantize)


def decode_speed(shape: str, tokens: int, rounds: int) -> list[tuple]:
    """(shape, batch, precision, quantize, tokens/s) for every variant at batch 1 and 8."""
    from gptcli.infer.generate import SamplingSettings, generate_tokens

    base = random_gpt2(shape)
    vocab, ctx = SHAPES[shape][4], SHAPES[shape][3]
    prompt = torch.randint(1, vocab, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    new = min(tokens, ctx - len(prompt))
    models = {variant: prepared(base, *variant) for variant in VARIANTS}
    rows = []
    for batch in (1, 8):
        def run(model) -> float:
            start = None
            for token in generate_tokens(model, prompt, new, SamplingSettings(temperature=0), batch):
                if start is None:
                    start = time.perf_counter()  # after prefill and the first token
            return batch * (new - 1) / (time.perf_counter() - start)

        for model in models.values():
            run(model)  # warm-up
        speeds = {variant: [] for variant in VARIANTS}
        for _ in range(rounds):
            for variant, model in models.items():
                speeds[variant].append(run(model))
        rows += [(shape, batch, *variant, statistics.median(v)) for variant, v in speeds.items()]
    return rows


@torch.inference_mode()
def forced_agreement(reference, other, prompts: torch.Tensor, steps: int) -> float:
    """Share of `steps` decode steps (per row of `prompts`, (B, T)) at which `other`'s most
    likely next token is `reference`'s, both fed `reference`'s greedy token each step."""
    from gptcli.infer.generate import decode_one_token, prefill

    caches = [m.new_kv_cache(prompts.size(0), prompts.size(1) + steps) for m in (reference, other)]
    logits = [prefill(m, c, prompts) for m, c in zip((reference, other), caches)]
    same = 0
    for step in range(steps):
        token = logits[0].argmax(-1)
        same += int((logits[1].argmax(-1) == token).sum())
        position = torch.tensor([prompts.size(1) + step])
        logits = [decode_one_token(m, c, token, position) for m, c in zip((reference, other), caches)]
    return same / (steps * prompts.size(0))


def free_agreement(reference, other, prompt: list[int], steps: int) -> int:
    """Tokens free-running greedy generation of both agree on before the first difference."""
    from gptcli.infer.generate import SamplingSettings, generate_tokens

    greedy = SamplingSettings(temperature=0)
    pairs = zip(generate_tokens(reference, prompt, steps, greedy), generate_tokens(other, prompt, steps, greedy))
    for n, (a, b) in enumerate(pairs):
        if int(a) != int(b):
            return n
    return steps


def agreement_prompts(stream: torch.Tensor, block_size: int, prompt_len: int = 8) -> tuple[torch.Tensor, int]:
    """Rows of prompts cut from a token stream, and steps per row: AGREEMENT_STEPS in all,
    each row within the context."""
    per_row = min(AGREEMENT_STEPS, block_size - prompt_len)
    rows = -(-AGREEMENT_STEPS // per_row)
    gap = (len(stream) - prompt_len) // rows
    prompts = torch.stack([stream[i * gap: i * gap + prompt_len] for i in range(rows)])
    return prompts, AGREEMENT_STEPS // rows


QUALITY = (("bf16", "none"), ("fp32", "int8"), ("bf16", "int8"))  # each against fp32 weights and activations


def quality_of_checkpoint(checkpoint: Path) -> dict:
    import numpy as np

    from gptcli.config import load_config
    from gptcli.data.training.dataset import TokenDataset, prepare_dataset
    from gptcli.evals.lm import eval_lm_checkpoint
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.infer.sample import load_for_generation
    from gptcli.runtime import DTYPES
    from gptcli.store.checkpoint import CONFIG_YAML
    from gptcli.store.rundir import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    cpu = torch.device("cpu")
    losses = {}
    for precision, quantize in (("fp32", "none"), *QUALITY):  # the model as sampling prepares it
        prepare = functools.partial(for_generation, dtype=DTYPES[precision], quantize=quantize)
        losses[precision, quantize] = eval_lm_checkpoint(path, None, precision="fp32", device="cpu",
                                                         prepare=prepare)[1]["loss"]
    cfg = load_config(path / CONFIG_YAML)
    val = np.asarray(TokenDataset.open(prepare_dataset(cfg.data, cfg.seed)).splits["val"])
    stream = torch.from_numpy(val[: 1 << 16].astype(np.int64))
    reference = load_for_generation(path, cpu, "fp32")[0]
    agree = {v: agreements(reference, load_for_generation(path, cpu, *v)[0], stream) for v in QUALITY}
    return {"name": str(checkpoint), "losses": losses, "agree": agree}


def quality_of_random_gpt2(shape: str) -> dict:
    from gptcli.evals.lm import validation_loss
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.runtime import Precision

    base = random_gpt2(shape)
    window = min(SHAPES[shape][3], 256)
    reference = prepared(base, "fp32", "none")
    torch.manual_seed(1)
    sampled = torch.cat(list(generate_tokens(reference, [0], 8 * window + 1, SamplingSettings(temperature=1.0))))
    batches = [{"idx": sampled[:-1].view(8, window), "targets": sampled[1:].view(8, window)}]
    losses = {}
    for variant in (("fp32", "none"), *QUALITY):
        losses[variant] = validation_loss(prepared(base, *variant), batches, Precision("fp32", "cpu"))["val_loss"]
    agree = {v: agreements(reference, prepared(base, *v), sampled) for v in QUALITY}
    return {"name": f"random GPT-2 {shape} (imported)", "losses": losses, "agree": agree}


def agreements(reference, other, stream: torch.Tensor) -> tuple[float, int]:
    prompts, steps = agreement_prompts(stream, reference.config.block_size)
    forced = forced_agreement(reference, other, prompts, steps)
    free = free_agreement(reference, other, prompts[0].tolist(), AGREEMENT_STEPS)
    return forced, free


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["mid", "124M"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", nargs="*", default=["runs/demo"],
                        help="Trained checkpoints whose validation loss to compare (none: skip).")
    parser.add_argument("--quality-shape", default="124M", choices=sorted(SHAPES))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [f"### Weight-only int8 generation on CPU ({time.strftime('%Y-%m-%d')})", "",
             f"{describe_machine()}; {torch.get_num_threads()} torch thread(s)", ""]
    if not args.skip_speed:
        speed = [row for shape in args.shapes for row in decode_speed(shape, args.tokens, args.rounds)]
        lines += [f"`python benchmarks/bench_quantize.py --shapes {' '.join(args.shapes)}`: greedy decoding of "
                  f"{args.tokens} tokens after an 8-token prompt, tokens/s after the first token, median of "
                  f"{args.rounds} interleaved rounds; weights x activations as `--precision P --quantize Q` "
                  f"prepares them.", "",
                  "| shape | batch | weights | activations | tokens/s | vs fp32 |", "|---|---|---|---|---|---|"]
        for shape, batch, precision, quantize, tps in speed:
            fp32 = next(r[4] for r in speed if r[:4] == (shape, batch, "fp32", "none"))
            weights = precision if quantize == "none" else quantize
            lines.append(f"| {shape} | {batch} | {weights} | {precision} | {tps:,.0f} | {tps / fp32:.2f}× |")
        lines.append("")
    if not args.skip_quality:
        lines += quality_lines(args)
    publish("\n".join(lines) + "\n", args.write)


def quality_lines(args) -> list[str]:
    results = [quality_of_checkpoint(Path(c)) for c in args.checkpoint]
    results.append(quality_of_random_gpt2(args.quality_shape))
    lines = ["Quality against fp32 weights and activations: validation loss (a checkpoint's own validation as "
             "`gptcli eval` repeats it; the random model on 8 windows of its own samples), and greedy "
             f"agreement over {AGREEMENT_STEPS} steps: the share of steps where the model's most likely token "
             "is fp32's when both are fed fp32's greedy tokens, and the tokens free-running greedy decoding "
             "agrees on before the first difference.", "",
             "| model | weights | activations | loss (fp32: loss) | change | top-1 agreement "
             "| same tokens before a difference |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        full = r["losses"]["fp32", "none"]
        for (precision, quantize), (forced, free) in r["agree"].items():
            loss = r["losses"][precision, quantize]
            weights = precision if quantize == "none" else quantize
            lines.append(f"| {r['name']} | {weights} | {precision} | {loss:.4f} ({full:.4f}) | "
                         f"{100 * (loss / full - 1):+.3f}% | {100 * forced:.1f}% | {free} of {AGREEMENT_STEPS} |")
    return lines


if __name__ == "__main__":
    main()
