"""Supervised fine-tuning: train a checkpoint on chat conversations, loss on assistant tokens only.

Conversations are rendered with the chat template (:mod:`codefoundry.tokenizer.chat`),
mixed by source weight and packed into rows with document masking, so packed
conversations never see each other. Training runs on the pretraining engine
(:mod:`codefoundry.train.engine`): DDP/FSDP2 under torchrun, exact resume, the NaN guard,
compile, bf16/FP8/TCFP-12, metrics and checkpoint rotation, and every assistant token
weighs the same in a step however the tokens fall into micro-batches and ranks.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import torch

from codefoundry.checkpoint import load_model
from codefoundry.config import ModelConfig, RunConfig
from codefoundry.errors import UserError
from codefoundry.post.lora import LoraWeights
from codefoundry.post.sft_data import (
    Example,
    LoadReport,
    Mixture,
    Source,
    pack_rows,
    render_examples,
)
from codefoundry.train.code_eval import CodeScorer
from codefoundry.train.distributed import DistInfo
from codefoundry.train.engine import Runtime, Stage, train
from codefoundry.train.objective import Forward, NextTokenLoss

# Small fine-tuning losses swing by more than 4x between batches, so the guard only catches NaN/inf.
SFT_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "max_steps": 300, "batch_size": 8, "seq_len": 1024,
                                "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10,
                                "spike_factor": 0.0}


class DocumentMaskedLoss(NextTokenLoss):
    """Next-token loss with document masking on during the forward (each conversation opens with
    EOT). It is a training-time switch: saved checkpoints keep the source model's setting."""

    def __init__(self, cfg: ModelConfig, eot_id: int) -> None:
        super().__init__(masked=True)
        self.cfg, self.eot_id = cfg, eot_id

    def loss(self, model: Forward, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        saved = self.cfg.doc_mask, self.cfg.doc_sep_id
        self.cfg.doc_mask, self.cfg.doc_sep_id = True, self.eot_id
        try:
            return super().loss(model, batch)
        finally:
            self.cfg.doc_mask, self.cfg.doc_sep_id = saved


class PackedConversations:
    """The SFT batch source: the mixture packed into rows of ``seq_len``.

    A global batch is ``batch_size * world_size`` consecutive rows and rank r takes the r-th
    slice, so W ranks train on exactly the rows one process would. The position is the
    number of rows consumed; resuming replays the mixture to it (no tokenising, no model:
    cheap next to the training it stands for).
    """

    def __init__(self, sets: list[list[Example]], weights: list[float], seed: int, batch_size: int,
                 seq_len: int, pad_id: int, info: DistInfo, device: torch.device) -> None:
        self.sets, self.weights, self.seed = sets, weights, seed
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.info, self.device = info, device
        self.consumed = 0
        self.rows = self._stream()

    def _stream(self):
        return pack_rows(iter(Mixture(self.sets, self.weights, self.seed)), self.seq_len, self.pad_id)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = list(itertools.islice(self.rows, self.batch_size * self.info.world_size))
        self.consumed += len(rows)
        xs, ys = zip(*rows[self.info.rank * self.batch_size:(self.info.rank + 1) * self.batch_size])
        return (torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True),
                torch.tensor(ys, dtype=torch.long).to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, int]:
        return {"rows": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rows = self._stream()
        collections.deque(itertools.islice(self.rows, state["rows"]), maxlen=0)
        self.consumed = state["rows"]


def sft(checkpoint: str | Path, sources: list[Source], run: RunConfig, resume: bool | str = False,
        stop_after: int | None = None, show_progress: bool = True, lora: str | None = None,
        scorer: CodeScorer | None = None) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on ``sources``; writes OUT/checkpoint(s), metrics.jsonl, summary.json.
    ``lora`` (e.g. ``"r=16,alpha=32,targets=q_proj,v_proj"``) trains adapters only, and adds OUT/adapter/.
    ``scorer`` scores the code benchmarks ``train.humaneval_every`` / ``mbpp_every`` ask for."""
    if not sources:
        raise UserError("give at least one --data source")
    tc = run.train
    data: dict[str, Any] = {}

    def make_stage(rt: Runtime) -> Stage:
        model, tok = load_model(checkpoint, rt.device)
        seq_len = min(tc.seq_len, model.cfg.max_seq_len)
        sets = []
        for src in sources:
            report = LoadReport()
            sets.append(render_examples(src.records(), tok, seq_len, report))
            data[src.location] = {"weight": src.weight, "kept": report.kept, "skipped": dict(report.skipped)}
            if show_progress and rt.info.is_main:
                print(f"sft data {src.location} (weight {src.weight:g}): {report}")
        source = PackedConversations(sets, [s.weight for s in sources], tc.seed, tc.batch_size, seq_len, tok.eot_id,
                                     rt.info, rt.device)
        partial = LoraWeights(model, lora, tc) if lora else None

        def finish() -> dict[str, Any]:
            extra = partial.finish(tc.out, rt.info.is_main) if partial else {}
            return {"source": str(checkpoint), "data": data, **extra}

        return Stage("sft", run, model, DocumentMaskedLoss(model.cfg, tok.eot_id), source,
                     Path(checkpoint) / "tokenizer.json", finish=finish, partial=partial)

    return train(run, make_stage, resume, stop_after, show_progress, scorer)
