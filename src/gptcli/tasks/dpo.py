"""Preference tuning (`gptcli finetune --task dpo`): teach a model to prefer the chosen of
two answers to a prompt over the rejected one (train/preference.py: DPO, IPO, SimPO).

A pair is a record `{"prompt", "chosen", "rejected"}` of texts, or TRL's conversational form
`{"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant
message]}`. On a chat model (gptcli's instruct tokens, or an imported chat template) the
prompt becomes its chat prompt (a text: one user turn) and each answer is its text and the
format's end of turn; on a base model, the prompt's text and the answer's with end-of-text.
Log-probabilities are summed over the answer's tokens only.

The reference is the starting model. By default its log-probabilities of every pair are
computed once, in fp32, before training (no second copy of the model in memory, LoRA or not),
as TRL's `precompute_ref_log_probs`; a resumed run computes them again from the same
checkpoint. With finetune.dpo.reference=live they are computed with each batch instead, as
TRL does by default: by the trunk with its LoRA adapters switched off, or by a frozen copy of
the starting weights in a full finetune (model/heads.py, Reference).

Rows: a batch of P pairs is 2P right-padded rows, the P chosen then the P rejected, with
`targets` one entry per pair (the loop averages the summed loss over them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gptcli.config import DPOConfig, EvalTask
from gptcli.data.text.records import Record, where
from gptcli.data.tokenizers.chat_format import ROLES, chat_prompt_ids, is_chat_model, prompt_ids, reply_ids
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.data.training.dataset import STREAMS, step_rows
from gptcli.errors import GptcliError
from gptcli.evals.run_tasks import EvalTasks
from gptcli.events import EventSink, Notice, ignore
from gptcli.model import Model
from gptcli.model.heads import Reference, TrunkHead, labelled_logprobs
from gptcli.runtime import Distributed, Precision, eval_mode
from gptcli.tasks.answers import answer_rows
from gptcli.train.preference import PairLosses, PreferenceSettings, pair_losses

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


class Pair(NamedTuple):
    where: str  # `file:line` of its record
    prompt: list[int]
    chosen: list[int]  # the answer's ids, its end of turn included
    rejected: list[int]


def settings_of(cfg: DPOConfig) -> PreferenceSettings:
    return PreferenceSettings(cfg.loss, cfg.beta, cfg.label_smoothing, cfg.gamma, cfg.rpo_alpha)


# --- records into pairs of token ids -------------------------------------------------------------


def read_pairs(records: list[Record], source: str, tokenizer: Tokenizer) -> list[Pair]:
    """Every record of `source` as token ids (module docstring), or an error naming its line."""
    return [_pair(record, where(source, record), tokenizer) for record in records]


def _pair(record: Record, place: str, tokenizer: Tokenizer) -> Pair:
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise GptcliError(f"{place}: no '{name}' field; a preference pair has prompt, chosen and rejected")
    chosen, rejected = _answer(record["chosen"], place, "chosen"), _answer(record["rejected"], place, "rejected")
    if chosen == rejected:
        raise GptcliError(f"{place}: 'chosen' and 'rejected' are the same text; a pair must differ")
    prompt = record["prompt"]
    chat = is_chat_model(tokenizer)
    if isinstance(prompt, list):
        if not chat:
            raise GptcliError(f"{place}: a conversational prompt needs a chat model; finetune with --task instruct "
                              f"first, or give the prompt as text")
        _check_messages(prompt, place)
        ids = chat_prompt_ids(tokenizer, prompt)
    elif isinstance(prompt, str):
        ids = prompt_ids(tokenizer, prompt) if chat else tokenizer.encode(prompt)
    else:
        raise GptcliError(f"{place}: 'prompt' must be a text or a list of messages")
    if chat:  # each answer as the format renders a reply to the prompt, its end of turn included
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return Pair(place, ids, reply_ids(tokenizer, messages, chosen), reply_ids(tokenizer, messages, rejected))
    return Pair(place, ids or [tokenizer.eot_id], tokenizer.encode(chosen) + [tokenizer.eot_id],
                tokenizer.encode(rejected) + [tokenizer.eot_id])


def _answer(value: object, place: str, name: str) -> str:
    """An answer's text: a text, or a list of one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant" \
                or not isinstance(value[0].get("content"), str):
            raise GptcliError(f"{place}: '{name}' as messages must be one assistant message")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise GptcliError(f"{place}: '{name}' must be a text or a list of one assistant message")
    if not value.strip():
        raise GptcliError(f"{place}: '{name}' is empty; each answer needs text")
    return value


