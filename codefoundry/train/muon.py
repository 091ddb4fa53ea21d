"""Muon whose orthogonalisation is split across data-parallel ranks.

``torch.optim.Muon`` runs the Newton-Schulz orthogonalisation of every matrix on every rank.
Under DDP all ranks hold the same (all-reduced) gradients, so that work is repeated W
times. Here rank r orthogonalises matrices r, r+W, r+2W, ... and broadcasts each result from
its owner, so each rank does 1/W of the work; every rank then applies the same updates.
The arithmetic is torch's own (its Newton-Schulz and learning-rate adjustment), so one
process gives exactly ``torch.optim.Muon``'s result and W ranks give the same numbers.

``skip`` (a 0-d bool device tensor from the NaN guard) leaves parameters and momentum
untouched without a host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


class DistributedMuon(torch.optim.Muon):
    def __init__(self, params, world_size: int = 1, rank: int = 0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.world_size, self.rank = world_size, rank

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("DistributedMuon does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates: list[torch.Tensor] = []
            pending = []
            for i, p in enumerate(params):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                grad = p.grad if skip is None else torch.where(skip, 0.0, p.grad)
                new_buf = buf.lerp(grad, 1 - group["momentum"])
                buf.copy_(new_buf if skip is None else torch.where(skip, buf, new_buf))
                owner = i % self.world_size
                if owner == self.rank:
                    update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                    update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                         group["eps"]).contiguous()  # tall ones come transposed
                else:
                    update = torch.empty(p.shape, dtype=torch.bfloat16, device=p.device)
                if self.world_size > 1:
                    pending.append(dist.broadcast(update, src=owner, async_op=True))
                updates.append(update)
            for work in pending:
                work.wait()
            lr, wd = group["lr"], group["weight_decay"]
            for p, update in zip(params, updates):
                new = p.mul(1 - lr * wd).add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
                p.copy_(new if skip is None else torch.where(skip, p, new))
