"""Reinforcement learning with verifiable rewards (`gptcli finetune --task grpo`): the model
samples answers to prompts, a checkable reward scores them, and the policy gradient moves
it toward the better ones of each group (train/policy.py: GRPO, DAPO).

A prompt is a record `{"prompt": text, "answer": ...}` or `{"messages": [...], "answer": ...}`:
on a chat model the text becomes one user turn (a conversation needs one), on a base model
it is continued as it is. A completion ends at the model's stop id (its end of turn, or
end-of-text), which it learns to produce, or at `max_new_tokens`.

Each micro-batch of an optimizer step: P prompts (train.batch_size), drawn by the step's
named random stream; G completions each (grpo.group_size), sampled by the batching engine
(infer/engine.py: KV cache, continuous batching) from the very weights being trained, each
prompt's draws from its own seed derived from (seed, rollout, its place in the step's global
batch): a resumed run draws what the uninterrupted one drew, and any split of the batch over
micro-batches and processes the same; every completion scored by the weighted
rewards (Scorer) and given its group-normalised advantage. The batch is the P·G rows
prompt + completion, right-padded, with the completion's tokens as targets, their advantage
and (grpo.reuse > 1) the log-probabilities the sampling policy gave them. With
grpo.dynamic_sampling (DAPO's), a group whose rewards are all equal is left out and more
prompts are drawn, up to MAX_DRAWS draws, to fill the batch with groups that teach. With reuse > 1 the
rollouts of step s train steps s .. s + reuse - 1 (a run resumed inside such a group draws
its rollouts afresh, from the resumed weights: that resume is not bit-identical).

Validation: every validation prompt answered greedily; `val_pass@1` is the share whose answer
earns full marks from the first reward (the verifier), and picks the best checkpoint.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gptcli.config import EvalTask, GRPOConfig, RewardConfig
from gptcli.data.text.records import Record, where
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.data.training.dataset import STREAMS, step_rows
from gptcli.errors import GptcliError
from gptcli.evals.run_tasks import EvalTasks
from gptcli.events import EventSink, Notice, ignore
from gptcli.infer.load import language_model
from gptcli.infer.session import GenerationSession, GenerationSettings, Prompt, Sample
from gptcli.model import Model
from gptcli.model.heads import Reference, TrunkHead, labelled_logprobs
from gptcli.rewards import BUILT_IN, is_function_name, load_function
from gptcli.runtime import Distributed, Precision, eval_mode
from gptcli.tasks.answers import answer_rows
from gptcli.train.policy import PolicySettings, group_advantages, token_losses

VERIFIER_PASS = 1.0  # the first reward's full marks: what pass@1 counts
MAX_DRAWS = 4  # dynamic sampling draws at most this many times a micro-batch's prompts
MAX_ROWS = 256  # the most sequences generated at once (each a KV cache row of the whole context)


class Question(NamedTuple):
    where: str  # `file:line` of its record
    text: str  # the prompt as written (a conversation's last message): what reward functions get
    prompt: Prompt  # its ids as the model reads them
    answer: str


class Group(NamedTuple):
    """A prompt with its group of sampled completions and their weighted rewards (G,)."""

    question: Question
    samples: list[Sample]
    totals: torch.Tensor


def policy_settings(cfg: GRPOConfig) -> PolicySettings:
    return PolicySettings(cfg.loss, cfg.clip_low, cfg.clip_high, cfg.beta, cfg.scale_rewards)


# --- records into questions ----------------------------------------------------------------------


def read_questions(records: list[Record], source: str, session: GenerationSession) -> list[Question]:
    """Every record of `source` as a prompt with its answer, or an error naming its line."""
    return [_question(record, where(source, record), session) for record in records]


def _question(record: Record, place: str, session: GenerationSession) -> Question:
    if ("prompt" in record) == ("messages" in record):
        raise GptcliError(f"{place}: give a 'prompt' (text) or 'messages' (a conversation), one of the two")
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise GptcliError(f"{place}: no 'answer' (a text or number the rewards check completions against)")
    try:
        if "prompt" in record:
            text = record["prompt"]
            if not isinstance(text, str) or not text.strip():
                raise GptcliError("'prompt' must be a non-empty text")
            prompt = session.prompt(text)
        else:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise GptcliError("'messages' must be a list of {role, content} messages")
            text = messages[-1]["content"]
            prompt = session.chat_prompt(messages)
    except GptcliError as exc:
        raise GptcliError(f"{place}: {exc}") from None
    return Question(place, text, prompt, answer)


def fitting(questions: list[Question], block_size: int, max_new_tokens: int, too_long: str,
            split: str) -> list[Question]:
    """The questions whose prompt leaves room for `max_new_tokens`: a longer one is left out,
    or with too_long=error refused naming its line."""
    room = block_size - max_new_tokens
    kept = [q for q in questions if len(q.prompt.ids) <= room]
    if too_long == "error" and len(kept) < len(questions):
        bad = next(q for q in questions if len(q.prompt.ids) > room)
        raise GptcliError(f"{bad.where}: the prompt takes {len(bad.prompt.ids)} tokens, and with "
                          f"finetune.grpo.max_new_tokens={max_new_tokens} more it is longer than the {block_size}-token "
                          f"context; shorten it, lower max_new_tokens, or set finetune.too_long=drop")
    if not kept:
        raise GptcliError(f"no {split} prompt leaves room for {max_new_tokens} new tokens in the {block_size}-token "
                          f"context; lower finetune.grpo.max_new_tokens")
    return kept


# --- rewards -------------------------------------------------------------------------------------


RewardFunction = Callable[[Question, str, int], float]  # (question, completion text, its tokens)


@dataclass(frozen=True)
class Term:
    label: str  # its metric name: rewards/LABEL/mean
    name: str  # as configured
    weight: float
    score: RewardFunction


class Scorer:
    """The weighted rewards of finetune.grpo.rewards. A user's function gets (prompt,
    completion, answer) and returns a number (a bool counts as 0 or 1); one that raises or
    returns anything else stops the run with an error naming it and the prompt's line."""

    def __init__(self, configs: list[RewardConfig], max_new_tokens: int):
        if not configs:
            raise GptcliError("finetune.grpo.rewards: name at least one reward (the first is the verifier "
                              "pass@1 counts)")
        labels: list[str] = []
        self.terms = []
        for i, cfg in enumerate(configs):
            label = cfg.name.rpartition(":")[2]
            label = label if label not in labels else f"{label}_{i}"
            labels.append(label)
            self.terms.append(Term(label, cfg.name, cfg.weight, _function(cfg, i, max_new_tokens)))
        self.weights = torch.tensor([t.weight for t in self.terms])

    def score(self, question: Question, completion: str, tokens: int) -> list[float]:
        """Each term's value for one completion (unweighted)."""
        return [self._value(term, question, completion, tokens) for term in self.terms]

    @staticmethod
    def _value(term: Term, question: Question, completion: str, tokens: int) -> float:
        try:
            value = term.score(question, completion, tokens)
        except GptcliError:
            raise
        except Exception as exc:  # the user's code: name it, and where
            raise GptcliError(f"{question.where}: the reward {term.name} raised {type(exc).__name__}: {exc}; "
                              f"fix the function (the run stopped; its last checkpoint is intact)") from None
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            raise GptcliError(f"{question.where}: the reward {term.name} returned {value!r}, not a finite number "
                              f"(the run stopped; its last checkpoint is intact)")
        return float(value)


