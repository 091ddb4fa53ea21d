"""Optimizers with parameter groups: AdamW everywhere, or Muon for hidden matrices.

Groups: the embedding (its own learning-rate ratio), hidden 2-D matrices (weight decay),
and everything 1-D (norm gains, biases: no decay). Each param group remembers its
``base_lr`` so the schedule can scale all of them by one factor.

AdamW is the fused kernel (CPU and CUDA): one kernel per step, and it takes the NaN
guard's verdict as a device tensor (``found_inf``, as ``torch.amp.GradScaler`` uses it),
skipping the whole update, moments and step count included, without a host sync.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from codefoundry.config import TrainConfig
from codefoundry.errors import UserError
from codefoundry.train.distributed import DistInfo
from codefoundry.train.muon import DistributedMuon


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = {"embed": [], "matrix": [], "other": []}
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if id(p) in embed_ids or (head is not None and p is head.weight):
            groups["embed"].append(p)
        elif p.dim() >= 2:
            groups["matrix"].append(p)
        else:
            groups["other"].append(p)
    return groups


class Optimizers:
    """One or more torch optimizers stepped together (Muon + AdamW), with one state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self, skip: torch.Tensor | None = None) -> None:
        """One update; ``skip`` (0-d bool device tensor, True: leave everything as it is) is applied on device."""
        for opt in self.optimizers:
            if isinstance(opt, DistributedMuon):
                opt.step(skip=skip)
            elif skip is None:
                opt.step()
            else:
                opt.grad_scale, opt.found_inf = None, skip.float()
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def build_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device,
                    info: DistInfo | None = None) -> Optimizers:
    """AdamW for everything, or Muon (its work split over ``info``'s ranks) for hidden matrices."""
    groups = param_groups(model)
    info = info or DistInfo()
    betas = (tc.beta1, tc.beta2)
    adam_groups = [
        {"params": groups["embed"], "lr": tc.lr * tc.embed_lr_ratio, "weight_decay": 0.0},
        {"params": groups["other"], "lr": tc.lr, "weight_decay": 0.0},
    ]
    if tc.optimizer == "adamw":
        adam_groups.append({"params": groups["matrix"], "lr": tc.lr, "weight_decay": tc.weight_decay})
        opts: list[torch.optim.Optimizer] = []
    elif tc.optimizer == "muon":
        if device.type == "cpu":
            # torch.optim.Muon orthogonalizes in bf16, which CPUs without native bf16 only emulate:
            # measured 2.5x slower per step than AdamW for speedrun-cpu on an AVX2 machine.
            warnings.warn("train.optimizer=muon on CPU: its bf16 Newton-Schulz step is slow on CPUs without "
                          "native bf16; adamw is usually faster here", stacklevel=2)
        muon = DistributedMuon(groups["matrix"], info.world_size, info.rank, lr=tc.muon_lr,
                               weight_decay=tc.weight_decay, adjust_lr_fn="match_rms_adamw")
        opts = [muon]
    else:
        raise UserError(f"train.optimizer={tc.optimizer!r}: use adamw or muon")
    adam_groups = [g for g in adam_groups if g["params"]]
    opts.append(torch.optim.AdamW(adam_groups, betas=betas, fused=True))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return Optimizers(opts)
