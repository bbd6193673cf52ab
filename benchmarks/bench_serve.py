"""Serving throughput: `gptcli serve` (continuous batching) under concurrent streaming clients,
against the same requests answered one at a time, and against transformers' `generate`.

    python benchmarks/bench_serve.py [--clients 1 4 16 64] [--tokens 128] [--max-batch 64] [--write]

The model is the "mid" shape of bench_sample.py (6 layers, 6 heads, 384 wide, context 256,
vocabulary 65): a random GPT-2 made in transformers, imported, and saved as a gptcli
checkpoint with a 64-character tokenizer (end-of-text is id 64). A random model samples
end-of-text about once in 65 tokens, which would end requests early; so the final norm's
bias is pushed along one direction and end-of-text's (tied) embedding row points the other
way, which puts its logit near -10 and leaves the other logits' spread as it was. Both sides
get those same weights; every request is still checked to have produced exactly --tokens.

`gptcli serve -c CKPT --port 0 --device cpu --max-batch B` runs in a subprocess. For each
client count C, C threads (standard library http.client, one keep-alive connection each)
start together and send streaming POST /v1/completions back to back, max(C, --requests)
requests in all, split evenly: so C=1 is the sequential baseline (16 requests one after
another) and C=16 is the same 16 requests all at once. Each request: a prompt of 16-32
random characters, max_tokens=--tokens, temperature 1, its own seed. Measured per level:
generated tokens / wall time (first send to last `[DONE]`), time to first token (request
sent to the first SSE chunk with text) p50 and p95 over all rounds, and requests that did
not finish with `finish_reason: "length"` and --tokens characters and completion tokens.

The peer is what a naive server does: transformers' `generate` (fp32, sampling, the same
weights, prompts and new-token count, min_new_tokens so nothing ends early) for the 16
requests one after another; its time to first token is a `max_new_tokens=1` call per prompt.
It runs while no server is up. Medians of --rounds rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from report import describe_machine, publish

SHAPES = {"mid": (6, 6, 384, 256, 65)}
CHARS = string.ascii_letters + string.digits + " ."  # 64 characters; end-of-text is id 64
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300  # a request silent this long counts as failed (a stall)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64],
                        help="concurrent client counts (1, the sequential baseline, is always run)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=16,
                        help="requests per level (at least one per client): the sequential baseline's count")
    parser.add_argument("--max-batch", nargs="+", type=int, default=[64],
                        help="the server's --max-batch; several values start one server each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    clients = sorted(set(args.clients) | {1})
    n_layer, n_head, n_embd, ctx, vocab = SHAPES["mid"]
    if not 1 <= args.tokens <= ctx - 32:
        parser.error(f"--tokens must be 1..{ctx - 32} (prompts are up to 32 tokens, the context is {ctx})")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        hf, checkpoint, tokenizer = make_model(Path(tmp))
        rng = random.Random(0)
        prompts = ["".join(rng.choice(CHARS) for _ in range(rng.randint(16, 32)))
                   for _ in range(max(args.requests, *clients))]
        peer = run_peer(hf, [tokenizer.encode(p) for p in prompts[:args.requests]], args.tokens, args.rounds)
        del hf
        results = {b: run_server_levels(checkpoint, Path(tmp), b, clients, prompts, args) for b in args.max_batch}

    lines = [f"### Serving: continuous batching (issue 16) ({time.strftime('%Y-%m-%d')})", "",
             describe_machine(), "",
             f"`python benchmarks/bench_serve.py --clients {' '.join(map(str, args.clients))} --tokens {args.tokens} "
             f"--requests {args.requests} --max-batch {' '.join(map(str, args.max_batch))} --rounds {args.rounds}`: "
             f"the mid shape ({n_layer} layers, {n_head} heads, {n_embd} wide, context {ctx}, vocabulary {vocab}, "
             f"random weights, fp32) on CPU; each request a 16-32 token prompt, {args.tokens} new tokens, "
             f"temperature 1. C clients stream max(C, {args.requests}) requests back to back, split evenly, so "
             f"1 client is the sequential baseline and {args.requests} clients send the same requests at once. "
             f"Tokens/s: generated tokens over wall time, median of {args.rounds} rounds; time to first token: "
             f"request sent to first text chunk, over all rounds. transformers: `generate` per request, one "
             f"after another, as a naive server would (its time to first token: a `max_new_tokens=1` call).", "",
             "| server | clients | requests | tokens/s | time to first token p50 | p95 | completed |",
             "|---|---|---|---|---|---|---|"]
    ttft_p50, ttft_p95 = percentile(peer.ttfts, 50), percentile(peer.ttfts, 95)
    lines.append(f"| transformers generate | 1 | {args.requests} | {peer.tokens_per_s:,.0f} | "
                 f"{ttft_p50 * 1000:.0f} ms | {ttft_p95 * 1000:.0f} ms | {args.requests}/{args.requests} |")
    failures = 0
    for batch, levels in results.items():
        for level in levels:
            failures += level.failed
            lines.append(f"| gptcli --max-batch {batch} | {level.clients} | {level.requests} | "
                         f"{level.tokens_per_s:,.0f} | {level.ttft(50) * 1000:.0f} ms | "
                         f"{level.ttft(95) * 1000:.0f} ms | {level.completed}/{level.total} |")
    for batch, levels in results.items():
        by_clients = {level.clients: level for level in levels}
        sequential = by_clients[1]
        concurrent = by_clients.get(args.requests)
        if concurrent is None:
            continue
        lines.append(f"| **{args.requests} concurrent / {args.requests} sequential** (--max-batch {batch}) | | | "
                     f"**{concurrent.tokens_per_s / sequential.tokens_per_s:.2f}×** | | | |")
        lines.append(f"| **gptcli {args.requests} concurrent / transformers one at a time** (--max-batch {batch}) "
                     f"| | | **{concurrent.tokens_per_s / peer.tokens_per_s:.2f}×** | | | |")
    if failures:
        lines += ["", f"**{failures} request(s) failed or ended early**; first problems:", ""]
        problems = [p for levels in results.values() for level in levels for p in level.problems]
        lines += [f"- {p}" for p in problems[:10]]
    publish("\n".join(lines) + "\n", args.write)
    if failures:
        sys.exit(1)


def make_model(tmp: Path):
    """The mid-shape random GPT-2 in transformers, and the same weights as a gptcli checkpoint."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from gptcli.data.tokenizers.tokenizer import CharTokenizer
    from gptcli.store.checkpoint import save_checkpoint
    from gptcli.store.hf import import_hf_model

    n_layer, n_head, n_embd, ctx, vocab = SHAPES["mid"]
    tokenizer = CharTokenizer(CHARS)
    assert tokenizer.vocab_size == vocab and tokenizer.eot_id == vocab - 1
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=ctx,
                                     vocab_size=vocab, bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # end-of-text's logit ~ -10: see the module docstring
        direction = torch.nn.functional.normalize(torch.randn(n_embd), dim=0)
        hf.transformer.ln_f.bias.copy_(10 * direction)
        hf.transformer.wte.weight[tokenizer.eot_id].copy_(-direction)
    hf.save_pretrained(tmp / "hf")
    model = import_hf_model(tmp / "hf")
    checkpoint = save_checkpoint(tmp / "mid", model, tokenizer, "# bench_serve: random mid-shape GPT-2\n")
    return hf, checkpoint, tokenizer


