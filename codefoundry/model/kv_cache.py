"""Pre-allocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer, shape (layers, B, kv_heads, max_len, head_dim).

    ``pos`` is the number of positions already filled (the same for every row of the batch).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        # Optional (B, max_len) bool: False marks left-padding keys that must never be attended.
        self.key_valid: torch.Tensor | None = None
        # (B, max_len) document index of every filled position (document masking only).
        self.doc_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)

    def set_padding(self, lengths: list[int], padded_len: int) -> None:
        """Mark the first ``padded_len - length`` positions of each row as padding (left-padded batch)."""
        valid = torch.ones(len(lengths), self.max_len, dtype=torch.bool, device=self.k.device)
        for row, n in enumerate(lengths):
            valid[row, :padded_len - n] = False
        self.key_valid = valid

    def store_documents(self, docs: torch.Tensor) -> torch.Tensor:
        """Record document ids (B, T) for the positions being added; return the ids of all keys so far."""
        end = self.pos + docs.shape[1]
        self.doc_ids[:, self.pos:end] = docs
        return self.doc_ids[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) at the current position; return all keys/values so far for this layer."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def truncate(self, pos: int) -> None:
        """Roll back to ``pos`` filled positions (rejected speculative tokens)."""
        self.pos = pos
