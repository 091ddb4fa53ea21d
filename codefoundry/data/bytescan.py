"""Vectorised scans of a document's UTF-8 bytes: runs of a byte class, and hashes of spans.

The filters, decontamination and MinHash each need a document's lines, words or identifiers,
and the Python-level loops over those (``split``, ``findall``, a hash per token) were most of
the data pipeline's time. Here they are a few numpy passes over the bytes instead.
"""

from __future__ import annotations

import numpy as np

HASH_BASE = 0x01000193  # FNV's 32-bit prime: odd, so invertible mod 2^32


def byte_table(members: bytes, value: int = 1, default: int | np.ndarray = 0) -> np.ndarray:
    """A 256-entry lookup table: ``value`` for the bytes in ``members``, else ``default``."""
    table = np.broadcast_to(np.asarray(default, dtype=np.uint8), (256,)).copy()
    table[list(members)] = value
    return table


def as_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def true_runs(mask: np.ndarray, min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in ``mask`` at least ``min_len`` long."""
    edges = np.flatnonzero(np.diff(mask, prepend=False, append=False))
    starts, ends = edges[0::2], edges[1::2]
    if min_len > 1:
        long = ends - starts >= min_len
        starts, ends = starts[long], ends[long]
    return starts, ends


class _Powers:
    """HASH_BASE**i and HASH_BASE**-i mod 2^32, grown on demand."""

    def __init__(self) -> None:
        self.up = self.down = np.ones(0, dtype=np.uint32)

    def __call__(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            m = max(n, 2 * len(self.up), 1 << 16)
            inverse = pow(HASH_BASE, -1, 2**32)
            self.up, self.down = (np.cumprod(np.full(m, base, dtype=np.uint32), dtype=np.uint32)
                                  for base in (HASH_BASE, inverse))
        return self.up[:n], self.down[:n]


_powers = _Powers()


def span_hashes(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """32-bit hash of each byte span ``raw[start:end]``: sum(byte_k * B^(k+1)) mod 2^32.

    Read off one prefix sum of the whole document, so the cost is a few passes over its bytes
    however many spans there are; a span hashes the same wherever it stands (tested).
    """
    up, down = _powers(len(raw) + 1)
    prefix = np.zeros(len(raw) + 1, dtype=np.uint32)
    np.cumsum(raw * up[1:], out=prefix[1:], dtype=np.uint32)
    return (prefix[ends] - prefix[starts]) * down[starts]