@dataclass
class Peer:
    tokens_per_s: float
    ttfts: list[float]


def run_peer(hf, prompts: list[list[int]], new: int, rounds: int) -> Peer:
    """transformers' generate, one request after another."""
    eot = hf.config.eos_token_id

    def generate(prompt: list[int], tokens: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.inference_mode():
            return hf.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=True, top_k=0, temperature=1.0, pad_token_id=eot)

    generate(prompts[0], new, 0)  # warm-up
    ttfts, speeds = [], []
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            generate(prompt, 1, i)
            ttfts.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            out = generate(prompt, new, i)
            assert out.shape[1] == len(prompt) + new and not (out[0, len(prompt):] == eot).any()
        speeds.append(len(prompts) * new / (time.perf_counter() - start))
    return Peer(statistics.median(speeds), ttfts)


@dataclass
class Level:
    clients: int
    requests: int
    speeds: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    completed: int = 0
    total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.total - self.completed

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.speeds)

    def ttft(self, q: float) -> float:
        return percentile(self.ttfts, q) if self.ttfts else float("nan")


def run_server_levels(checkpoint: Path, tmp: Path, max_batch: int, clients: list[int], prompts: list[str],
                      args) -> list[Level]:
    log_path = tmp / f"serve-{max_batch}.log"
    process, url = start_server(checkpoint, max_batch, log_path)
    try:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        warm = stream_completion(host, port, prompts[0], args.tokens, seed=0)  # first request: lazy start-up
        if warm.problem:
            raise SystemExit(f"the warm-up request failed: {warm.problem}\n{tail(log_path)}")
        levels = [Level(c, max(c, args.requests)) for c in clients]
        for _ in range(args.rounds):  # rounds interleave the levels, so drift hits all alike
            for level in levels:
                run_level(level, host, port, prompts, args.tokens)
                if process.poll() is not None:
                    raise SystemExit(f"gptcli serve exited (code {process.returncode}):\n{tail(log_path)}")
        print(f"--max-batch {max_batch}: " + ", ".join(f"{lv.clients} clients {lv.tokens_per_s:,.0f} tok/s "
                                                        f"({lv.completed}/{lv.total})" for lv in levels),
              file=sys.stderr)
        if any(level.failed for level in levels):
            print(f"server log (--max-batch {max_batch}):\n{tail(log_path)}", file=sys.stderr)
        return levels
    finally:
        stop_server(process)


