"""The pretokenized shard format: ``tokens.bin`` + ``index.npy`` + ``metadata.json``.

``tokens.bin`` is the flat token stream (uint16 when the vocabulary fits, else uint32);
``index.npy`` holds one (offset, length) row per document. Every document starts with the
end-of-text/BOS token, so the stream packs into training rows without extra bookkeeping.
Files are written under temporary names and renamed, so a killed run never leaves a
half-written shard that looks finished. Shards may be written to (and parts read from) any
fsspec URL; training reads local shards through ``np.memmap``.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.io import DataFolder, get_datafolder

from codefoundry.errors import UserError


def as_folder(path: str | Path | DataFolder) -> DataFolder:
    """A datatrove ``DataFolder`` (fsspec) for a local path or any fsspec URL."""
    return get_datafolder(str(path) if isinstance(path, Path) else path)


COPY_TOKENS = 1 << 22  # tokens per write when copying a shard (8 MiB of uint16)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append tokenized documents; ``close`` writes the three files atomically.

    ``tokens_file``: a local file that already holds the whole token stream (written in parallel,
    see :class:`codefoundry.data.packing.CopyPartTokens`): it becomes ``tokens.bin`` by a hard link,
    and ``add_shard`` only records the documents."""

    def __init__(self, out_dir: str | Path | DataFolder, vocab_size: int, tokens_file: str | None = None) -> None:
        self.folder = as_folder(out_dir)
        self.folder.makedirs("", exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.tokens_file = tokens_file
        self._f = None if tokens_file else self.folder.open("tokens.bin.tmp", "wb")
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.n_tokens = 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        if self._f is None:
            raise ValueError("this shard's tokens were written beforehand: only whole shards can be added")
        arr = np.asarray(ids, dtype=self.dtype)
        self._f.write(arr.tobytes())
        self.offsets.append(self.n_tokens)
        self.lengths.append(len(arr))
        self.n_tokens += len(arr)

    def add_shard(self, shard: "Shard") -> None:
        """Append every document of another shard of the same dtype, copying its token file in
        chunks: memory stays flat however large the shard (no memory map, no whole-file copy)."""
        if np.dtype(shard.meta["dtype"]) != self.dtype:
            raise ValueError(f"cannot append {shard.meta['dtype']} tokens to a {self.dtype} shard")
        if shard.meta["tokens"] and self._f is not None:
            with shard.folder.open("tokens.bin", "rb") as f:
                shutil.copyfileobj(f, self._f, COPY_TOKENS * self.dtype.itemsize)
        lengths = shard.index[:, 1].astype(np.int64)
        self.offsets.extend((self.n_tokens + np.cumsum(lengths) - lengths).tolist())
        self.lengths.extend(lengths.tolist())
        self.n_tokens += int(lengths.sum())

    def close(self, metadata: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.close()
        else:
            self._link_tokens()
        index = np.stack([np.asarray(self.offsets, dtype=np.int64), np.asarray(self.lengths, dtype=np.int64)], axis=1) \
            if self.offsets else np.zeros((0, 2), dtype=np.int64)
        with self.folder.open("index.npy.tmp", "wb") as f:
            np.save(f, index)
        meta = {"dtype": self.dtype.name, "documents": len(self.offsets), "tokens": self.n_tokens, **metadata}
        with self.folder.open("metadata.json.tmp", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        for name in ("tokens.bin", "index.npy", "metadata.json"):  # metadata last: its presence means "complete"
            self.folder.mv(f"{name}.tmp", name)


    def _link_tokens(self) -> None:
        """``tokens.bin.tmp`` as a hard link to the prewritten stream (a copy where the filesystem has
        no hard links), after checking its length; a rerun links the same file again."""
        tmp = self.folder.resolve_paths("tokens.bin.tmp")
        if os.path.lexists(tmp):
            os.remove(tmp)
        if not os.path.exists(self.tokens_file) and not self.n_tokens:
            open(self.tokens_file, "ab").close()  # no task had tokens to write
        size, expected = os.path.getsize(self.tokens_file), self.n_tokens * self.dtype.itemsize
        if size != expected:
            raise UserError(f"{self.tokens_file} holds {size} bytes of tokens, the parts {expected}: remove "
                            "the output's .work folder and run the same command again")
        try:
            os.link(self.tokens_file, tmp)
        except OSError:  # a filesystem without hard links (FAT, some network shares): copy
            shutil.copyfile(self.tokens_file, tmp)


class Shard:
    """Read-only view of one shard directory (memory-mapped when local, read whole when remote)."""

    def __init__(self, path: str | Path | DataFolder) -> None:
        self.folder = as_folder(path)
        if not self.folder.isfile("metadata.json"):
            raise UserError(f"{self.folder.path} is not a finished shard (no metadata.json); "
                            "run `codefoundry data prepare`")
        with self.folder.open("metadata.json", "r") as f:
            self.meta = json.load(f)
        self.index = self.load("index.npy")

    @cached_property
    def tokens(self) -> np.ndarray:
        """The token stream: memory-mapped when local, read on first use when remote."""
        n, dtype = self.meta["tokens"], np.dtype(self.meta["dtype"])
        if not n:
            return np.zeros(0, dtype=dtype)
        if self.folder.is_local():
            return np.memmap(self.folder.resolve_paths("tokens.bin"), dtype=dtype, mode="r", shape=(n,))
        with self.folder.open("tokens.bin", "rb") as f:
            return np.frombuffer(f.read(), dtype=dtype, count=n)

    def load(self, name: str) -> np.ndarray:
        """A ``.npy`` file of this shard (the index, or a part's ``docs.npy``)."""
        with self.folder.open(name, "rb") as f:
            return np.load(f)

    def __len__(self) -> int:
        return len(self.index)

    def document(self, i: int) -> np.ndarray:
        off, length = self.index[i]
        return np.asarray(self.tokens[off:off + length])
