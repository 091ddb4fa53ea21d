"""Pre-allocated key/value cache for incremental decoding, with rows that can join and leave.

Columns are storage slots; ``pos`` is the next column every row writes. A row's keys carry
their RoPE rotation from when they were written, so a row may sit anywhere in the columns as
long as its own positions stay consecutive. That lets continuous batching
(:mod:`codefoundry.infer.decode`) move rows (:meth:`KVCache.realign`) and splice in freshly
prefilled ones (:meth:`KVCache.place`) with plain copies: ``row_pos`` then gives each row's
own RoPE position, and ``key_valid`` hides the columns a row does not own.
"""

from __future__ import annotations

import copy

import torch


class KVCache:
    """Keys and values for every layer, shape (layers, B, kv_heads, max_len, head_dim).

    ``pos`` is the number of columns already filled (the same for every row of the batch).
    ``row_pos`` (B,), when set, is each row's own RoPE position for the next token; ``None``
    means every row's position is its column (one prompt, or a left-padded batch).
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
        self.row_pos: torch.Tensor | None = None
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
        if self.row_pos is not None:
            self.row_pos += n

    def truncate(self, pos: int) -> None:
        """Roll back to ``pos`` filled positions (rejected speculative tokens)."""
        self.pos = pos

    # --- rows that join and leave (continuous batching) ------------------------------------------

    def rows(self, n: int) -> KVCache:
        """The first ``n`` rows as a cache sharing this one's storage (write ``pos`` back after use)."""
        view = copy.copy(self)
        view.k, view.v, view.doc_ids = self.k[:, :n], self.v[:, :n], self.doc_ids[:n]
        view.key_valid = None if self.key_valid is None else self.key_valid[:n]
        view.row_pos = None if self.row_pos is None else self.row_pos[:n]
        return view

    def realign(self, starts: list[int], pos: int) -> list[int]:
        """Move each row ``r`` (columns ``starts[r]:self.pos``) to end at column ``pos``; return the new starts."""
        new = []
        for row, start in enumerate(starts):
            n = self.pos - start
            if pos - n != start:
                for t in (self.k, self.v):
                    t[:, row, :, pos - n:pos] = t[:, row, :, start:self.pos].clone()
                self.doc_ids[row, pos - n:pos] = self.doc_ids[row, start:self.pos].clone()
            new.append(pos - n)
        self.pos = pos
        return new

    def place(self, row: int, src: KVCache, src_row: int, src_start: int) -> int:
        """Copy row ``src_row`` of ``src`` (columns ``src_start:src.pos``) into ``row`` so that it ends at
        this cache's ``pos``; return its first column here."""
        n = src.pos - src_start
        start = self.pos - n
        self.k[:, row, :, start:self.pos] = src.k[:, src_row, :, src_start:src.pos]
        self.v[:, row, :, start:self.pos] = src.v[:, src_row, :, src_start:src.pos]
        self.doc_ids[row, start:self.pos] = src.doc_ids[src_row, src_start:src.pos]
        return start

    def move_row(self, dst: int, src: int) -> None:
        """Copy row ``src`` over row ``dst`` (a finished row's slot is refilled by the last one)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.doc_ids[dst] = self.doc_ids[src]
