"""Speculative decoding in `gptcli serve`: the same greedy requests to a server without a
draft, with a draft model and with prompt lookup, one client at a time (batch 1, where the
engine speculates) and --clients at once (batch 8 by default, where it must not lose).

    python benchmarks/bench_serve_speculative.py --model runs/mid --draft runs/demo-draft
        [--clients 8] [--tokens 128] [--rounds 3] [--write]

Requests: non-streamed /v1/completions, greedy, max_tokens=--tokens, prompts that open
Python code (bench_speculative.py's, cycled to 2 x --clients requests). At C clients each
sends its share back to back on one keep-alive connection, so the batch stays full until
the last requests finish alone (where the engine speculates). Tokens/s: completion tokens
(usage) over the wall time from the first send to the last answer, median of --rounds
rounds, the levels and servers interleaved round by round (one server at a time is up; each
round starts them again, so drift hits every side alike). Every side's texts must equal the
plain server's (greedy; a difference is reported, and exits 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from bench_serve import start_server, stop_server, tail
from bench_speculative import CODE_PROMPTS
from report import describe_machine, publish

REQUEST_TIMEOUT_S = 300


def complete(url: str, prompt: str, tokens: int, connection: http.client.HTTPConnection) -> tuple[str, int]:
    """One greedy completion: its text and completion tokens."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        raise SystemExit(f"{url}: HTTP {response.status}: {answer}")
    return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]


def run_level(url: str, prompts: list[str], clients: int, tokens: int) -> tuple[float, list[str]]:
    """Tokens/s and the texts (in prompt order) of `prompts` sent by `clients` clients."""
    parts = urlsplit(url)
    shares = [list(range(c, len(prompts), clients)) for c in range(clients)]
    texts: list[str] = [""] * len(prompts)
    counts = [0] * len(prompts)

    def client(indices: list[int]) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT_S)
        try:
            for i in indices:
                texts[i], counts[i] = complete(url, prompts[i], tokens, connection)
        finally:
            connection.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    return sum(counts) / (time.perf_counter() - start), texts


def health(url: str) -> dict:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/mid")
    parser.add_argument("--draft", default="runs/demo-draft")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    args = parser.parse_args()
    prompts = [CODE_PROMPTS[i % len(CODE_PROMPTS)] + " " * (i // len(CODE_PROMPTS))  # distinct requests
               for i in range(2 * args.clients)]
    k = ("--draft-tokens", str(args.draft_tokens))
    sides = {"plain": (), f"--draft {args.draft}": ("--draft", args.draft, *k), "--draft ngram": ("--draft", "ngram", *k)}
    levels = {1: prompts[:args.clients], args.clients: prompts}
    speeds = {(side, c): [] for side in sides for c in levels}
    texts, stats = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-spec-") as tmp:
        for _ in range(args.rounds):
            for side, options in sides.items():
                log = Path(tmp) / "serve.log"
                process, url = start_server(Path(args.model), args.clients, log, *options)
                try:
                    run_level(url, prompts[:1], 1, 8)  # warm-up
                    for clients, sent in levels.items():
                        rate, got = run_level(url, sent, clients, args.tokens)
                        speeds[side, clients].append(rate)
                        print(f"{side}, {clients} clients: {rate:,.0f} tokens/s", file=sys.stderr)
                        texts.setdefault((side, clients), got)
                    stats[side] = health(url).get("speculation")
                except BaseException:
                    print(tail(log), file=sys.stderr)
                    raise
                finally:
                    stop_server(process)
    rate = {key: statistics.median(found) for key, found in speeds.items()}
    lines = [f"### Speculative decoding in the server ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_serve_speculative.py --model {args.model} --draft {args.draft} "
             f"--clients {args.clients} --tokens {args.tokens} --draft-tokens {args.draft_tokens} "
             f"--rounds {args.rounds}`: greedy /v1/completions, {args.tokens} tokens at most, code prompts; "
             f"--max-batch {args.clients}; 1 client sends {args.clients} requests one after another, "
             f"{args.clients} clients send {2 * args.clients} (2 each, back to back). Median of {args.rounds} "
             f"rounds.", "",
             "| server | clients | tokens/s | vs plain | same texts | acceptance (last round) | tokens per verification |",
             "|---|---|---|---|---|---|---|"]
    differ = 0
    for clients in levels:
        for side in sides:
            same = texts[side, clients] == texts["plain", clients]
            differ += not same
            spec = stats.get(side)
            guesses = f"{spec['acceptance_rate']:.2f} | {spec['tokens_per_verification']:.2f}" if spec else "– | –"
            lines.append(f"| {side} | {clients} | {rate[side, clients]:,.0f} | "
                         f"{rate[side, clients] / rate['plain', clients]:.2f}× | {'yes' if same else '**no**'} | "
                         f"{guesses} |")
    publish("\n".join(lines) + "\n", args.write)
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
