"""Multi-process training through `torchrun`: DDP or FSDP2, sharded checkpoints with DCP.

Launch with ``torchrun --nproc-per-node N -m codefoundry.cli pretrain ...``; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is all this module reads.
Without it everything here is a no-op, so single-process code paths stay unchanged.

- DDP replicates the model and all-reduces gradients (NCCL on GPU, gloo on CPU). Buffers
  are not re-broadcast every forward: the only trained buffers (MoE expert biases) are
  updated identically on every rank from all-reduced loads, and per-rank load counters
  must stay per-rank.
- FSDP2 (``fully_shard`` per block, then the root) shards parameters, gradients and
  optimizer state; in bf16 it gathers bf16 parameters and reduces gradients in fp32. Its
  checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shard)
  plus a gathered ``model.safetensors`` so eval/export read it as usual.
- Accumulated micro-batches synchronise gradients once, on the last one (DDP ``no_sync``;
  FSDP2 keeps the parameters gathered and the gradients unreduced until then).
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


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """DDP wrapper, or FSDP2 sharding applied in place (per block, then the root).

    FSDP2 reshards each block after its forward (memory) but not the root, whose parameters
    the backward needs at once; with ``dtype`` bf16 it gathers bf16 parameters and reduces
    gradients in fp32 (the master weights and optimizer state stay fp32).
    """
    if info.mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.13 renames the switch (buffers are still synced once at init: they start equal anyway)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync_buffers = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_sync_buffers)
    if info.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
            else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def grad_sync(model: nn.Module, info: DistInfo, last: bool) -> contextlib.AbstractContextManager:
    """Synchronise gradients only on the ``last`` micro-batch of an accumulated step.

    DDP skips the all-reduce (``no_sync``); FSDP2 skips the reduce-scatter and keeps the
    gathered parameters after backward, so the next micro-batch does not gather them again.
    """
    if info.mode == "ddp" and not last:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
    return contextlib.nullcontext()


def sum_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of a tensor over ranks, on the device (no host sync)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


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


def shutdown() -> None:
    """Leave the process group (called where a torchrun command ends); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()
