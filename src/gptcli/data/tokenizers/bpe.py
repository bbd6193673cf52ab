"""Train a byte-level BPE tokenizer and save it in tiktoken's ``.tiktoken`` format.

Training follows the GPT-2 recipe:

1. Pre-tokenise the text with a regex (by default GPT-2's) into chunks such as
   ``" the"`` or ``"!!"``.  Merges never cross chunk boundaries, so the corpus
   reduces to a table of unique chunks and how often each one occurs.  Only that
   table is kept in memory, never the text itself.
2. Start with one token per byte (token id == byte value) and repeatedly merge the
   most frequent adjacent pair of tokens into a new token.

Tie-break rule: among pairs with the same frequency, the pair whose
``(left_token_bytes, right_token_bytes)`` is lexicographically smallest wins.
This is a total order on pairs, so the result depends only on the multiset of
chunks in the corpus and training is fully deterministic.

The result is tiktoken's "mergeable ranks" dict (token bytes -> rank), where the
rank is the merge order; tiktoken's encoder applies merges by lowest rank.
"""

from __future__ import annotations

import base64
import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import regex

from gptcli.atomic import write_bytes

__all__ = ["GPT2_PATTERN", "train_bpe", "write_tiktoken_file"]

# The pre-tokenisation regex of tiktoken's "gpt2" / "r50k_base" encodings.
# Possessive quantifiers (``++``) need the third-party ``regex`` module.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# Token ids 0..255 are the single bytes; the end-of-text special token needs one
# more id, so the smallest useful vocabulary is 256 bytes + 1 special = 257.
_NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = _NUM_BYTE_TOKENS + 1

# How many times training reports progress over a full run.
_PROGRESS_REPORTS = 100

Pair = tuple[int, int]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    pattern: str = GPT2_PATTERN,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[bytes, int]:
    """Learn byte-level BPE merges on ``texts`` and return tiktoken mergeable ranks.

    ``texts`` is consumed once, piece by piece; chunks never span two pieces.
    ``vocab_size`` includes one id reserved for the end-of-text special token, so
    the result has ``vocab_size - 1`` entries: the 256 single bytes (rank ==
    byte value) followed by one token per merge, ranked in merge order.  It has
    fewer entries only if the corpus runs out of pairs to merge.

    ``on_progress(merges_done, merges_total)`` is called every so often.

    Raises ``ValueError`` if ``vocab_size`` is below 257 or ``texts`` is empty.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + 1 end-of-text token), got {vocab_size}"
        )
    chunk_counts = _count_chunks(texts, pattern)
    if not chunk_counts:
        raise ValueError("cannot train a tokenizer: the training text is empty")
    trainer = _MergeTrainer(chunk_counts)
    trainer.run(num_tokens=vocab_size - 1, on_progress=on_progress)
    return trainer.ranks()


def write_tiktoken_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``ranks`` as a ``.tiktoken`` file: ``base64(token) rank`` per line, in rank order.

    The file is written to a temporary file in the same directory, fsynced and then
    renamed over ``path``, so readers never see a half-written file.
    """
    lines = (
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    write_bytes(Path(path), "".join(lines).encode("ascii"))


def _count_chunks(texts: Iterable[str], pattern: str) -> Counter[bytes]:
    """Pre-tokenise every text piece and count how often each distinct chunk occurs."""
    compiled = regex.compile(pattern)
    # Counting str chunks and encoding only the distinct ones is much cheaper than
    # encoding every occurrence; distinct strings map to distinct UTF-8 bytes.
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items() if chunk})