def _function(cfg: RewardConfig, index: int, max_new_tokens: int) -> RewardFunction:
    option = f"finetune.grpo.rewards[{index}]"
    if cfg.pattern and cfg.name != "regex":
        raise GptcliError(f"{option}.pattern: only the regex reward takes a pattern")
    if cfg.name == "regex":
        if not cfg.pattern:
            raise GptcliError(f"{option}.pattern: the regex reward needs a pattern")
        try:
            pattern = re.compile(cfg.pattern)
        except re.error as exc:
            raise GptcliError(f"{option}.pattern: not a regular expression ({exc})") from None
        return lambda q, completion, tokens: float(pattern.search(completion) is not None)
    if cfg.name == "length":
        return lambda q, completion, tokens: -tokens / max_new_tokens
    if cfg.name in BUILT_IN:
        check = BUILT_IN[cfg.name]
        return lambda q, completion, tokens: check(completion, [q.answer])
    if not is_function_name(cfg.name):
        raise GptcliError(f"{option}.name: unknown reward {cfg.name!r}; use one of "
                          f"{', '.join([*BUILT_IN, 'regex', 'length'])}, FILE.py:FUNCTION or module:function")
    user = load_function(cfg.name, f"{option}.name")
    return lambda q, completion, tokens: user(q.text, completion, q.answer)


# --- what a step measured ------------------------------------------------------------------------


