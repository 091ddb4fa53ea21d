"""Direct Preference Optimization (Rafailov et al. 2023) with a frozen reference model.

Data: JSONL records ``{"prompt", "chosen", "rejected"}``, where ``prompt`` is a user
message (string) or a list of OpenAI messages, and ``chosen``/``rejected`` are assistant
replies. Loss per pair, with log-probabilities summed over the reply tokens only::

    -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

Logged: ``reward_margin`` (beta times the bracket, mean over pairs; 0 at the start) and
``reward_accuracy`` (the fraction of pairs where chosen out-scores rejected).

Training runs on the pretraining engine (:mod:`codefoundry.train.engine`), with the pair as
the unit: a step's loss is the mean over every pair of the global batch, however the pairs
fall into micro-batches and ranks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from codefoundry.checkpoint import load_model
from codefoundry.config import RunConfig
from codefoundry.errors import UserError
from codefoundry.post.lora import LoraWeights
from codefoundry.post.sft_data import Example, LoadReport, Source
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError, render_chat
from codefoundry.tokenizer.special import IGNORE_INDEX
from codefoundry.train.code_eval import CodeScorer
from codefoundry.train.distributed import DistInfo
from codefoundry.train.engine import Runtime, Stage, train
from codefoundry.train.objective import Forward

# The DPO loss falls towards 0 and swings by more than 4x between batches, so the guard only catches NaN/inf.
DPO_DEFAULTS: dict[str, Any] = {"lr": 2e-5, "max_steps": 200, "batch_size": 8, "seq_len": 1024,
                                "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10,
                                "spike_factor": 0.0}


def render_pair(tok: CodeTokenizer, record: Any) -> tuple[Example, Example]:
    """(chosen, rejected) examples whose labels cover only the reply and its end token."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
        raise ChatFormatError("a pair needs string 'chosen' and 'rejected'")
    prompt = record.get("prompt")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'prompt' must be a string or a list of messages")
    out = []
    for reply in (record["chosen"], record["rejected"]):
        context = render_chat(tok, messages, add_generation_prompt=True)
        full = render_chat(tok, messages + [{"role": "assistant", "content": reply}])
        inputs, labels = full.labels()
        # Only the reply is scored: blank out any trained tokens inside the prompt context.
        labels = [IGNORE_INDEX if i < len(context.ids) - 1 else t for i, t in enumerate(labels)]
        out.append(Example(inputs, labels))
    return out[0], out[1]


def load_pairs(source: Source, tok: CodeTokenizer, seq_len: int,
               report: LoadReport) -> list[tuple[Example, Example]]:
    pairs = []
    for record in source.records():
        try:
            chosen, rejected = render_pair(tok, record)
        except ChatFormatError:
            report.skipped["malformed"] += 1
            continue
        if max(len(chosen.inputs), len(rejected.inputs)) > seq_len:
            report.skipped["longer than seq_len"] += 1
        elif chosen.inputs == rejected.inputs:
            report.skipped["chosen equals rejected"] += 1
        else:
            pairs.append((chosen, rejected))
            report.kept += 1
    return pairs


def pad_batch(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, labels); padding comes after each sequence, so causal attention
    never lets a real token see it."""
    width = max(len(e.inputs) for e in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, :len(e.inputs)] = torch.tensor(e.inputs)
        y[row, :len(e.labels)] = torch.tensor(e.labels)
    return x.to(device), y.to(device)


def sequence_logprobs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens, shape (B,)."""
    logits = model(x).float()
    nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(dim=1)


def dpo_margins(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                beta: float) -> torch.Tensor:
    """Per-pair reward margins ``beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))``; the loss is
    ``-log sigmoid`` of them."""
    return beta * ((policy_c - ref_c) - (policy_r - ref_r))


class PreferenceLoss:
    """The DPO objective on batches of n chosen rows followed by their n rejected rows."""

    def __init__(self, reference: torch.nn.Module, beta: float) -> None:
        self.reference, self.beta = reference, beta

    def units(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].shape[0] // 2  # pairs: fixed by batch_size, the same on every rank

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def loss(self, model: Forward, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        n = x.shape[0] // 2
        pol = sequence_logprobs(model, x, y)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, x, y)
        margins = dpo_margins(pol[:n], pol[n:], ref[:n], ref[n:], self.beta)
        fixed = margins.detach()
        return -F.logsigmoid(margins).sum(), {"reward_margin": fixed.sum(), "reward_accuracy": (fixed > 0).float().sum()}


