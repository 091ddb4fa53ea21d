"""Direct Preference Optimization (Rafailov et al. 2023) with a frozen reference model.

Data: JSONL records ``{"prompt", "chosen", "rejected"}``, where ``prompt`` is a user
message (string) or a list of OpenAI messages, and ``chosen``/``rejected`` are assistant
replies. Loss per pair, with log-probabilities summed over the reply tokens only::

    -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

Logged: ``reward_margin`` (beta times the bracket, mean over pairs; 0 at the start) and
``reward_accuracy`` (the fraction of pairs where chosen out-scores rejected).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from codefoundry.checkpoint import load_model
from codefoundry.config import TrainConfig
from codefoundry.errors import UserError
from codefoundry.post.loop import fit, save_result, setup
from codefoundry.post.sft_data import Example, LoadReport, Source
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError, render_chat
from codefoundry.tokenizer.special import IGNORE_INDEX

DPO_DEFAULTS: dict[str, Any] = {"lr": 2e-5, "max_steps": 200, "batch_size": 8, "seq_len": 1024,
                                "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10}


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


def dpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean sigmoid DPO loss, per-pair reward margins)."""
    margins = beta * ((policy_c - ref_c) - (policy_r - ref_r))
    return -F.logsigmoid(margins).mean(), margins.detach()


def batches(pairs: list[tuple[Example, Example]], batch_size: int, seed: int) -> Iterator[list[tuple[Example, Example]]]:
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(pairs)))
            rng.shuffle(more)
            order += more
        yield [pairs[i] for i in order[:batch_size]]
        order = order[batch_size:]


@torch.no_grad()
def evaluate_margins(policy: torch.nn.Module, ref: torch.nn.Module, pairs: list[tuple[Example, Example]],
                     beta: float, pad_id: int, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Mean reward margin and accuracy of ``policy`` against ``ref`` on ``pairs``."""
    margins = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        x, y = pad_batch([c for c, _ in chunk] + [r for _, r in chunk], pad_id, device)
        pol, rf = sequence_logprobs(policy, x, y), sequence_logprobs(ref, x, y)
        n = len(chunk)
        margins.append(dpo_loss(pol[:n], pol[n:], rf[:n], rf[n:], beta)[1])
    m = torch.cat(margins)
    return {"reward_margin": m.mean().item(), "reward_accuracy": (m > 0).float().mean().item()}


def dpo(checkpoint: str | Path, source: Source, out: str | Path, tc: TrainConfig, beta: float = 0.1,
        reference: str | Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Train ``checkpoint`` on preference pairs against a frozen ``reference`` (default: itself)."""
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rt = setup(tc)
    policy, tok = load_model(checkpoint, rt.device)
    ref, _ = load_model(reference or checkpoint, rt.device)
    ref.requires_grad_(False)
    if ref.cfg.vocab_size != policy.cfg.vocab_size:
        raise UserError("the reference model's vocabulary differs from the policy's; use the same tokenizer")
    seq_len = min(tc.seq_len, policy.cfg.max_seq_len)
    report = LoadReport()
    pairs = load_pairs(source, tok, seq_len, report)
    if show_progress:
        print(f"dpo data {source.location}: {report}")
    if not pairs:
        raise UserError(f"no usable preference pairs in {source.location} ({report})")
    stream = batches(pairs, tc.batch_size, tc.seed)

    def step_loss():
        chunk = next(stream)
        n = len(chunk)
        x, y = pad_batch([c for c, _ in chunk] + [r for _, r in chunk], tok.eot_id, rt.device)
        pol = sequence_logprobs(policy, x, y)
        with torch.no_grad():
            rf = sequence_logprobs(ref, x, y)
        loss, margins = dpo_loss(pol[:n], pol[n:], rf[:n], rf[n:], beta)
        return loss, {"reward_margin": margins.mean(), "reward_accuracy": (margins > 0).float().mean()}

    records = fit(policy, tc, rt, step_loss, out, "dpo", show_progress)
    final = evaluate_margins(policy, ref, pairs, beta, tok.eot_id, rt.device)
    extra = {"beta": beta, "reference": str(reference or checkpoint), "pairs": report.kept,
             "skipped": dict(report.skipped), "train_set": final}
    save_result(policy, checkpoint, out, records, extra)
    return {"checkpoint": str(out / "checkpoint"), "final": records[-1], **extra}
