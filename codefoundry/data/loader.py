"""Packed training rows from a shard: shuffled, resumable, rank-sharded.

The token stream is cut into non-overlapping rows of ``seq_len + 1`` tokens; each epoch
visits them in a permutation seeded by (seed, epoch). The whole position is two integers
(epoch, cursor), so resuming is exact and costs nothing. Rank r of W takes the r-th slice
of every global batch, so W processes see exactly the rows one process would.

A sequence-length curriculum asks for shorter rows (``next_batch(seq_len=s)``): each full
row is cut into ``seq_len // s`` pieces, so a short-row batch holds the same tokens as a
full one, the data order does not depend on the curriculum, and resuming stays exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from codefoundry.data.shards import Shard
from codefoundry.errors import UserError


class PackedLoader:
    def __init__(self, shard_dir: str | Path, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> None:
        self.shard = Shard(shard_dir)
        self.tokens = self.shard.tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.n_rows = (len(self.tokens) - 1) // seq_len
        if self.n_rows < batch_size * world_size:
            raise UserError(f"{shard_dir} holds {len(self.tokens)} tokens: too few for one batch of "
                            f"{batch_size * world_size} x {seq_len}; add data or lower train.batch_size/seq_len")
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)

    def next_batch(self, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64 on the loader's device.

        With a shorter ``seq_len`` (which must divide the loader's) the same tokens come as
        (batch_size * k, seq_len) with k = loader seq_len // seq_len.
        """
        piece = seq_len or self.seq_len
        if self.seq_len % piece:
            raise UserError(f"curriculum row length {piece} must divide train.seq_len={self.seq_len}")
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.n_rows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        lo = self.cursor + self.rank * self.batch_size
        rows = self._perm[lo:lo + self.batch_size]
        self.cursor += global_batch
        idx = rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        batch = torch.from_numpy(self.tokens[idx].astype(np.int64))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1].reshape(-1, piece), batch[:, 1:].reshape(-1, piece)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation()