@dataclass
class RolloutStats:
    """Sums over the rollouts and training tokens since the last read, for the step metrics
    (TRL's names where TRL has one): written by the data (rollouts) and the model (tokens)."""

    labels: tuple[str, ...]
    values: list[torch.Tensor] = field(default_factory=list)  # (P, G, F) per rollout: each term's value
    totals: list[torch.Tensor] = field(default_factory=list)  # (P, G): the weighted sums
    lengths: list[int] = field(default_factory=list)  # completion tokens
    truncated: int = 0  # completions that hit max_new_tokens
    seconds: float = 0.0  # generating
    tokens: int = 0  # generated
    trained_tokens: int = 0
    clipped: float = 0.0
    kl: float | None = None  # summed over the trained tokens, where the loss has a KL term
    since: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # spent validating: not part of any step

    def reset(self) -> None:
        """Start the next interval: every sum back to zero, the clock from now."""
        self.__dict__.update(RolloutStats(self.labels).__dict__)

    def means(self, dist: Distributed, device: torch.device) -> dict[str, float]:
        """Each metric over the interval and every process (`device`: where the process group
        reduces, a GPU under nccl)."""
        if not self.totals:
            return {}
        values, totals = torch.cat(self.values).flatten(0, 1), torch.cat(self.totals)  # (N, F), (P, G)
        elapsed = time.perf_counter() - self.since - self.paused
        local = torch.tensor([totals.sum(), (totals ** 2).sum(), totals.numel(), sum(self.lengths),
                              self.truncated, float((totals.std(dim=1) < 1e-6).sum()), len(totals),
                              self.clipped, self.kl or 0.0, self.trained_tokens, self.tokens, self.seconds, elapsed,
                              *values.sum(0), *(values ** 2).sum(0)], dtype=torch.float64, device=device)
        (total, squares, n, length, truncated, flat, groups, clipped, kl, trained, tokens, seconds,
         elapsed, *per_term) = dist.all_reduce(local).tolist()
        F = len(self.labels)
        metrics = {"reward": total / n, "reward_std": _std(total, squares, n),
                   **{f"rewards/{label}/mean": per_term[i] / n for i, label in enumerate(self.labels)},
                   **{f"rewards/{label}/std": _std(per_term[i], per_term[F + i], n)
                      for i, label in enumerate(self.labels)},
                   "completions/mean_length": length / n, "completions/clipped_ratio": truncated / n,
                   "frac_reward_zero_std": flat / groups, "clip_ratio/region_mean": clipped / max(trained, 1),
                   "rollout_tokens_per_sec": tokens / max(seconds, 1e-9),
                   "generation_share": seconds / max(elapsed, 1e-9)}
        if self.kl is not None:
            metrics["kl"] = kl / max(trained, 1)
        return metrics


def _std(total: float, squares: float, n: float) -> float:
    """The population std from a sum and a sum of squares."""
    return max(squares / n - (total / n) ** 2, 0.0) ** 0.5


# --- the model -----------------------------------------------------------------------------------


class PolicyModel(TrunkHead):
    """A language model trained by the policy gradient: its forward is the summed policy loss
    of a batch of rollouts (train/policy.py). Its state dict is its trunk's: a GRPO
    checkpoint is a language model's."""

    def __init__(self, trunk: Model, settings: PolicySettings, stats: RolloutStats):
        super().__init__(trunk)
        self.settings = settings
        self.stats = stats

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        """The summed loss of the rollouts `idx`, `labels` (N, T) with their advantages (N,),
        and (N, T) the sampling policy's and the reference's log-probabilities where given:
        each token's loss summed (dapo: the loop divides by the step's tokens), or each
        completion's mean loss summed (grpo: divided by the step's completions)."""
        logps, rows, cols = labelled_logprobs(self.trunk, idx, labels)  # (K,) each
        old = logps.detach() if old_logps is None else old_logps[rows, cols]
        ref = None if ref_logps is None else ref_logps[rows, cols]
        result = token_losses(logps, old, advantages[rows], self.settings, ref)
        self.stats.trained_tokens += len(logps)
        self.stats.clipped += float(result.clipped.sum())
        if result.kl is not None:
            self.stats.kl = (self.stats.kl or 0.0) + float(result.kl.detach().sum())
        if self.settings.loss == "grpo":
            sums = torch.zeros(idx.size(0), device=idx.device).index_add(0, rows, result.losses)
            return (sums / torch.bincount(rows, minlength=idx.size(0)).clamp(min=1)).sum()
        return result.losses.sum()

    def step_metrics(self, dist: Distributed = Distributed()) -> dict[str, float]:
        """The rollouts' and training's statistics since the last call (RolloutStats)."""
        means = self.stats.means(dist, next(self.parameters()).device)
        self.stats.reset()
        return means