class PairBatches:
    """The DPO batch source: pairs in a reshuffled order each epoch; the global batch is
    ``batch_size * world_size`` pairs and rank r takes the r-th slice. Position: the RNG and
    the rest of the current order."""

    def __init__(self, pairs: list[tuple[Example, Example]], batch_size: int, seed: int, pad_id: int,
                 info: DistInfo, device: torch.device) -> None:
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.info, self.device = info, device
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.batch_size * self.info.world_size
        while len(self.order) < need:
            more = list(range(len(self.pairs)))
            self.rng.shuffle(more)
            self.order += more
        lo = self.info.rank * self.batch_size
        chunk = [self.pairs[i] for i in self.order[lo:lo + self.batch_size]]
        self.order = self.order[need:]
        return pad_batch([c for c, _ in chunk] + [r for _, r in chunk], self.pad_id, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])


@torch.no_grad()
def evaluate_margins(policy: torch.nn.Module, ref: torch.nn.Module, pairs: list[tuple[Example, Example]],
                     beta: float, pad_id: int, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Mean reward margin and accuracy of ``policy`` against ``ref`` on ``pairs``."""
    was_training = policy.training
    policy.eval()
    margins = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        x, y = pad_batch([c for c, _ in chunk] + [r for _, r in chunk], pad_id, device)
        pol, rf = sequence_logprobs(policy, x, y), sequence_logprobs(ref, x, y)
        n = len(chunk)
        margins.append(dpo_margins(pol[:n], pol[n:], rf[:n], rf[n:], beta))
    policy.train(was_training)
    m = torch.cat(margins)
    return {"reward_margin": m.mean().item(), "reward_accuracy": (m > 0).float().mean().item()}


def dpo(checkpoint: str | Path, source: Source, run: RunConfig, beta: float = 0.1,
        reference: str | Path | None = None, resume: bool | str = False, stop_after: int | None = None,
        show_progress: bool = True, lora: str | None = None, scorer: CodeScorer | None = None) -> dict[str, Any]:
    """Train ``checkpoint`` on preference pairs against a frozen ``reference`` (default: itself).
    ``lora`` trains adapters on the policy only (the reference stays the frozen base) and adds OUT/adapter/.
    ``scorer`` scores the code benchmarks ``train.humaneval_every`` / ``mbpp_every`` ask for."""
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    tc = run.train
    report = LoadReport()

    def make_stage(rt: Runtime) -> Stage:
        policy, tok = load_model(checkpoint, rt.device)
        ref, _ = load_model(reference or checkpoint, rt.device)
        ref.requires_grad_(False)
        if ref.cfg.vocab_size != policy.cfg.vocab_size:
            raise UserError("the reference model's vocabulary differs from the policy's; use the same tokenizer")
        pairs = load_pairs(source, tok, min(tc.seq_len, policy.cfg.max_seq_len), report)
        if show_progress and rt.info.is_main:
            print(f"dpo data {source.location}: {report}")
        if not pairs:
            raise UserError(f"no usable preference pairs in {source.location} ({report})")

        partial = LoraWeights(policy, lora, tc) if lora else None

        def finish() -> dict[str, Any]:
            extra = partial.finish(tc.out, rt.info.is_main) if partial else {}
            return {**extra, "beta": beta, "source": str(checkpoint), "reference": str(reference or checkpoint),
                    "pairs": report.kept, "skipped": dict(report.skipped),
                    "train_set": evaluate_margins(policy, ref, pairs, beta, tok.eot_id, rt.device)}

        return Stage("dpo", run, policy, PreferenceLoss(ref, beta),
                     PairBatches(pairs, tc.batch_size, tc.seed, tok.eot_id, rt.info, rt.device),
                     Path(checkpoint) / "tokenizer.json", finish=finish, partial=partial)

    return train(run, make_stage, resume, stop_after, show_progress, scorer)
