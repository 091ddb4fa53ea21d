"""One training engine: pretraining, SFT and DPO differ only in what they plug in.

A stage hands the engine a :class:`Stage`: the model (built or loaded on the engine's
device), an objective and a batch source (:mod:`codefoundry.train.objective`). The engine
does the rest, in short parts in the style of torchtitan's ``train()``/``train_step()``:

* :class:`Trainer` builds precision (bf16 autocast, FP8, TCFP-12), activation
  checkpointing, parallelism (torchrun DDP / FSDP2), compile and the optimizer, and
  restores a checkpoint (weights, optimizer, batch position, RNG, guard) for exact resume;
* :meth:`Trainer.train_step` runs the accumulated micro-batches and one optimizer step;
* :meth:`Trainer.evaluate`, :meth:`Trainer.save` (rotation by
  :class:`~codefoundry.train.checkpoint.CheckpointManager`) and :meth:`Trainer.log`.

A step's loss is the sum of its units' losses (target tokens; DPO: pairs) over the units of
the whole global batch, every micro-batch on every rank, so each unit weighs the same.

The step never waits for the device: the loss, metrics, NaN guard verdict and counters stay
on it and are read only when a record is logged. Compilation is static-shape
(``dynamic=False``): a sequence-length curriculum compiles one graph per stage rather than
switching the rest of the run to dynamic shapes, and evaluation runs through a separately
compiled function, so it never invalidates the training graph.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model as st_load_model
from torch import nn

from codefoundry.config import RunConfig, TrainConfig
from codefoundry.errors import UserError
from codefoundry.progress import Progress
from codefoundry.runtime import autocast, resolve_device, resolve_dtype, set_threads
from codefoundry.train import distributed as D
from codefoundry.train.checkpoint import CheckpointManager
from codefoundry.train.code_eval import CodeScorer, check_scorer, due
from codefoundry.train.distributed import DistInfo
from codefoundry.train.guard import StepGuard
from codefoundry.train.metrics import MetricsLog, read_metrics
from codefoundry.train.objective import BatchSource, Forward, Objective
from codefoundry.train.optim import build_optimizer
from codefoundry.train.runtime import (
    apply_linear_precision,
    enable_activation_checkpointing,
    peak_flops,
    use_compile,
)
from codefoundry.train.schedule import lr_factor

CALIBRATION_STEPS = 10  # time-budgeted runs measure this many steps before fixing the step count


@dataclass(frozen=True)
class Runtime:
    info: DistInfo
    device: torch.device
    dtype: torch.dtype


class PartialWeights(Protocol):
    """How a stage that trains only part of its model (LoRA adapters) checkpoints it: model.safetensors
    holds the plain model everything downstream reads, train_state.pt the trained part for resume."""

    def plain(self) -> nn.Module: ...  # the model as written to model.safetensors
    def state_dict(self) -> dict[str, torch.Tensor]: ...  # the trained weights
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Stage:
    """What a training stage plugs into the engine."""

    name: str  # progress label: pretrain, sft, dpo
    run: RunConfig  # saved with every checkpoint and as OUT/run_config.json
    model: nn.Module  # on the runtime's device, freshly built or loaded from a checkpoint
    objective: Objective
    source: BatchSource
    tokenizer_json: Path  # copied into every checkpoint
    # validation loss, given the eval forward; or {"val_loss": ..., "val_loss/<domain>": ...}, all logged
    validate: Callable[[Forward], float | dict[str, float]] | None = None
    finish: Callable[[], dict[str, Any]] | None = None  # after training (all ranks): extra summary entries
    partial: PartialWeights | None = None  # only part of the model trains (LoRA); None: all of it


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, still on the device."""

    names: list[str]  # "loss" first, then the objective's metrics
    means: torch.Tensor  # their global means over the step's units, one tensor
    grad_norm: torch.Tensor | None
    skip: torch.Tensor | None  # the guard's verdict (None: guard off)
    tokens: int  # tokens read by all ranks
    seq_len: int  # row length


def start(tc: TrainConfig) -> Runtime:
    """Threads, the torchrun process group (if any), this rank's device and dtype, the seed."""
    set_threads(tc.threads)
    info = D.init_distributed(tc.parallel, tc.device)
    device = D.rank_device(resolve_device(tc.device), info)
    torch.manual_seed(tc.seed)
    return Runtime(info, device, resolve_dtype(tc.dtype, device))


