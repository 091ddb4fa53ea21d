"""The fine-tuning loop shared by SFT and DPO, built from the pretraining spine's pieces.

The caller supplies ``step_loss()``: the loss of one micro-batch plus any scalar metrics to
log. This loop does the rest (learning-rate schedule, gradient accumulation and clipping,
optimizer step, JSONL metrics, progress line) and knows nothing about the objective.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from codefoundry.checkpoint import read_model_config, save_checkpoint
from codefoundry.config import TrainConfig, update_dataclass
from codefoundry.errors import UserError
from codefoundry.progress import Progress
from codefoundry.recipes import parse_overrides
from codefoundry.runtime import autocast, resolve_device, resolve_dtype, set_threads
from codefoundry.train.metrics import MetricsLog
from codefoundry.train.optim import build_optimizer
from codefoundry.train.schedule import lr_factor

# One micro-batch: (loss to backpropagate, extra metrics as 0-d tensors). Values stay on the
# device until a log step, so the loop never stalls the GPU to read them.
StepLoss = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_config(defaults: dict[str, Any], overrides: list[str]) -> TrainConfig:
    """A TrainConfig with this stage's defaults and ``train.field=value`` overrides."""
    over = parse_overrides(overrides)
    unknown = set(over) - {"train"}
    if unknown:
        raise UserError(f"only train.* overrides apply here, got {sorted(unknown)}")
    return update_dataclass(update_dataclass(TrainConfig(), defaults, "train."), over.get("train", {}), "train.")


@dataclasses.dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype


def setup(tc: TrainConfig) -> Runtime:
    set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    return Runtime(device, resolve_dtype(tc.dtype, device))


def fit(model: torch.nn.Module, tc: TrainConfig, rt: Runtime, step_loss: StepLoss, out: Path, desc: str,
        show_progress: bool = True) -> list[dict[str, Any]]:
    """Run ``tc.max_steps`` optimizer steps; return the logged records (also in out/metrics.jsonl)."""
    if tc.max_steps <= 0:
        raise UserError("set train.max_steps to a positive number of steps")
    optimizer = build_optimizer(model, tc, rt.device)
    metrics = MetricsLog(out / "metrics.jsonl")
    progress = Progress(desc, total=tc.max_steps, unit="step", enabled=show_progress)
    records: list[dict[str, Any]] = []
    sums: dict[str, torch.Tensor] = {}
    count = 0
    model.train()
    t0 = time.perf_counter()
    for step in range(1, tc.max_steps + 1):
        optimizer.set_lr_factor(lr_factor(step - 1, tc.max_steps, tc.warmup_steps, tc.schedule,
                                          tc.decay_fraction, tc.min_lr_ratio))
        for _ in range(tc.grad_accum):
            with autocast(rt.device, rt.dtype):
                loss, extra = step_loss()
            (loss / tc.grad_accum).backward()
            for k, v in {"loss": loss, **extra}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if step % tc.log_every == 0 or step == tc.max_steps or step == 1:
            record = {"step": step, **{k: (v / count).item() for k, v in sums.items()},
                      "lr": optimizer.param_groups[-1]["lr"], "elapsed": time.perf_counter() - t0}
            if not math.isfinite(record["loss"]):
                raise UserError(f"{desc} loss became {record['loss']} at step {step}; lower train.lr")
            metrics.log(record)
            records.append(record)
            progress.update(step - progress.done, " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                              if k not in ("step", "elapsed")))
            sums, count = {}, 0
    progress.close()
    model.eval()
    return records


def save_result(model: torch.nn.Module, source_checkpoint: str | Path, out: Path, records: list[dict[str, Any]],
                extra: dict[str, Any]) -> Path:
    """Save the tuned model as out/checkpoint (tokenizer and preset from the source) and a summary."""
    _, raw = read_model_config(source_checkpoint)
    ckpt = save_checkpoint(out / "checkpoint", model, Path(source_checkpoint) / "tokenizer.json", raw.get("preset", ""))
    summary = {"checkpoint": str(ckpt), "source": str(source_checkpoint), "final": records[-1] if records else None,
               **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return ckpt
