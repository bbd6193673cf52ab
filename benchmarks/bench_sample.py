"""Sampling throughput: gptcli's KV-cached generation versus transformers' `generate`, and
(with --llama-cpp) versus llama.cpp on the same weights exported with `gptcli export-gguf`.

    python benchmarks/bench_sample.py [--shapes mid 124M] [--precisions fp32 bf16] [--int8] [--tokens 256] [--write]
    python benchmarks/bench_sample.py --llama-cpp [--tokens 128] [--write]

The same weights (a random GPT-2-shaped model made in transformers and imported), the same
prompt, 256 new tokens, batch 1 and batch 8, greedy and top-k 50; time to first token and
tokens/s after it. transformers is asked for exactly 256 tokens (min_new_tokens), so an
end-of-text token cannot end its run early. Both sides hold their weights in the same
dtype (fp32, or bf16 for both); gptcli's model is prepared as `gptcli sample` prepares it
(`inference.for_generation`). Interleaved repeats.

--llama-cpp: GPT-2 124M's shape with GPT-2's tokenizer (../shared/data/gpt2.tiktoken; GGUF
needs a BPE vocabulary), greedy, batch 1 and 8: gptcli with fp32, bf16 and int8 weights
(int8 with fp32 and with bf16 activations, `--quantize int8`) against llama.cpp (through
llama-cpp-python's C API, 2 threads) on the f16 and q8_0 exports of the same model. llama.cpp
decodes the batch as 8 sequences in one llama_batch per step (its own batched decode, as its
server does), greedy by argmax over each row's logits. Time to first token and tokens/s
after it, median of interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import describe_machine, publish

SHAPES = {"mid": (6, 6, 384, 256, 65), "124M": (12, 12, 768, 1024, 50257)}
RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
LLAMA_THREADS = 2


class LlamaCppGreedy:
    """llama.cpp's greedy decode of B copies of a prompt, as B sequences of one context."""

    def __init__(self, path: Path, batch: int, slots: int):
        import llama_cpp as llama

        self.llama, self.batch = llama, batch
        llama.llama_backend_init()
        self.model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_seq_max = batch * slots, batch
        params.n_batch = params.n_ubatch = batch * slots
        params.n_threads = params.n_threads_batch = LLAMA_THREADS
        self.ctx = llama.llama_init_from_model(self.model, params)
        self.vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.tokens = llama.llama_batch_init(batch * slots, 0, batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.tokens
        b.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, position, 1, logits
            b.seq_id[i][0] = sequence
        if self.llama.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, entries: list[int]) -> list[int]:
        """The most likely next token after each of these entries (indices into the batch)."""
        return [int(np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())
                for i in entries]

    def generate(self, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        """(time to first token, total seconds, sequence 0's tokens)."""
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        self._decode([(t, p, s, p == len(prompt) - 1) for s in range(self.batch) for p, t in enumerate(prompt)])
        tokens = self._argmax([s * len(prompt) + len(prompt) - 1 for s in range(self.batch)])
        first, out = time.perf_counter() - start, [tokens[0]]
        for position in range(len(prompt), len(prompt) + new - 1):
            self._decode([(t, position, s, True) for s, t in enumerate(tokens)])
            tokens = self._argmax(range(self.batch))
            out.append(tokens[0])
        return first, time.perf_counter() - start, out


def llama_cpp_table(tokens: int, rounds: int) -> list[str]:
    """gptcli (fp32, bf16, int8) against llama.cpp (f16, q8_0), GPT-2 124M's shape."""
    import transformers

    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.store.checkpoint import save_checkpoint
    from gptcli.store.gguf_export import export_gguf
    from gptcli.store.hf import import_hf_model

    n_layer, n_head, n_embd, ctx, vocab = SHAPES["124M"]
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=ctx,
                                     vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    prompt = torch.randint(1, vocab, (8,)).tolist()
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp / "hf")
        model = import_hf_model(tmp / "hf")
        checkpoint = save_checkpoint(tmp / "ckpt", model, tiktoken_from_file(RANKS), "# bench\n")
        for kind in ("f16", "q8_0"):
            export_gguf(checkpoint, tmp / f"{kind}.gguf", kind)
        for batch in (1, 8):
            runners = {}
            for label, precision, quantize in (("gptcli fp32", torch.float32, "none"),
                                               ("gptcli bf16", torch.bfloat16, "none"),
                                               ("gptcli int8 (fp32 activations)", torch.float32, "int8"),
                                               ("gptcli int8 (bf16 activations)", torch.bfloat16, "int8")):
                ours = for_generation(copy.deepcopy(model), precision, quantize)

                def run_ours(ours=ours):
                    start, first, out = time.perf_counter(), None, []
                    for token in generate_tokens(ours, prompt, tokens, SamplingSettings(temperature=0), batch):
                        first = first or time.perf_counter() - start
                        out.append(token[0].item())
                    return first, time.perf_counter() - start, out

                runners[label] = run_ours
            for kind in ("f16", "q8_0"):
                runners[f"llama.cpp {kind}"] = functools.partial(
                    LlamaCppGreedy(tmp / f"{kind}.gguf", batch, len(prompt) + tokens).generate, prompt, tokens)
            for run in runners.values():
                run()  # warm-up
            results = {label: [] for label in runners}
            for _ in range(rounds):
                for label, run in runners.items():
                    results[label].append(run())
            reference = results["gptcli fp32"][0][2]
            for label, values in results.items():
                first = statistics.median(v[0] for v in values)
                rate = batch * (tokens - 1) / statistics.median(v[1] - v[0] for v in values)
                same = next((i for i, (a, b) in enumerate(zip(reference, values[0][2])) if a != b), tokens)
                rows.append((batch, label, first * 1000, rate, same))
                rates[batch, label] = rate
    lines = [f"#### gptcli against llama.cpp, GPT-2 124M shape ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/bench_sample.py --llama-cpp --tokens {tokens}`: random GPT-2 124M weights "
             f"(transformers' initialisation, imported), greedy, an 8-token prompt, {tokens} new tokens; "
             f"llama.cpp through llama-cpp-python on `gptcli export-gguf` files of the same model, "
             f"{LLAMA_THREADS} threads; tokens/s after the first token, median of {rounds} interleaved rounds. "
             f"\"Same tokens\": sequence 0's greedy tokens equal to gptcli fp32's before the first difference.",
             "", "| batch | implementation | time to first token | tokens/s | same tokens |", "|---|---|---|---|---|"]
    for batch, label, first, rate, same in rows:
        lines.append(f"| {batch} | {label} | {first:.1f} ms | {rate:,.1f} | {same} of {tokens} |")
    lines.append("")
    for batch in (1, 8):
        best = max(rate for (b, label), rate in rates.items() if b == batch and "int8" in label)
        lines.append(f"- **batch {batch}: gptcli int8 (the faster activation precision) / llama.cpp q8_0 = "
                     f"{best / rates[batch, 'llama.cpp q8_0']:.2f}×** (target: ≥ 0.8× at batch 1, > 1× at batch 8)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["mid"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["greedy", "top-k 50"], choices=["greedy", "top-k 50"])
    parser.add_argument("--int8", action="store_true",
                        help="also gptcli with int8 weights (`--quantize int8`, activations in each precision)")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="gptcli (fp32, bf16, int8) against llama.cpp (f16, q8_0), GPT-2 124M shape")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.llama_cpp:
        publish("\n".join([describe_machine(), "", *llama_cpp_table(args.tokens, args.rounds)]) + "\n", args.write)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.runtime import DTYPES
    from gptcli.store.hf import import_hf_model

    rows = []
    for name in args.shapes:
        n_layer, n_head, n_embd, ctx, vocab = SHAPES[name]
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=ctx,
                                         vocab_size=vocab, bos_token_id=0, eos_token_id=0)
        hf_fp32 = transformers.GPT2LMHeadModel(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf_fp32.save_pretrained(tmp)
            ours_fp32 = import_hf_model(tmp)
        prompt = torch.randint(1, vocab, (8,)).tolist()
        new = min(args.tokens, ctx - len(prompt))
        for precision, batch in ((p, b) for p in args.precisions for b in args.batches):
            dtype = DTYPES[precision]
            hf = copy.deepcopy(hf_fp32).to(dtype)
            variants = {"gptcli": for_generation(copy.deepcopy(ours_fp32), dtype)}
            if args.int8:
                variants["gptcli int8"] = for_generation(copy.deepcopy(ours_fp32), dtype, "int8")
            for mode, settings, hf_kwargs in (
                ("greedy", SamplingSettings(temperature=0), {"do_sample": False}),
                ("top-k 50", SamplingSettings(temperature=1.0, top_k=50), {"do_sample": True, "top_k": 50}),
            ):
                if mode not in args.modes:
                    continue
                def run_ours(ours):
                    start = time.perf_counter()
                    first = None
                    for token in generate_tokens(ours, prompt, new, settings, batch,
                                                 torch.Generator().manual_seed(0)):
                        if first is None:
                            first = time.perf_counter() - start
                    return first, time.perf_counter() - start

                def run_hf():
                    ids = torch.tensor([prompt] * batch)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, pad_token_id=0, **hf_kwargs)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                          **hf_kwargs)
                    assert out.shape[1] == len(prompt) + new
                    return first, time.perf_counter() - start

                runners = {who: functools.partial(run_ours, model) for who, model in variants.items()}
                runners["transformers"] = run_hf
                for run in runners.values():
                    run()  # warm-up
                results = {who: [] for who in runners}
                for _ in range(args.rounds):
                    for who, run in runners.items():
                        results[who].append(run())
                summary = {}
                for who, values in results.items():
                    ttft = statistics.median(v[0] for v in values)
                    total = statistics.median(v[1] for v in values)
                    summary[who] = (ttft, batch * new / total)
                    rows.append((name, precision, batch, mode, who, ttft * 1000, batch * new / total))
                for who in variants:
                    rows.append((name, precision, batch, mode, f"ratio {who}", None,
                                 summary[who][1] / summary["transformers"][1]))
    lines = [f"### Sampling on CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_sample.py --shapes {' '.join(args.shapes)} --precisions "
             f"{' '.join(args.precisions)}{' --int8' if args.int8 else ''} --batches {' '.join(map(str, args.batches))} "
             f"--modes {' '.join(repr(m) if ' ' in m else m for m in args.modes)} --rounds {args.rounds} --tokens "
             f"{args.tokens}`: {args.tokens} "
             f"new tokens after an 8-token prompt, weights in the precision shown on both sides (gptcli int8: "
             f"int8 weights, activations in that precision), median of {args.rounds} interleaved rounds.", "",
             "| shape | weights | batch | sampling | implementation | time to first token | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, precision, batch, mode, who, ttft, tps in rows:
        if who.startswith("ratio "):
            lines.append(f"| {name} | {precision} | {batch} | {mode} | **{who[6:]} / transformers** | | **{tps:.2f}×** |")
        else:
            lines.append(f"| {name} | {precision} | {batch} | {mode} | {who} | {ttft:.1f} ms | {tps:,.0f} |")
    rate = {row[:5]: row[6] for row in rows}
    if args.int8 and {"fp32", "bf16"} <= set(args.precisions):
        lines.append("")
        for name in args.shapes:
            for batch in args.batches if "greedy" in args.modes else ():
                int8 = max(rate[name, p, batch, "greedy", "gptcli int8"] for p in ("fp32", "bf16"))
                lines.append(f"- **{name}, batch {batch}, greedy: gptcli int8 (faster activations) / transformers "
                             f"fp32 = {int8 / rate[name, 'fp32', batch, 'greedy', 'transformers']:.2f}×, / "
                             f"transformers bf16 = {int8 / rate[name, 'bf16', batch, 'greedy', 'transformers']:.2f}×**"
                             + (" (issue 18's targets: ≥ 3× and ≥ 2×)" if batch == 1 else ""))
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
