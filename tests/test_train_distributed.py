"""DDP and FSDP2 on CPU (gloo, 2 ranks) give the losses of one process on the same global batch.

Ranks are spawned from the test process with torchrun's environment variables set, so they
run the same `pretrain` code a torchrun launch does. (Not forked: a child forked from a
process whose OpenMP pool already ran can deadlock, as it did here outside OMP_NUM_THREADS=1.)
"""

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from codefoundry.checkpoint import load_model
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain

STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp("syn"))


def _run(data, out, batch, parallel="ddp"):
    return build_run_config("tiny", None, [f"train.data={data}", f"train.out={out}", f"train.max_steps={STEPS}",
                                           "train.seq_len=64", f"train.batch_size={batch}", "train.log_every=1",
                                           "train.warmup_steps=2", "train.device=cpu", f"train.parallel={parallel}",
                                           "train.save_every=3"])


def _rank(rank, world, port, run, resume=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from codefoundry.train.distributed import shutdown

    pretrain(run, resume=resume, show_progress=False)
    shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    pretrain(_run(data, out, 4), show_progress=False)
    return out, _losses(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(data, single, tmp_path, parallel):
    single_out, single_losses = single
    mp.start_processes(_rank, args=(2, _free_port(), _run(data, tmp_path, 2, parallel)), nprocs=2,
                       start_method="spawn")
    assert _losses(tmp_path) == pytest.approx(single_losses, rel=2e-4)
    model, _ = load_model(tmp_path / "checkpoint")  # gathered full weights, readable by everything downstream
    ref, _ = load_model(single_out / "checkpoint")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
    if parallel == "fsdp":
        assert (tmp_path / "checkpoint" / "dcp" / ".metadata").is_file()

    # resume (sharded state under FSDP) from the step-3 save: the same curve again
    shutil.rmtree(tmp_path / "checkpoints" / f"step_{STEPS:08d}")
    mp.start_processes(_rank, args=(2, _free_port(), _run(data, tmp_path, 2, parallel), "auto"), nprocs=2,
                       start_method="spawn")
    assert _losses(tmp_path) == pytest.approx(single_losses, rel=2e-4)


def _moe_rank(rank, world, port, run, out):
    """Train, then write this rank's view: MoE biases, DDP/FSDP2 settings actually in effect."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from codefoundry.train.distributed import shutdown
    from codefoundry.train.engine import Trainer

    real_fit = Trainer.fit

    def fit(self, stop_after=None):
        summary = real_fit(self, stop_after)
        seen = {"biases": {n: b.clone() for n, b in self.model.named_buffers() if n.endswith("expert_bias")}}
        if run.train.parallel == "ddp":
            seen["broadcast_buffers"] = self.wrapped.broadcast_buffers
        else:
            policy = self.model.blocks[0]._get_fsdp_state()._mp_policy
            seen["policy"] = (policy.param_dtype, policy.reduce_dtype)
        torch.save(seen, out / f"rank{rank}.pt")
        return summary
    Trainer.fit = fit
    pretrain(run, show_progress=False)
    shutdown()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_biases_stay_identical_on_every_rank(data, tmp_path, parallel):
    run = build_run_config("moe-tiny", None, [
        f"train.data={data}", f"train.out={tmp_path}", "train.max_steps=4", "train.seq_len=64", "train.batch_size=2",
        "train.grad_accum=2", "train.warmup_steps=1", "train.device=cpu", f"train.parallel={parallel}",
        "train.dtype=bf16", "model.max_seq_len=64", "model.moe_bias_rate=0.01"])
    mp.start_processes(_moe_rank, args=(2, _free_port(), run, tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["biases"] and any(b.abs().sum() > 0 for b in ranks[0]["biases"].values())
    for name, bias in ranks[0]["biases"].items():
        assert torch.equal(bias, ranks[1]["biases"][name]), name
    if parallel == "ddp":
        assert ranks[0]["broadcast_buffers"] is False  # rank 0 must not overwrite every rank's buffers each forward
    else:
        assert ranks[0]["policy"] == (torch.bfloat16, torch.float32)  # bf16 gathers, fp32 gradient reductions