def _check_messages(messages: list, place: str) -> None:
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise GptcliError(f"{place}: every prompt message needs a 'role' ({', '.join(ROLES)}) and a string "
                              f"'content'")


def fitting(pairs: list[Pair], block_size: int, too_long: str, split: str) -> list[Pair]:
    """The pairs whose prompt and longer answer fit the context: a longer one is left out, or
    with too_long=error refused naming its line (an answer is never cut)."""
    kept = []
    for pair in pairs:
        if len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) - 1 <= block_size:
            kept.append(pair)
        elif too_long == "error":
            raise GptcliError(f"{pair.where}: the prompt and its longer answer take "
                              f"{len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))} tokens, longer "
                              f"than the {block_size}-token context; shorten it, or set finetune.too_long=drop")
    if not kept:
        raise GptcliError(f"no {split} pair fits the {block_size}-token context")
    return kept


def pair_rows(pairs: list[Pair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, labels), each (2P, T): the chosen sequences then the rejected (`answer_rows`)."""
    return answer_rows([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], pad_id,
                       device)


# --- the model ---------------------------------------------------------------------------------


class Tally:
    """Sums of TRL's batch statistics (STATS) over pairs, for their means."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.pairs = 0

    def add(self, result: PairLosses, logps: torch.Tensor) -> None:
        """One batch: its pairs' rewards and their sequences' log-probabilities (2P,)."""
        chosen, rejected, P = result.chosen_rewards, result.rejected_rewards, len(result.losses)
        values = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                  "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected,
                  "logps/chosen": logps[:P], "logps/rejected": logps[P:]}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().sum()
        self.pairs += P

    def means(self, dist: Distributed = Distributed()) -> dict[str, float]:
        """Each statistic's mean over the pairs added on every rank ({} before any)."""
        if not self.pairs:
            return {}
        sums = torch.stack([self.sums[name] for name in STATS])
        pairs = dist.all_reduce(torch.tensor(float(self.pairs), device=sums.device))
        return dict(zip(STATS, (dist.all_reduce(sums) / pairs).tolist()))


