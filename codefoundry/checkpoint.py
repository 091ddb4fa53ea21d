"""Checkpoint directories, read and written: the one loader every stage uses.

A checkpoint is a directory::

    model.safetensors   weights (tied weights stored once)
    config.json         {"format": ..., "preset": ..., "model": ModelConfig}
    tokenizer.json      HF tokenizers JSON
    tokenizer_config.json  its chat template / BOS / EOS / FIM order (imported tokenizers only)
    train_state.pt      optimizer, step, data position, RNG, run config (resumable runs only)

It is written to a temporary sibling directory and renamed into place, so a crash mid-save
leaves the previous checkpoint intact. This module sits below every stage: ``train/`` writes
checkpoints through it and ``eval/``, ``infer/``, ``export/`` and ``post/`` read them through
it, so none of them needs the training engine to open a model. Keeping a run's checkpoints
(rotation, best, resume) is the trainer's business: :mod:`codefoundry.train.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from codefoundry.config import ModelConfig, model_config_from_dict
from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.roles import copy_tokenizer

FORMAT = "codefoundry-checkpoint-v1"


def save_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer_json: str | Path, preset: str = "",
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename over the old one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, model, tokenizer_json, preset, train_state)
    replace_dir(tmp, path)
    return path


def write_checkpoint_files(path: Path, model: torch.nn.Module, tokenizer_json: str | Path, preset: str = "",
                           train_state: dict[str, Any] | None = None) -> None:
    """The checkpoint files, into an existing (temporary) directory."""
    st_save_model(unwrap(model), str(path / "model.safetensors"))
    config = {"format": FORMAT, "preset": preset, "model": dataclasses.asdict(unwrap(model).cfg)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tokenizer_json, path)  # tokenizer.json, and tokenizer_config.json (chat template) if any
    if train_state is not None:
        torch.save(train_state, path / "train_state.pt")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``, replacing a directory or link already there."""
    if path.is_symlink():
        path.unlink()
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def unwrap(model: torch.nn.Module) -> Transformer:
    """The plain model under torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model  # type: ignore[return-value]
        model = inner


def model_from_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer holding ``weights`` as they are (no random init, no copy), tied head re-tied:
    for writing gathered FSDP weights or a merged LoRA model."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(weights, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def read_model_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config of a checkpoint and the raw ``config.json`` (format, preset, ...)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} not found; pass the directory a training run wrote (e.g. runs/NAME/checkpoint)")
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
        return model_config_from_dict(raw["model"]), raw
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no config.json; it is incomplete or not a codefoundry checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path}: config.json is corrupt ({exc.__class__.__name__}); use another checkpoint") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, CodeTokenizer]:
    """Model (eval mode) and tokenizer from a checkpoint directory."""
    path = Path(path)
    cfg, _ = read_model_config(path)
    model = Transformer(cfg)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {path} has no model.safetensors; it is incomplete")
    _check_shapes(path, cfg, model, weights)
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {path}: model.safetensors is unreadable or corrupt ({str(exc).splitlines()[0][:120]})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {path}: weights do not match config.json (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    tokenizer = CodeTokenizer.from_file(path / "tokenizer.json")
    return model.to(device).eval(), tokenizer


def _check_shapes(path: Path, cfg: ModelConfig, model: Transformer, weights: Path) -> None:
    """Name the first tensor whose stored shape differs from what config.json builds (an edited
    config, or weights from another model), instead of calling the file corrupt."""
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError):
        return  # unreadable: load_model reports it as corrupt
    for name, tensor in model.state_dict().items():
        if name in stored and stored[name] != list(tensor.shape):
            raise UserError(f"checkpoint {path}: config.json (dim={cfg.dim}, n_layers={cfg.n_layers}, "
                            f"vocab_size={cfg.vocab_size}) needs {name} of shape {list(tensor.shape)} but "
                            f"model.safetensors holds {stored[name]}; restore the config.json saved with these weights")


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resumable training state saved beside the weights."""
    state_path = Path(path) / "train_state.pt"
    if not state_path.is_file():
        raise UserError(f"checkpoint {path} has no train_state.pt, so it cannot be resumed (it may be an export)")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/corrupt pickles
        raise UserError(f"checkpoint {path}: train_state.pt is corrupt ({exc.__class__.__name__}); "
                        "resume from an earlier checkpoint") from None
