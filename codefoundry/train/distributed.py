"""Multi-process training through `torchrun`: DDP or FSDP2, sharded checkpoints with DCP.

Launch with ``torchrun --nproc-per-node N -m codefoundry.cli pretrain ...``; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is all this module reads.
Without it everything here is a no-op, so single-process code paths stay unchanged.

- DDP replicates the model and all-reduces gradients (NCCL on GPU, gloo on CPU).
- FSDP2 (``fully_shard`` per block, then the root) shards parameters, gradients and
  optimizer state; its checkpoints go through ``torch.distributed.checkpoint`` (each rank
  writes its shard) plus a gathered ``model.safetensors`` so eval/export read it as usual.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from codefoundry.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"


def init_distributed(mode: str, device_name: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if mode not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel={mode!r}: use ddp or fsdp")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, mode)


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each rank owns the GPU numbered by its LOCAL_RANK."""
    if device.type == "cuda" and info.world_size > 1:
        return torch.device("cuda", info.local_rank)
    return device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP wrapper, or FSDP2 sharding applied in place (per block, then the root)."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def grad_sync(model: nn.Module, info: DistInfo, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if info.mode == "ddp" and not enabled:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a scalar over ranks (gloo has no AVG op, so SUM / world)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def any_across_ranks(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """True on every rank if any rank's flag is true, so all ranks take the same branch."""
    if info.world_size == 1:
        return flag
    flag = flag.to(torch.float32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag > 0


def broadcast_int(value: int, info: DistInfo, device: torch.device) -> int:
    """Rank 0's value everywhere (e.g. the step count a time budget resolves to)."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Unsharded model weights on CPU (collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not info.sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Each rank writes its shard of weights and optimizer state with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise UserError(f"{path.parent} has no sharded state (dcp/); it was not written by an FSDP run: "
                        "resume it with the parallel setting it was trained with")
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
