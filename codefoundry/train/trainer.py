"""Pretraining: a fresh model, next-token loss, packed rows from prepared shards or a stream, on the one engine.

:func:`pretrain` takes a resolved :class:`RunConfig` and trains: fixed ``max_steps``,
``epochs`` passes over the train shard (sized from its rows once the world size is known), or a
wall-clock budget (``minutes``) converted into a step count after a few calibration steps
so the schedule and any resume stay exact. With ``data.stream=true`` the rows come straight
from ``data.sources`` (:class:`~codefoundry.data.stream.StreamLoader`, its position saved in
every checkpoint) and ``train.data`` only needs the tokenizer (``tokenizer.json``; a ``val/``
shard there still gives validation). Launched by ``torchrun`` it trains with DDP or
FSDP2 (``train.parallel``); every rank runs this same function on its slice of each global
batch, and only rank 0 logs. The loop itself is :mod:`codefoundry.train.engine`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from codefoundry.config import RunConfig, TrainConfig, parse_curriculum
from codefoundry.data.loader import PackedLoader
from codefoundry.data.shards import Shard
from codefoundry.data.stream import StreamLoader
from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.train.code_eval import CodeScorer
from codefoundry.train.engine import Runtime, Stage, train
from codefoundry.train.objective import Forward, NextTokenLoss
from codefoundry.train.schedule import curriculum_seq_len


class ShardBatches:
    """The pretraining batch source: packed rows of this rank, shorter rows while a curriculum says so."""

    def __init__(self, loader: PackedLoader | StreamLoader, stages: list[tuple[int, int]]) -> None:
        self.loader, self.stages = loader, stages

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader.next_batch(curriculum_seq_len(step, self.stages, self.loader.seq_len))

    @property
    def epoch(self) -> int:
        """Completed passes over the data (kept in the loader's state, so in every checkpoint); logged."""
        return self.loader.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def evaluate_loss(forward: Forward, shard_dir: Path, batch_size: int, seq_len: int, batches: int,
                  device: torch.device) -> float:
    """Mean loss over the first ``batches`` batches of a fixed (seed 0) order of the shard.

    The caller puts the model in eval mode under no_grad (see ``Trainer.evaluate``).
    """
    loader = PackedLoader(shard_dir, batch_size, seq_len, seed=0, device=device)
    total = torch.zeros((), device=device)
    n = min(batches, max(1, loader.n_rows // batch_size))
    for _ in range(n):
        total += forward(*loader.next_batch()).float()
    return (total / n).item()


def _usable(shard_dir: Path, tokens: int) -> bool:
    """A validation shard holding more than ``tokens`` tokens."""
    return (shard_dir / "metadata.json").is_file() and Shard(shard_dir).meta["tokens"] > tokens


def _check_data(data: Path, stream: bool) -> None:
    if stream and not (data / "tokenizer.json").is_file():
        raise UserError(f"data.stream=true reads its tokenizer from train.data={data}/tokenizer.json, which is missing; "
                        "point train.data at a directory holding the tokenizer (`codefoundry tokenizer train`)")
    if not stream and (not (data / "tokenizer.json").is_file() or not (data / "train" / "metadata.json").is_file()):
        raise UserError(f"train.data={data} is not a prepared data directory; run `codefoundry data prepare` first")


def epoch_steps(tc: TrainConfig, n_rows: int, world_size: int) -> int:
    """Optimizer steps in ``train.epochs`` passes over ``n_rows`` packed rows: an epoch is the
    global batches that fit (the loader starts the next epoch on a batch that would not), and a
    step takes ``grad_accum`` of them."""
    batches = n_rows // (tc.batch_size * world_size)
    return max(1, math.ceil(tc.epochs * batches / tc.grad_accum))


def pretrain(run: RunConfig, resume: bool | str = False, stop_after: int | None = None,
             show_progress: bool = True, scorer: CodeScorer | None = None) -> dict[str, Any]:
    """Train ``run`` from scratch (or resume it) and return a summary (also OUT/summary.json).
    ``scorer`` scores the code benchmarks ``train.humaneval_every`` / ``mbpp_every`` ask for."""
    tc = run.train
    data = Path(tc.data)
    stream = run.data.stream
    if stream and tc.epochs and not tc.max_steps:
        raise UserError("train.epochs needs prepared shards (a stream's length is unknown); set train.max_steps")
    _check_data(data, stream)
    vocab = CodeTokenizer.from_file(data / "tokenizer.json").vocab_size if stream else Shard(data / "train").meta["vocab_size"]
    mcfg = dataclasses.replace(run.model, vocab_size=vocab)  # rounded up to model.vocab_multiple
    if tc.seq_len > mcfg.max_seq_len:
        raise UserError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; raise model.max_seq_len")
    stages = parse_curriculum(tc.curriculum, tc.seq_len)
    resized = mcfg.vocab_size != run.model.vocab_size
    note = f"model.vocab_size {run.model.vocab_size} -> {mcfg.vocab_size}: the data's tokenizer has {vocab} tokens"
    run = dataclasses.replace(run, model=mcfg)
    val_dir = data / "val"
    has_val = _usable(val_dir, tc.seq_len + 1)
    # Per-domain held-out shards (`data prepare --val-by`): val_by_<language|source>/<domain>/, each
    # logged as val_loss/<domain>; one too small for a batch is named and left out.
    found = sorted(d for d in data.glob(f"val_by_{run.data.val_by or '*'}/*") if (d / "metadata.json").is_file())
    domains = {f"val_loss/{d.name}": d for d in found if _usable(d, tc.batch_size * tc.seq_len + 1)}
    small = [d.name for d in found if f"val_loss/{d.name}" not in domains]

    def make_stage(rt: Runtime) -> Stage:
        if resized and rt.info.is_main:
            print(note, flush=True)
        if small and rt.info.is_main:
            print(f"validation by domain: {len(small)} shard(s) too small for one batch, left out: "
                  f"{', '.join(small)}", flush=True)
        model = Transformer(mcfg).to(rt.device)
        if stream:
            loader: PackedLoader | StreamLoader = StreamLoader.from_run(run, data / "tokenizer.json", rt.info.rank,
                                                                        rt.info.world_size, rt.device)
        else:
            loader = PackedLoader(data / "train", tc.batch_size, tc.seq_len, tc.seed, rt.info.rank,
                                  rt.info.world_size, rt.device)
        stage_run = run
        if tc.epochs and not tc.max_steps:
            steps = epoch_steps(tc, loader.n_rows, rt.info.world_size)
            stage_run = dataclasses.replace(run, train=dataclasses.replace(tc, max_steps=steps))
            if rt.info.is_main:
                print(f"train.epochs={tc.epochs:g}: {steps} steps over {loader.n_rows} rows", flush=True)

        def validate(forward: Forward) -> dict[str, float]:
            shards = {"val_loss": val_dir, **domains}
            return {name: evaluate_loss(forward, d, tc.batch_size, tc.seq_len, tc.eval_batches, rt.device)
                    for name, d in shards.items()}

        return Stage("pretrain", stage_run, model, NextTokenLoss(masked=False), ShardBatches(loader, stages), data / "tokenizer.json",
                     validate if has_val else None)

    return train(run, make_stage, resume, stop_after, show_progress, scorer)
