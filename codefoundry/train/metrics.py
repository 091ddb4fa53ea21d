"""Machine-readable training metrics: one JSON object per line, plus optional dashboards.

JSONL is always written (it is what `codefoundry plot` and reports read). TensorBoard and
Weights & Biases mirror the same records when asked for; both live in the ``logging``
extra and are imported only then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError


class MetricsLog:
    """Append-only JSONL. Reopening for a resumed run drops records past the resume step,
    so a crash after the last checkpoint never leaves duplicated steps in the curve."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True,
                 tensorboard: bool = False, wandb_project: str = "", config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard=true needs tensorboard: pip install 'codefoundry[logging]'") from None
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb_project needs wandb: pip install 'codefoundry[logging]'") from None
            self._wandb = wandb.init(project=wandb_project, name=self.path.parent.name, config=config,
                                     resume="allow" if resume_step is not None else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