def train(run: RunConfig, make_stage: Callable[[Runtime], Stage], resume: bool | str = False,
          stop_after: int | None = None, show_progress: bool = True,
          scorer: CodeScorer | None = None) -> dict[str, Any]:
    """Train a stage and return its summary; every file is written under ``run.train.out``.

    ``resume``: False (fresh), True or "auto" (the newest valid checkpoint in ``train.out``,
    fresh if there is none) or a checkpoint directory. ``stop_after`` ends early (as if
    interrupted) after that step. ``scorer`` scores the code benchmarks ``train.humaneval_every`` /
    ``mbpp_every`` ask for (built by the command level from the eval layer).
    """
    check_scorer(run.train, scorer)
    rt = start(run.train)
    out = Path(run.train.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(out, run.train.keep_last, run.train.keep_best, rt.info, run.train.keep_best_metric)
    found = ckpts.find_resume(resume)
    trainer = Trainer(make_stage(rt), rt, ckpts, found, show_progress, scorer)
    return trainer.fit(stop_after)


def _eval_forward(model: nn.Module) -> Forward:
    """A function of its own for evaluation, so compiling it leaves the training graph's cache alone."""
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)
    return forward


class Trainer:
    def __init__(self, stage: Stage, rt: Runtime, ckpts: CheckpointManager,
                 found: tuple[Path, dict[str, Any]] | None, show_progress: bool = True,
                 scorer: CodeScorer | None = None) -> None:
        self.stage, self.ckpts, self.scorer = stage, ckpts, scorer
        self.tc = tc = stage.run.train
        self.info, self.device, self.dtype = rt.info, rt.device, rt.dtype
        self.out = Path(tc.out)
        self.model = model = stage.model
        if tc.optimizer == "muon" and self.info.sharded:
            raise UserError("train.optimizer=muon needs whole matrices; use train.parallel=ddp (or adamw with fsdp)")
        apply_linear_precision(model, tc.linear_precision, self.device)
        if tc.activation_checkpointing:
            enable_activation_checkpointing(model)
        ckpt_dir, state = found if found else (None, None)
        if stage.partial is not None and self.info.sharded:
            raise UserError("training part of a model (LoRA) runs under train.parallel=ddp, not fsdp")
        if state is not None and (stage.partial is None) != ("partial" not in state):
            raise UserError(f"checkpoint {ckpt_dir} was {'not ' * ('partial' not in state)}trained with adapters "
                            "(--lora); resume with the flags it was trained with")
        if state is not None and stage.partial is not None:
            stage.partial.load_state_dict(state["partial"])
        elif state is not None and not state.get("sharded"):
            st_load_model(model, str(ckpt_dir / "model.safetensors"), device=str(self.device))
        self.wrapped = D.wrap_model(model, self.info, self.device, self.dtype)
        self.optimizer = build_optimizer(model, tc, self.device, self.info)
        self.guard = StepGuard(tc.nan_guard, tc.spike_factor, tc.max_skips, tc.warmup_steps, self.device)
        self.step, self.total, self.elapsed_before, self.tokens_seen = 0, tc.max_steps, 0.0, 0
        self.resumed_from = 0
        if state is not None:
            self._restore(ckpt_dir, state)
        self.tokens_at_start = self.tokens_seen
        if self.total == 0 and tc.minutes <= 0:
            raise UserError("set train.max_steps or train.minutes (a time budget)")
        compiled = use_compile(tc.compile, self.device)
        self.forward = torch.compile(self.wrapped, dynamic=False) if compiled else self.wrapped
        self.eval_forward = torch.compile(_eval_forward(model), dynamic=False) if compiled else model
        if self.info.is_main:
            stage.run.save(self.out / "run_config.json")
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if state is not None else None,
                                  enabled=self.info.is_main, tensorboard=tc.tensorboard,
                                  wandb_project=tc.wandb_project, config=stage.run.to_dict())
        self.progress = Progress(stage.name, total=self.total or None, unit="step",
                                 enabled=show_progress and self.info.is_main)
        self.progress.done = self.step
        self.peak = peak_flops(self.device, tc.linear_precision)
        self.t0 = time.perf_counter()
        # Sums over the healthy steps since the last log record, kept on the device.
        self.window: torch.Tensor | None = None
        self.window_steps = torch.zeros((), device=self.device)
        self.skipped_at_log = self.guard.skipped

    def _restore(self, ckpt_dir: Path, state: dict[str, Any]) -> None:
        if state.get("sharded"):
            D.load_sharded(ckpt_dir / "dcp", self.model, self.optimizer.optimizers)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.stage.source.load_state_dict(state["loader"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.step = self.resumed_from = state["step"]
        self.total = self.tc.max_steps or state["total_steps"]  # an explicit max_steps may extend a finished run
        self.elapsed_before, self.tokens_seen = state["elapsed"], state["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches."""
        tc, info, objective = self.tc, self.info, self.stage.objective
        self.optimizer.set_lr_factor(lr_factor(self.step, self.total, tc.warmup_steps, tc.schedule,
                                               tc.decay_fraction, tc.min_lr_ratio))
        batches = [self.stage.source.next_batch(self.step) for _ in range(tc.grad_accum)]
        counts = [objective.units(b) for b in batches]
        if all(isinstance(c, int) for c in counts):  # fixed by the batch shapes, the same on every rank
            units: torch.Tensor | int = max(1, sum(counts) * info.world_size)
        else:
            units = D.sum_across_ranks(sum(torch.as_tensor(c, device=self.device) for c in counts).float(),
                                       info).clamp(min=1)
        scale = info.world_size / units  # DDP/FSDP average gradients over ranks; this makes it a sum / units
        names: list[str] = ["loss"]
        sums: torch.Tensor | None = None
        for i, batch in enumerate(batches):
            with D.grad_sync(self.wrapped, info, last=i == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss, extra = objective.loss(self.forward, batch)
                (loss * scale).backward()
            names = ["loss", *extra]
            part = torch.stack([loss.detach().float(), *(v.detach().float() for v in extra.values())])
            sums = part if sums is None else sums + part
        means = D.sum_across_ranks(sums, info) / units
        grad_norm = None
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
        skip = self.guard.check(self.step, means[0], grad_norm)
        self.optimizer.step(skip)
        self.model.post_step()
        self.optimizer.zero_grad()
        tokens = sum(objective.tokens(b) for b in batches) * info.world_size
        return StepResult(names, means, grad_norm, skip, tokens, _row_length(batches[-1]))

    def evaluate(self) -> float | None:
        """Validation loss of the stage's validation set (None without one); logged."""
        if self.stage.validate is None:
            return None
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.dtype):
                val = self.stage.validate(self.eval_forward)
        finally:
            self.model.train()
        losses = val if isinstance(val, dict) else {"val_loss": val}
        self.metrics.log({"step": self.step, **losses})
        return losses["val_loss"]

    def score_code(self) -> dict[str, float]:
        """pass@1 of the code benchmarks due at this step (``train.humaneval_every``...); logged."""
        benchmarks = due(self.tc, self.step, self.total)
        if not benchmarks:
            return {}
        with torch.no_grad(), autocast(self.device, self.dtype):
            scores = self.scorer(self.model, self.stage.tokenizer_json, benchmarks)
        self.metrics.log({"step": self.step, **scores})
        return scores

    def save(self, val_loss: float | None = None, scores: dict[str, float] | None = None) -> None:
        """A resumable checkpoint of this step (all ranks call it)."""
        state = {"step": self.step, "total_steps": self.total, "loader": self.stage.source.state_dict(),
                 "elapsed": self.elapsed_before + (time.perf_counter() - self.t0), "tokens": self.tokens_seen,
                 "run": self.stage.run.to_dict(), "guard": self.guard.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}
        if not self.info.sharded:
            state["optimizer"] = self.optimizer.state_dict()
        model = self.model
        if self.stage.partial is not None:
            state["partial"] = self.stage.partial.state_dict()
            model = self.stage.partial.plain() if self.info.is_main else model
        self.ckpts.save(self.step, model, self.stage.tokenizer_json, self.stage.run.preset, state, val_loss,
                        self.optimizer.optimizers, scores)

    def _accumulate(self, r: StepResult) -> None:
        kept = r.means if r.skip is None else r.means.masked_fill(r.skip, 0.0)
        if self.window is None:
            self.window = kept.clone()
        else:
            self.window += kept
        self.window_steps += 1 if r.skip is None else ~r.skip

    def log(self, r: StepResult, steps: int, seconds: float) -> None:
        """Write one record of the ``steps`` since the last one (the only place that reads the device)."""
        names, grad_norm, tokens_per_step, seq = r.names, r.grad_norm, r.tokens, r.seq_len
        self.guard.raise_if_stuck(self.step)
        values = (self.window / self.window_steps.clamp(min=1)).tolist() if self.window is not None else []
        record: dict[str, Any] = {"step": self.step, **dict(zip(names, values))}
        if not math.isfinite(record["loss"]):
            raise UserError(f"{self.stage.name} loss became {record['loss']} at step {self.step}; lower train.lr "
                            "(or keep train.nan_guard=true to skip such steps)")
        skipped = self.guard.skipped
        tok_s = steps * tokens_per_step / seconds if seconds > 0 else 0.0
        record.update({"lr": self.optimizer.param_groups[-1]["lr"],
                       "grad_norm": grad_norm.item() if grad_norm is not None else None,
                       "tokens": self.tokens_seen, "tok_per_s": tok_s,
                       "elapsed": self.elapsed_before + time.perf_counter() - self.t0, "seq_len": seq,
                       "skipped_steps": skipped - self.skipped_at_log})
        record.update(self.model.extra_metrics())
        if (epoch := getattr(self.stage.source, "epoch", None)) is not None:  # sources that know their passes
            record["epoch"] = epoch
        if self.peak:
            flops = self.model.flops_per_token(seq) * tokens_per_step / self.info.world_size
            record["mfu"] = flops * steps / seconds / self.peak
        self.metrics.log(record)
        extra = " | ".join(f"{k} {record[k]:.4g}" for k in names)
        extra += f" | lr {record['lr']:.2e} | {tok_s:,.0f} tok/s"
        if "mfu" in record:
            extra += f" | MFU {record['mfu']:.1%}"
        if record["skipped_steps"]:
            extra += f" | skipped {record['skipped_steps']}"
        self.progress.update(self.step - self.progress.done, extra)
        self.window, self.skipped_at_log = None, skipped
        self.window_steps.zero_()

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total`` steps (or ``stop_after``), evaluating, saving and logging on schedule."""
        tc = self.tc
        self.model.train()
        t_first = first_step = None  # end of this process's first step (excludes compile / warm-up)
        last_log_t, last_log_step = self.t0, self.step
        last_saved = self.step if self.resumed_from else -1
        val_loss = None
        while self.total == 0 or self.step < self.total:
            if stop_after is not None and self.step >= stop_after:
                break
            result = self.train_step()
            self._accumulate(result)
            self.step += 1
            self.tokens_seen += result.tokens
            now = time.perf_counter()
            if t_first is None:
                t_first, first_step = now, self.step
            if self.total == 0 and self.step - first_step >= CALIBRATION_STEPS:
                per_step = (now - t_first) / (self.step - first_step)
                remaining = tc.minutes * 60 - (self.elapsed_before + now - self.t0)
                self.total = D.broadcast_int(max(self.step + 1, self.step + int(remaining / per_step)), self.info,
                                             self.device)
                self.progress.total = self.total
            if self.step % tc.log_every == 0 or self.step == self.total or self.step == 1:
                self.log(result, self.step - last_log_step, now - last_log_t)
                last_log_t, last_log_step = now, self.step
            evaluated = False
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step != self.total:
                val_loss = self.evaluate()
                evaluated = val_loss is not None
            scores = self.score_code() if self.step != self.total else {}
            best_measured = self.ckpts.keep_best and self.ckpts.best_metric in scores  # saved so it can be the best
            if (tc.save_every and self.step % tc.save_every == 0 or best_measured) and self.step != self.total:
                self.save(val_loss if evaluated else None, scores)
                last_saved = self.step
        finished = self.total > 0 and self.step >= self.total
        scores: dict[str, float] = {}
        if finished:
            val_loss = self.evaluate()
            scores = self.score_code()
        if self.step != last_saved:
            self.save(val_loss if finished else None, scores)
        self.guard.raise_if_stuck(self.step)
        self.metrics.close()
        elapsed = self.progress.close(f"val loss {val_loss:.4f}" if val_loss is not None else "")
        summary = {"steps": self.step, "total_steps": self.total, "finished": finished, "tokens": self.tokens_seen,
                   "elapsed_s": self.elapsed_before + elapsed, "val_loss": val_loss,
                   "tok_per_s": (self.tokens_seen - self.tokens_at_start) / max(elapsed, 1e-9), "skipped_steps": self.guard.skipped,
                   "params": self.model.num_params(), "checkpoint": str(self.ckpts.latest_link),
                   "world_size": self.info.world_size, **scores}
        if self.info.is_main:
            logged = [r for r in read_metrics(self.metrics.path) if "loss" in r]
            summary["first"], summary["final"] = (logged[0], logged[-1]) if logged else (None, None)
        if self.stage.finish is not None:
            summary.update(self.stage.finish())
        if self.info.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _row_length(batch: Any) -> int:
    """Row length of a batch: the last dimension of its first tensor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[-1])
