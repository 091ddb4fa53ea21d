"""A training run's checkpoints: rotation, the best one, and where to resume.

The files of one checkpoint are read and written by :mod:`codefoundry.checkpoint`. A training run keeps its checkpoints with :class:`CheckpointManager`::

    OUT/checkpoints/step_00000100/   one directory per save (the last ``keep_last`` kept)
    OUT/checkpoint -> checkpoints/step_...        the latest (what eval, generate, resume read)
    OUT/checkpoint-best -> checkpoints/step_...   the lowest validation loss so far (or the highest
                                                  ``train.keep_best_metric`` score, e.g. humaneval_pass@1)

Sharded (FSDP) runs add ``dcp/`` (torch.distributed.checkpoint: each rank's weights and
optimizer shard) and still write a full ``model.safetensors`` for everything downstream.

Every save ends with ``manifest.json``: the size and SHA-256 of each file in it. Resuming
checks them and skips a checkpoint with a truncated, emptied, missing or altered file,
naming it, for the next older one. Everything is written under the run's own ``out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from codefoundry.checkpoint import load_train_state, model_from_weights, replace_dir, unwrap, write_checkpoint_files
from codefoundry.errors import UserError
from codefoundry.train import distributed as D
from codefoundry.train.distributed import DistInfo


class CheckpointManager:
    """Save every N steps, keep the last K and the best by validation loss, find the latest valid one.

    Every save is a new ``checkpoints/step_N`` directory that appears only by an atomic
    rename once complete, so a process killed mid-save leaves at most a hidden temp
    directory behind (removed by the next save) and every visible step directory is whole.
    All ranks call :meth:`save`; rank 0 writes the files, every rank writes its DCP shard.
    """

    def __init__(self, out: str | Path, keep_last: int = 2, keep_best: bool = True,
                 info: DistInfo | None = None, best_metric: str = "val_loss") -> None:
        self.out = Path(out)
        self.dir = self.out / "checkpoints"
        self.latest_link = self.out / "checkpoint"
        self.best_link = self.out / "checkpoint-best"
        self.keep_last, self.keep_best = keep_last, keep_best
        self.info = info or DistInfo()
        meta = self.best_link / "meta.json"
        # "val_loss" is best when lowest; a score (e.g. humaneval_pass@1, saved in meta.json) when highest.
        self.best_metric, self.higher_is_better = best_metric, best_metric != "val_loss"
        self.best_val: float | None = json.loads(meta.read_text()).get(best_metric) if meta.is_file() else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(path.name.split("_")[1])

    def saved(self) -> list[Path]:
        """Complete step directories, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.glob("step_*") if p.is_dir() and (p / "train_state.pt").is_file()),
                      key=self.step_of)

    def find_resume(self, resume: bool | str, report: bool = True) -> tuple[Path, dict[str, Any]] | None:
        """(checkpoint dir, train state) to continue from, or None to start fresh.

        ``resume`` is False (fresh), True/"auto" (the newest checkpoint whose state loads;
        none yet means a fresh start, so one command serves first launch and restarts), or
        a checkpoint directory. Checkpoints with a file that fails its manifest check or a state
        that does not load are skipped, each with one line (``report``); if none loads, the last
        error is raised rather than silently starting over.
        """
        if not resume:
            return None
        if resume not in (True, "auto"):
            path = Path(resume)
            verify_manifest(path)
            return path, load_train_state(path)
        candidates = list(reversed(self.saved()))
        if not candidates and (self.latest_link / "train_state.pt").is_file():
            candidates = [self.latest_link]  # a run written before the manager existed
        error: UserError | None = None
        for path in candidates:
            try:
                verify_manifest(path)
                return path, load_train_state(path)
            except UserError as exc:
                error = exc
                if report and self.info.is_main:
                    print(f"resume: skipping {path}: {exc}", flush=True)
        if error is not None:
            raise error
        return None

    def save(self, step: int, model: torch.nn.Module, tokenizer_json: str | Path, preset: str,
             train_state: dict[str, Any], val_loss: float | None = None,
             optimizers: list[torch.optim.Optimizer] | None = None, scores: dict[str, float] | None = None) -> Path:
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".{final.name}.tmp"
        if self.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        D.barrier(self.info)
        weights = D.full_state_dict(model, self.info) if self.info.sharded else None
        if self.info.sharded:
            D.save_sharded(tmp / "dcp", model, optimizers or [])
        if self.info.is_main:
            plain = model_from_weights(unwrap(model).cfg, weights) if weights is not None else model
            write_checkpoint_files(tmp, plain, tokenizer_json, preset, {**train_state, "sharded": self.info.sharded})
            measured = {"val_loss": val_loss, **(scores or {})}
            (tmp / "meta.json").write_text(json.dumps({"step": step, **measured}) + "\n")
            write_manifest(tmp)
            replace_dir(tmp, final)
            _point(self.latest_link, final)
            value = measured.get(self.best_metric)
            if self.keep_best and value is not None and (
                    self.best_val is None or (value > self.best_val if self.higher_is_better else value < self.best_val)):
                self.best_val = value
                _point(self.best_link, final)
            self._prune(step)
        D.barrier(self.info)
        return final

    def _prune(self, step: int) -> None:
        """Drop all but the last ``keep_last`` saves (and the best); saves past ``step`` belong to
        a run this one resumed from an earlier point, so they go too. Leftover temp dirs go."""
        best = self.best_link.resolve() if self.best_link.is_symlink() else None
        saved = [p for p in self.saved() if self.step_of(p) <= step]
        keep = set(saved[-self.keep_last:] if self.keep_last > 0 else saved)
        for p in self.dir.iterdir():
            if p.resolve() == best or p in keep:
                continue
            if p.name.startswith(".step_") or p.name.startswith("step_"):
                shutil.rmtree(p)


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """Record the size and SHA-256 of every file under checkpoint directory ``path``."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_manifest(path: Path) -> None:
    """Raise a one-line UserError naming the first file of checkpoint ``path`` that is missing,
    truncated or altered since it was saved. Checkpoints saved before manifests existed only
    need a non-empty ``model.safetensors``."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        weights = path / "model.safetensors"
        if not weights.is_file() or weights.stat().st_size == 0:
            raise UserError(f"checkpoint {path}: model.safetensors is missing or empty")
        return
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    for name, expect in files.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != expect["size"]:
            raise UserError(f"checkpoint {path}: {name} is corrupt: {size} bytes where {expect['size']} were saved")
        if _sha256(f) != expect["sha256"]:
            raise UserError(f"checkpoint {path}: {name} is corrupt: its SHA-256 differs from the one saved")


def _point(link: Path, target: Path) -> None:
    """Atomically make ``link`` a relative symlink to ``target`` (replacing a legacy directory)."""
    tmp = link.with_name(f".{link.name}.link-tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)