class _MergeTrainer:
    """Runs the merge loop with incremental pair counts.

    Data structures:

    * ``words[i]`` is the current token-id sequence of distinct chunk ``i`` and
      ``freqs[i]`` how often that chunk occurs in the corpus.
    * ``pair_counts[pair]`` is the corpus-wide count of adjacent ``pair``
      occurrences (each word contributes its frequency per occurrence).
    * ``pair_words[pair]`` is a superset of the words containing ``pair``, so a
      merge only revisits the words it can change instead of the whole corpus.
      Entries are added when a pair appears and never removed: a word that no
      longer holds the pair is simply left unchanged by the merge.
    * ``heap`` holds ``(-count, left_bytes, right_bytes, pair)`` entries, which
      pops the most frequent pair with the documented tie-break.  Whenever a
      pair's count changes a fresh entry is pushed; entries whose count no longer
      matches ``pair_counts`` are stale and skipped when popped (lazy deletion).
    * ``token_bytes[id]`` is the byte string of token ``id``; ``token_ids`` maps
      it back, to notice when a merge rebuilds an already known token
      (e.g. ``(a, bc)`` after ``(ab, c)``): it then reuses that id.
    """

    def __init__(self, chunk_counts: Counter[bytes]) -> None:
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(_NUM_BYTE_TOKENS)]
        self.token_ids: dict[bytes, int] = {t: i for i, t in enumerate(self.token_bytes)}
        self.words: list[list[int]] = [list(chunk) for chunk in chunk_counts]
        self.freqs: list[int] = list(chunk_counts.values())
        self.pair_counts: defaultdict[Pair, int] = defaultdict(int)
        self.pair_words: defaultdict[Pair, set[int]] = defaultdict(set)
        for index, (word, freq) in enumerate(zip(self.words, self.freqs)):
            for pair in zip(word, word[1:]):
                self.pair_counts[pair] += freq
                self.pair_words[pair].add(index)
        self.heap: list[tuple[int, bytes, bytes, Pair]] = []
        for pair, count in self.pair_counts.items():
            self.heap.append(self._heap_entry(pair, count))
        heapq.heapify(self.heap)

    def run(self, num_tokens: int, on_progress: Callable[[int, int], None] | None) -> None:
        """Merge until the vocabulary holds ``num_tokens`` tokens or no pair is left."""
        merges_total = max(num_tokens - _NUM_BYTE_TOKENS, 0)
        report_every = max(merges_total // _PROGRESS_REPORTS, 1)
        merges_done = 0
        while len(self.token_bytes) < num_tokens:
            pair = self._pop_most_frequent_pair()
            if pair is None:
                break
            vocab_before = len(self.token_bytes)
            self._merge(pair)
            if len(self.token_bytes) == vocab_before:
                continue  # rebuilt a known token: not a new merge
            merges_done += 1
            if on_progress is not None and merges_done % report_every == 0:
                on_progress(merges_done, merges_total)
        if on_progress is not None and merges_done % report_every != 0:
            on_progress(merges_done, merges_total)

    def ranks(self) -> dict[bytes, int]:
        """The learned vocabulary as tiktoken mergeable ranks (rank == token id)."""
        return {token: rank for rank, token in enumerate(self.token_bytes)}

    def _heap_entry(self, pair: Pair, count: int) -> tuple[int, bytes, bytes, Pair]:
        left, right = pair
        return (-count, self.token_bytes[left], self.token_bytes[right], pair)

    def _pop_most_frequent_pair(self) -> Pair | None:
        """Pop the best pair from the heap, skipping stale entries; None when exhausted."""
        while self.heap:
            neg_count, _, _, pair = heapq.heappop(self.heap)
            if self.pair_counts.get(pair, 0) == -neg_count:
                return pair
        return None

    def _merge(self, pair: Pair) -> None:
        """Replace every occurrence of ``pair`` with its merged token and update the counts."""
        new_id = self._token_id_for(self.token_bytes[pair[0]] + self.token_bytes[pair[1]])
        # Net count change per pair over all affected words, applied at the end so
        # each changed pair gets exactly one new heap entry.
        deltas: defaultdict[Pair, int] = defaultdict(int)
        for index in self.pair_words.pop(pair):
            old_word = self.words[index]
            new_word = _replace_pair(old_word, pair, new_id)
            if len(new_word) == len(old_word):
                continue  # stale index entry: the pair is no longer in this word
            self.words[index] = new_word
            freq = self.freqs[index]
            for old_pair in zip(old_word, old_word[1:]):
                deltas[old_pair] -= freq
            for new_pair in zip(new_word, new_word[1:]):
                deltas[new_pair] += freq
                if new_id in new_pair:
                    self.pair_words[new_pair].add(index)
        self._apply_deltas(deltas)

    def _token_id_for(self, token: bytes) -> int:
        """Id of ``token``, adding it to the vocabulary if it is new."""
        token_id = self.token_ids.get(token)
        if token_id is None:
            token_id = len(self.token_bytes)
            self.token_bytes.append(token)
            self.token_ids[token] = token_id
        return token_id

    def _apply_deltas(self, deltas: dict[Pair, int]) -> None:
        for pair, delta in deltas.items():
            if delta == 0:
                continue
            count = self.pair_counts[pair] + delta
            if count:
                self.pair_counts[pair] = count
                heapq.heappush(self.heap, self._heap_entry(pair, count))
            else:
                del self.pair_counts[pair]


def _replace_pair(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Return ``word`` with non-overlapping occurrences of ``pair`` replaced, left to right."""
    left, right = pair
    merged: list[int] = []
    i = 0
    last = len(word) - 1
    while i <= last:
        if i < last and word[i] == left and word[i + 1] == right:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
