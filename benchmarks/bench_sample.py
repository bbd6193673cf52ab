"""Sampling throughput: gptcli's KV-cached generation versus transformers' `generate`.

    python benchmarks/bench_sample.py [--shapes mid] [--precisions fp32 bf16] [--tokens 256] [--write]

The same weights (a random GPT-2-shaped model made in transformers and imported), the same
prompt, 256 new tokens, batch 1 and batch 8, greedy and top-k 50; time to first token and
tokens/s after it. transformers is asked for exactly 256 tokens (min_new_tokens), so an
end-of-text token cannot end its run early. Both sides hold their weights in the same
dtype (fp32, or bf16 for both); gptcli's model is prepared as `gptcli sample` prepares it
(`inference.for_generation`). Interleaved repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from report import describe_machine, publish

SHAPES = {"mid": (6, 6, 384, 256, 65), "124M": (12, 12, 768, 1024, 50257)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["mid"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
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
        for precision, batch in ((p, b) for p in args.precisions for b in (1, 8)):
            dtype = DTYPES[precision]
            hf = copy.deepcopy(hf_fp32).to(dtype)
            ours = for_generation(copy.deepcopy(ours_fp32), dtype)
            for mode, settings, hf_kwargs in (
                ("greedy", SamplingSettings(temperature=0), {"do_sample": False}),
                ("top-k 50", SamplingSettings(temperature=1.0, top_k=50), {"do_sample": True, "top_k": 50}),
            ):
                def run_ours():
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

                run_ours(), run_hf()  # warm-up
                results = {"gptcli": [], "transformers": []}
                for _ in range(args.rounds):
                    results["gptcli"].append(run_ours())
                    results["transformers"].append(run_hf())
                summary = {}
                for who, values in results.items():
                    ttft = statistics.median(v[0] for v in values)
                    total = statistics.median(v[1] for v in values)
                    summary[who] = (ttft, batch * new / total)
                    rows.append((name, precision, batch, mode, who, ttft * 1000, batch * new / total))
                rows.append((name, precision, batch, mode, "ratio", None,
                             summary["gptcli"][1] / summary["transformers"][1]))
    lines = [f"### Sampling on CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_sample.py --shapes {' '.join(args.shapes)} --precisions "
             f"{' '.join(args.precisions)}`: {args.tokens} new tokens after an 8-token prompt, weights in the "
             f"precision shown on both sides, median of {args.rounds} interleaved rounds.", "",
             "| shape | weights | batch | sampling | implementation | time to first token | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, precision, batch, mode, who, ttft, tps in rows:
        if who == "ratio":
            lines.append(f"| {name} | {precision} | {batch} | {mode} | **gptcli / transformers** | | **{tps:.2f}×** |")
        else:
            lines.append(f"| {name} | {precision} | {batch} | {mode} | {who} | {ttft:.1f} ms | {tps:,.0f} |")
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
