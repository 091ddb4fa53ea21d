"""Settings of a fine-tuning run (SFT, DPO), resolved like every other run.

The base is the source checkpoint's model config and preset with the stage's train
defaults; ``train.field=value`` overrides go on top through :mod:`codefoundry.recipes`, and
``--out`` always wins. The model section is the checkpoint's own, so it is not overridable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from codefoundry.checkpoint import read_model_config
from codefoundry.config import RunConfig, TrainConfig, update_dataclass
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config, parse_overrides


def finetune_config(checkpoint: str | Path, defaults: dict[str, Any], overrides: list[str],
                    out: str | Path) -> RunConfig:
    """The RunConfig of fine-tuning ``checkpoint`` with a stage's ``defaults`` and ``overrides``, writing to ``out``."""
    unknown = set(parse_overrides(overrides)) - {"train"}
    if unknown:
        raise UserError(f"only train.* overrides apply here (the model is the checkpoint's), got {sorted(unknown)}")
    cfg, raw = read_model_config(checkpoint)
    base = {"preset": raw.get("preset", ""), "model": dataclasses.asdict(cfg),
            "train": dataclasses.asdict(update_dataclass(TrainConfig(), defaults, "train."))}
    run = build_run_config(None, None, overrides, base=base)
    return dataclasses.replace(run, train=dataclasses.replace(run.train, out=str(out)))
