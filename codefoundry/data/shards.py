"""The pretokenized shard format: ``tokens.bin`` + ``index.npy`` + ``metadata.json``.

``tokens.bin`` is the flat token stream (uint16 when the vocabulary fits, else uint32);
``index.npy`` holds one (offset, length) row per document. Every document starts with the
end-of-text/BOS token, so the stream packs into training rows without extra bookkeeping.
Files are written under temporary names and renamed, so a killed run never leaves a
half-written shard that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from codefoundry.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append tokenized documents; ``close`` writes the three files atomically."""

    def __init__(self, out_dir: str | Path, vocab_size: int) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self._tmp_tokens = self.dir / "tokens.bin.tmp"
        self._f = open(self._tmp_tokens, "wb")
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.n_tokens = 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._f.write(arr.tobytes())
        self.offsets.append(self.n_tokens)
        self.lengths.append(len(arr))
        self.n_tokens += len(arr)

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: their concatenated tokens and per-document lengths."""
        self._f.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets.extend((self.n_tokens + np.cumsum(lengths) - lengths).tolist())
        self.lengths.extend(lengths.tolist())
        self.n_tokens += int(lengths.sum())

    def close(self, metadata: dict[str, Any]) -> None:
        self._f.close()
        index = np.stack([np.asarray(self.offsets, dtype=np.int64), np.asarray(self.lengths, dtype=np.int64)], axis=1) \
            if self.offsets else np.zeros((0, 2), dtype=np.int64)
        tmp_index = self.dir / "index.npy.tmp"
        with open(tmp_index, "wb") as f:
            np.save(f, index)
        meta = {"dtype": self.dtype.name, "documents": len(self.offsets), "tokens": self.n_tokens, **metadata}
        tmp_meta = self.dir / "metadata.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(self._tmp_tokens, self.dir / "tokens.bin")
        os.replace(tmp_index, self.dir / "index.npy")
        os.replace(tmp_meta, self.dir / "metadata.json")  # last: its presence means "complete"


class Shard:
    """Read-only view of one shard directory."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        meta_path = self.dir / "metadata.json"
        if not meta_path.is_file():
            raise UserError(f"{self.dir} is not a finished shard (no metadata.json); run `codefoundry data prepare`")
        self.meta = json.loads(meta_path.read_text())
        self.index = np.load(self.dir / "index.npy")
        n = self.meta["tokens"]
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=np.dtype(self.meta["dtype"]), mode="r", shape=(n,)) \
            if n else np.zeros(0, dtype=np.dtype(self.meta["dtype"]))

    def __len__(self) -> int:
        return len(self.index)

    def document(self, i: int) -> np.ndarray:
        off, length = self.index[i]
        return np.asarray(self.tokens[off:off + length])