def run_level(level: Level, host: str, port: int, prompts: list[str], tokens: int) -> None:
    """`level.clients` threads, started together, each sending its share of the requests
    back to back on one connection."""
    shares = [list(range(c, level.requests, level.clients)) for c in range(level.clients)]
    results: list[Result] = []
    lock = threading.Lock()
    barrier = threading.Barrier(level.clients + 1, timeout=60)

    def client(indices: list[int]) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        barrier.wait()
        try:
            for i in indices:
                result = stream_completion(host, port, prompts[i], tokens, seed=i, connection=connection)
                with lock:
                    results.append(result)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(share,), daemon=True) for share in shares]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    level.speeds.append(sum(r.tokens for r in results) / wall)
    level.total += level.requests
    for r in results:
        if r.ttft is not None:
            level.ttfts.append(r.ttft)
        if r.problem:
            level.problems.append(f"{level.clients} clients: {r.problem}")
        else:
            level.completed += 1
    if len(results) < level.requests:
        level.problems.append(f"{level.clients} clients: {level.requests - len(results)} request(s) never returned")


@dataclass
class Result:
    tokens: int = 0  # characters received: one per token with this tokenizer
    ttft: float | None = None
    problem: str | None = None


def stream_completion(host: str, port: int, prompt: str, tokens: int, seed: int,
                      connection: http.client.HTTPConnection | None = None) -> Result:
    """One streamed completion; a problem is anything but `tokens` characters, finish_reason
    "length" and usage completion_tokens == `tokens`, ending in [DONE]."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    result, text, finish, usage, done = Result(), [], None, None, False
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.problem = f"HTTP {response.status}: {response.read()[:300]!r}"
            return result
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                result.problem = f"error event: {event['error']}"
                break
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
        response.read()  # the end of the chunked body, so the connection can be reused
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.problem = f"{type(exc).__name__}: {exc}"
        connection.close()
    finally:
        if own:
            connection.close()
    result.tokens = len("".join(text))
    if result.problem is None:
        completion = usage and usage.get("completion_tokens")
        if not done or finish != "length" or result.tokens != tokens or completion != tokens:
            result.problem = (f"ended early or malformed: [DONE] {'seen' if done else 'missing'}, finish_reason "
                              f"{finish!r}, {result.tokens} characters, usage completion_tokens {completion}")
    return result


def start_server(checkpoint: Path, max_batch: int, log_path: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`gptcli serve` (with `options`) on a free loopback port, once it listens; its stderr
    goes to a file."""
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "-c", str(checkpoint), "--port", "0",
                                    "--device", "cpu", "--max-batch", str(max_batch), *options],
                                   stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"serving at (http://\S+) ", log_path.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        time.sleep(0.1)
    stop_server(process)
    raise SystemExit(f"gptcli serve did not start:\n{tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


if __name__ == "__main__":
    main()