# --- data ----------------------------------------------------------------------------------------


class RolloutData:
    """Rollouts of the policy as training batches (module docstring), and the greedy pass@1
    that picks the best checkpoint."""

    metric = "val_pass@1"
    higher_is_better = True

    def __init__(self, policy: Model, tokenizer: Tokenizer, train: list[Record], val: list[Record], source: str,
                 val_source: str, cfg: GRPOConfig, scorer: Scorer, stats: RolloutStats, batch_size: int, seed: int,
                 device: torch.device, grad_accum: int = 1, dist: Distributed = Distributed(),
                 too_long: str = "drop", lora: bool = False, on_event: EventSink = ignore,
                 eval_tasks: list[EvalTask] = ()):
        self.policy, self.cfg, self.scorer, self.stats = policy, cfg, scorer, stats
        self.tasks = EvalTasks(list(eval_tasks), tokenizer)
        self.session = GenerationSession(language_model(Path("policy"), policy, tokenizer))
        block = policy.config.block_size
        self.train = fitting(read_questions(train, source, self.session), block, cfg.max_new_tokens, too_long,
                             "training")
        self.val = fitting(read_questions(val, val_source, self.session), block, cfg.max_new_tokens, too_long,
                           "validation")
        dropped = len(train) - len(self.train), len(val) - len(self.val)
        if any(dropped):
            on_event(Notice(f"dropped {dropped[0]} of {len(train)} training and {dropped[1]} of {len(val)} "
                            f"validation prompts with no room for {cfg.max_new_tokens} new tokens "
                            f"(finetune.too_long=drop)"))
        self.pad_id = tokenizer.eot_id
        self.batch_size, self.seed, self.device, self.dist = batch_size, seed, device, dist
        self.per_step = batch_size * grad_accum * dist.world_size
        self.reference = Reference(policy, lora) if cfg.beta > 0 else None  # the KL term's
        self.rollouts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (rollout, micro) -> batch
        self.on_event = on_event

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rollout = step // self.cfg.reuse
        if (rollout, micro) not in self.rollouts:
            if step % self.cfg.reuse and not self.rollouts:
                self.on_event(Notice(f"resumed inside a group of finetune.grpo.reuse={self.cfg.reuse} steps: the "
                                     f"rollouts of step {step} are drawn afresh from the resumed weights"))
            self.rollouts = {key: batch for key, batch in self.rollouts.items() if key[0] == rollout}
            self.rollouts[rollout, micro] = self._rollout(rollout, micro)
        return self.rollouts[rollout, micro]

    def _picks(self, rollout: int, micro: int, draw: int) -> list[int]:
        """The prompts of a micro-batch: its slice of the step's stream (draw 0); under dynamic
        sampling, each further draw's slice of a stream of its own."""
        stream = (STREAMS["grpo"], draw) if draw else STREAMS["grpo"]
        return list(step_rows(self.seed, stream, rollout, micro, self.dist.rank, self.batch_size, self.per_step,
                              self.dist.world_size, len(self.train)))

    def _seeds(self, rollout: int, micro: int, draw: int) -> list[int]:
        """One sampling seed per prompt of a draw, named by the prompt's place in the step's
        global batch: however the batch is split over micro-batches and processes, a prompt
        gets the same seed, so 2 processes draw what 1 process with twice the batch draws."""
        first = (micro * self.dist.world_size + self.dist.rank) * self.batch_size
        return [int(np.random.SeedSequence([self.seed, STREAMS["grpo"], rollout, draw, first + i])
                    .generate_state(1, np.uint64)[0]) for i in range(self.batch_size)]

    def _generate(self, questions: list[Question], settings: GenerationSettings, n: int,
                  seeds: list[int] | None = None) -> list[list[Sample]]:
        with eval_mode(self.policy):
            return self.session.generate_many([q.prompt for q in questions], settings, n,
                                              max_batch=max(n, min(len(questions) * n, MAX_ROWS)), seeds=seeds)

    def _groups(self, rollout: int, micro: int, draw: int) -> list[Group]:
        """One draw of prompts, each with its group of completions and their rewards."""
        questions = [self.train[i] for i in self._picks(rollout, micro, draw)]
        settings = GenerationSettings(self.cfg.max_new_tokens, self.cfg.temperature,
                                      top_p=self.cfg.top_p if self.cfg.top_p < 1 else None)
        started = time.perf_counter()
        samples = self._generate(questions, settings, self.cfg.group_size,
                                 self._seeds(rollout, micro, draw))
        self.stats.seconds += time.perf_counter() - started
        values = torch.tensor([[self.scorer.score(q, s.text, len(s.tokens)) for s in group]
                               for q, group in zip(questions, samples)])  # (P, G, F)
        totals = values @ self.scorer.weights  # (P, G)
        self._count(values, totals, samples)
        return [Group(*parts) for parts in zip(questions, samples, totals)]

    def _rollout(self, rollout: int, micro: int) -> dict[str, torch.Tensor]:
        groups = self._groups(rollout, micro, 0)
        if self.cfg.dynamic_sampling:  # keep the groups that teach something, drawing more to fill the batch
            informative = [g for g in groups if _differ(g.totals)]
            for draw in range(1, MAX_DRAWS):
                if len(informative) >= self.batch_size:
                    break
                informative += [g for g in self._groups(rollout, micro, draw) if _differ(g.totals)]
            groups = informative[:self.batch_size] or groups  # none at all: the flat groups, which change nothing
        totals = torch.stack([g.totals for g in groups])  # (P, G)
        idx, labels = answer_rows([(g.question.prompt.ids, _completion(s)) for g in groups for s in g.samples],
                                  self.pad_id, self.device)
        batch = {"idx": idx, "labels": labels,
                 "targets": labels if self.cfg.loss == "dapo" else torch.zeros(len(idx), dtype=torch.long,
                                                                               device=self.device),
                 "advantages": group_advantages(totals, self.cfg.scale_rewards).flatten().to(self.device)}
        if self.cfg.reuse > 1:  # what the sampling policy gave each token, for the ratio
            batch["old_logps"] = _per_token(labels, *self._policy_logprobs(idx, labels))
        if self.reference is not None:
            batch["ref_logps"] = _per_token(labels, *self.reference.logprobs(idx, labels))
        return batch

    def _count(self, values: torch.Tensor, totals: torch.Tensor, samples: list[list[Sample]]) -> None:
        """Every drawn completion into the step's statistics (kept for training or not)."""
        self.stats.values.append(values)
        self.stats.totals.append(totals)
        lengths = [len(_completion(s)) for group in samples for s in group]
        self.stats.lengths += lengths
        self.stats.tokens += sum(lengths)
        self.stats.truncated += sum(s.stop_id is None for group in samples for s in group)

    @torch.no_grad()
    def _policy_logprobs(self, idx: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with eval_mode(self.policy):
            return labelled_logprobs(self.policy, idx, labels)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, precision: Precision) -> dict[str, float]:
        """Greedy answers to every validation prompt: pass@1 (full marks from the first
        reward), the mean weighted reward and each reward's mean, the mean length; and the
        scores of train.eval_tasks."""
        started = time.perf_counter()
        samples = self._generate(self.val, GenerationSettings(self.cfg.max_new_tokens, temperature=0.0), 1)
        values = torch.tensor([self.scorer.score(q, group[0].text, len(group[0].tokens))
                               for q, group in zip(self.val, samples)])  # (N, F)
        metrics = {"val_pass@1": float((values[:, 0] >= VERIFIER_PASS).float().mean()),
                   "val_reward": float((values @ self.scorer.weights).mean()),
                   **{f"val_rewards/{t.label}/mean": float(values[:, i].mean())
                      for i, t in enumerate(self.scorer.terms)},
                   "val_completions/mean_length": float(np.mean([len(_completion(g[0])) for g in samples])),
                   **self.tasks.scores(self.policy, precision)}
        self.stats.paused += time.perf_counter() - started
        return metrics


def _per_token(labels: torch.Tensor, logps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, T) the K labelled tokens' log-probabilities in their places, 0 elsewhere."""
    return torch.zeros(labels.shape, device=labels.device).index_put_((rows, cols), logps)


def _differ(rewards: torch.Tensor) -> bool:
    """Whether a group's rewards (G,) are not all equal: only then do its advantages teach."""
    return bool((rewards != rewards[0]).any())


def _completion(sample: Sample) -> list[int]:
    """The ids the policy generated: its text's, and the stop id that ended it."""
    return sample.tokens + ([sample.stop_id] if sample.stop_id is not None else [])
