import pytest
import torch

from codefoundry.data.loader import PackedLoader
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp("syn"))


def test_short_rows_hold_the_same_tokens_in_the_same_order(data):
    full, short = PackedLoader(data / "train", 4, 64, seed=3), PackedLoader(data / "train", 4, 64, seed=3)
    for _ in range(3):
        x, y = full.next_batch()
        xs, ys = short.next_batch(16)
        assert xs.shape == (16, 16)
        assert torch.equal(xs.reshape(4, 64), x) and torch.equal(ys.reshape(4, 64), y)
        assert torch.equal(xs[:, 1:], ys[:, :-1])  # targets are the next tokens within each short row
    assert full.state_dict() == short.state_dict()
    with pytest.raises(UserError, match="divide"):
        short.next_batch(24)


def test_curriculum_grows_rows_at_constant_tokens_per_step(data, tmp_path):
    run = build_run_config("tiny", None, [f"train.data={data}", f"train.out={tmp_path}", "train.max_steps=8",
                                          "train.seq_len=64", "train.batch_size=4", "train.log_every=1",
                                          "train.curriculum=16:3,32:6"])
    summary = pretrain(run, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["seq_len"] for r in records] == [16, 16, 16, 32, 32, 32, 64, 64]
    assert [r["tokens"] for r in records] == [256 * (i + 1) for i in range(8)]
    assert summary["tokens"] == 8 * 4 * 64