class PreferenceModel(TrunkHead):
    """A language model trained on pairs: its forward is the summed preference loss of a
    batch, and it keeps the batch statistics TRL logs (STATS) until `step_metrics` reads them.
    Its state dict is its trunk's: a DPO checkpoint is a language model's."""

    def __init__(self, trunk: Model, settings: PreferenceSettings, live: Reference | None = None):
        super().__init__(trunk)
        self.settings = settings
        self.live = live  # the reference computed with each batch (finetune.dpo.reference=live)
        self.tally = Tally()  # training batches since the last step_metrics

    def sequence_logps(self, idx: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `idx` (N, T): the summed log-probability of its labelled tokens, and
        their count."""
        picked, rows, _ = labelled_logprobs(self.trunk, idx, labels)  # (K,) each
        return _row_sums(picked, rows, idx.size(0)), torch.bincount(rows, minlength=idx.size(0)).float()

    def pair_losses(self, idx: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[PairLosses, torch.Tensor]:
        """Each pair's loss and rewards, and the rows' summed log-probabilities (2P,)."""
        logps, counts = self.sequence_logps(idx, labels)  # chosen rows, then rejected
        if reference is None and self.live is not None and self.settings.needs_reference:
            picked, rows, _ = self.live.logprobs(idx, labels)
            reference = _row_sums(picked, rows, idx.size(0))
        P = idx.size(0) // 2
        ref = (None, None) if reference is None else (reference[:P], reference[P:])
        return pair_losses(logps[:P], logps[P:], counts[:P], counts[P:], self.settings, *ref), logps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """The summed loss of the P = len(targets) pairs in `idx` and `labels` (2P, T), with
        their reference log-probabilities `reference` (2P,)."""
        result, logps = self.pair_losses(idx, labels, reference)
        self.tally.add(result, logps)
        return result.losses.sum()

    def step_metrics(self, dist: Distributed = Distributed()) -> dict[str, float]:
        """The mean of each statistic over the training pairs since the last call."""
        means, self.tally = self.tally.means(dist), Tally()
        return means


def _row_sums(picked: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the sum of each row's labelled log-probabilities, from (K,) values and their rows."""
    return torch.zeros(n, device=picked.device).index_add(0, rows, picked)


# --- data ----------------------------------------------------------------------------------------


class PreferenceData:
    """Pairs as batches for the loop, with each pair's reference log-probabilities, and the
    validation the best checkpoint is picked by (its reward accuracy)."""

    metric = "val_rewards/accuracies"
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, train: list[Pair], val: list[Pair], reference: Model,
                 settings: PreferenceSettings, block_size: int, batch_size: int, seed: int,
                 device: torch.device, grad_accum: int = 1, dist: Distributed = Distributed(),
                 too_long: str = "drop", on_event: EventSink = ignore, eval_tasks: list[EvalTask] = (),
                 precompute: bool = True):
        self.pad_id = tokenizer.eot_id
        self.tasks = EvalTasks(list(eval_tasks), tokenizer)
        self.train = fitting(train, block_size, too_long, "training")
        self.val = fitting(val, block_size, too_long, "validation")
        dropped = len(train) - len(self.train), len(val) - len(self.val)
        if any(dropped):
            on_event(Notice(f"dropped {dropped[0]} of {len(train)} training and {dropped[1]} of {len(val)} "
                            f"validation pairs longer than the {block_size}-token context (finetune.too_long=drop)"))
        self.settings, self.batch_size, self.seed, self.device, self.dist = settings, batch_size, seed, device, dist
        self.per_step = batch_size * grad_accum * dist.world_size
        # Without `precompute`, the model computes its reference with each batch (PreferenceModel.live).
        self.train_reference = self._reference(reference, self.train) if precompute else None
        self.val_reference = self._reference(reference, self.val) if precompute else None

    @torch.no_grad()
    def _reference(self, model: Model, pairs: list[Pair]) -> torch.Tensor | None:
        """(N, 2): every pair's summed log-probability of its chosen and rejected answer under
        the starting weights, fp32 (None for the reference-free simpo)."""
        if not self.settings.needs_reference:
            return None
        head = PreferenceModel(model, self.settings)
        found = []
        with eval_mode(model):
            for start in range(0, len(pairs), self.batch_size):
                rows = pair_rows(pairs[start:start + self.batch_size], self.pad_id, self.device)
                found.append(head.sequence_logps(*rows)[0].view(2, -1).T)  # (P, 2)
        return torch.cat(found)

    def _batch(self, pairs: list[Pair], reference: torch.Tensor | None, picks) -> dict[str, torch.Tensor]:
        idx, labels = pair_rows([pairs[i] for i in picks], self.pad_id, self.device)
        batch = {"idx": idx, "labels": labels, "targets": torch.zeros(len(picks), dtype=torch.long, device=self.device)}
        if reference is not None:
            batch["reference"] = reference[torch.as_tensor(picks)].T.reshape(-1)  # chosen ones, then rejected
        return batch

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        picks = step_rows(self.seed, STREAMS["dpo"], step, micro, self.dist.rank, self.batch_size, self.per_step,
                          self.dist.world_size, len(self.train))
        return self._batch(self.train, self.train_reference, picks)

    @torch.no_grad()
    def validate(self, model: PreferenceModel, precision: Precision) -> dict[str, float]:
        """The mean loss and TRL's statistics over every validation pair (`val_` + name), and
        the scores of train.eval_tasks."""
        tally, loss = Tally(), 0.0
        with eval_mode(model):
            for start in range(0, len(self.val), self.batch_size):
                picks = range(start, min(start + self.batch_size, len(self.val)))
                batch = self._batch(self.val, self.val_reference, picks)
                with precision.autocast():
                    result, logps = model.pair_losses(batch["idx"], batch["labels"], batch.get("reference"))
                tally.add(result, logps)
                loss += float(result.losses.sum())
        return {"val_loss": loss / len(self.val), **{f"val_{name}": value for name, value in tally.means().items()},
                **self.tasks.scores(getattr(model, "_orig_mod", model).trunk, precision)}
