"""The last pipeline steps: mixing weights, FIM, tokenization, per-rank part shards, and the merge.

Each datatrove rank writes one *part* per split (``parts/{split}/{rank:05d}/``, the shard
format plus ``docs.npy``: a stable key, the original UTF-8 bytes, language and source of every
document). A part is complete once its ``metadata.json`` exists, and datatrove does not rerun
a finished rank, so a killed prepare resumes without redoing or duplicating parts.
:func:`merge_parts` then concatenates parts in rank order into the single shard per split the
loader reads, applying the ``--max-tokens`` budget and building per-domain validation sets; for
a local output the token copy itself runs first, in parallel (:class:`CopyPartTokens`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from datatrove.io import DataFolder
from tokenizers import Tokenizer

from codefoundry.data.fim import doc_rng, fim_split, fim_tokens
from codefoundry.data.shards import COPY_TOKENS, Shard, ShardWriter, as_folder
from codefoundry.tokenizer import CodeTokenizer

COPY_BYTES = COPY_TOKENS * 2  # 8 MiB per read when copying part tokens
DOC_INFO = np.dtype([("key", "<u8"), ("bytes", "<i8"), ("language", "<i4"), ("source", "<i4")])


def doc_key(doc_id: str, copy: int) -> int:
    """A stable 64-bit key per written document: the order in which a token budget keeps documents."""
    return int.from_bytes(hashlib.blake2b(f"{doc_id}#{copy}".encode(), digest_size=8).digest(), "little")


def copies(weight: float, seed: int, doc_id: str) -> int:
    """How many times a document of a source with this mixing weight is written (0.5 -> half of them)."""
    whole = math.floor(weight)
    return whole + (doc_rng(seed, f"weight:{doc_id}").random() < weight - whole)


class PartWriter:
    """One rank's part shard for one split, with the per-document table the merge needs."""

    def __init__(self, folder: DataFolder, vocab_size: int) -> None:
        self.writer = ShardWriter(folder, vocab_size)
        self.info: list[tuple[int, int, int, int]] = []
        self.names: dict[str, dict[str, int]] = {"language": {}, "source": {}}

    def _code(self, kind: str, name: str) -> int:
        return self.names[kind].setdefault(name, len(self.names[kind]))

    def add(self, ids: np.ndarray, key: int, n_bytes: int, language: str, source: str) -> None:
        self.writer.add(ids)
        self.info.append((key, n_bytes, self._code("language", language), self._code("source", source)))

    def close(self, meta: dict[str, Any]) -> None:
        with self.writer.folder.open("docs.npy", "wb") as f:
            np.save(f, np.array(self.info, dtype=DOC_INFO))
        names = {kind: sorted(table, key=table.get) for kind, table in self.names.items()}
        self.writer.close({**meta, "names": names})  # metadata.json last: the part is complete


class TokenizeToParts(PipelineStep):
    """Mixing weights and FIM (train split only), tokenization, and this rank's part shards."""

    type = "💽 - WRITER"
    name = "tokenize + FIM -> part shards"

    def __init__(self, parts_dir: str, tokenizer_json: str, fim_rate: float, seed: int,
                 weights: dict[str, float], batch_docs: int = 128) -> None:
        super().__init__()
        self.parts_dir, self.tokenizer_json = parts_dir, tokenizer_json  # the JSON itself: any executor can run it
        self.fim_rate, self.seed, self.weights, self.batch_docs = fim_rate, seed, weights, batch_docs

    def _rows(self, doc: Document) -> Iterator[tuple[str, int, str, Any]]:
        """(split, key, text, fim split or None) for each copy of the document to write."""
        split = doc.metadata["split"]
        if split != "train":
            yield split, doc_key(doc.id, 0), doc.text, None
            return
        for c in range(copies(self.weights.get(doc.metadata["source"], 1.0), self.seed, doc.id)):
            copy_id = doc.id if c == 0 else f"{doc.id}#{c}"
            yield split, doc_key(doc.id, c), doc.text, fim_split(doc.text, self.fim_rate, self.seed, copy_id)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        """Consumes the stream (a terminal step, like datatrove's own signature writers)."""
        tok = CodeTokenizer(Tokenizer.from_str(self.tokenizer_json))
        parts_dir = as_folder(self.parts_dir)
        parts = {s: PartWriter(as_folder(parts_dir.resolve_paths(f"{s}/{rank:05d}")), tok.vocab_size)
                 for s in ("train", "val")}
        fim_rows: dict[str, int] = defaultdict(int)
        batch: list[tuple[Document, tuple[str, int, str, Any]]] = []

        def flush() -> None:
            pieces = [p for _, (_, _, text, cut) in batch for p in ((text,) if cut is None else
                                                                       (cut.prefix, cut.middle, cut.suffix))]
            encoded = iter(tok.encode_arrays(pieces))
            for doc, (split, key, text, cut) in batch:
                if cut is None:
                    ids = next(encoded)
                else:
                    ids = fim_tokens(tok, cut, (next(encoded), next(encoded), next(encoded)))
                    fim_rows[cut.mode] += 1
                parts[split].add(np.concatenate(([tok.eot_id], ids)), key, len(text.encode()),
                                 doc.metadata["language"], doc.metadata["source"])
                self.stat_update("documents_written")
            batch.clear()

        for doc in data:
            with self.track_time():
                batch.extend((doc, row) for row in self._rows(doc))
                if len(batch) >= self.batch_docs:
                    flush()
        flush()
        for split, part in parts.items():
            part.close({"split": split, "rank": rank, "fim_rows": dict(fim_rows) if split == "train" else {}})


class CopyPartTokens(PipelineStep):
    """The parallel half of the merge, for a local output: task r copies the tokens of its rank's
    part of each split to that part's offset in one file per split (``tokens/{split}.bin`` in the
    work folder), which the merge then hard-links as the shard's ``tokens.bin``. Tasks write
    disjoint ranges, so they run at once, and a rerun writes the same bytes again. The merge
    copied every part itself, alone: ~0.7 s of a 24 s run on 0.38 GB, the most serial work left."""

    type = "💽 - WRITER"
    name = "part tokens -> shard tokens"

    def __init__(self, parts_dir: str, tokens_dir: str, splits: tuple[str, ...]) -> None:
        super().__init__()
        self.parts_dir, self.tokens_dir, self.splits = parts_dir, tokens_dir, splits

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        os.makedirs(self.tokens_dir, exist_ok=True)
        for split in self.splits:
            parts = finished_parts(os.path.join(self.parts_dir, split))
            offset = sum(p.meta["tokens"] * np.dtype(p.meta["dtype"]).itemsize for p in parts if p.meta["rank"] < rank)
            for part in (p for p in parts if p.meta["rank"] == rank and p.meta["tokens"]):
                fd = os.open(os.path.join(self.tokens_dir, f"{split}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    with open(part.folder.resolve_paths("tokens.bin"), "rb") as f:
                        while chunk := f.read(COPY_BYTES):
                            offset += os.pwrite(fd, chunk, offset)
                finally:
                    os.close(fd)


def finished_parts(parts_dir: str | Path | DataFolder) -> list[Shard]:
    """The complete parts of one split (those with a ``metadata.json``), in rank order."""
    folder = as_folder(parts_dir)
    if not folder.isdir(""):
        return []
    names = folder.list_files(glob_pattern="*/metadata.json")
    return [Shard(as_folder(folder.resolve_paths(name.rsplit("/", 1)[0]))) for name in names]


def merge_parts(parts_dir: str | Path | DataFolder, out_dir: str | Path | DataFolder, vocab_size: int,
                metadata: dict[str, Any], max_tokens: int = 0, domain: tuple[str, str] | None = None,
                tokens_file: str | None = None) -> dict[str, Any]:
    """Concatenate the finished parts (rank order) into one shard; returns its metadata.

    ``max_tokens`` keeps the documents with the smallest stable keys until the budget is
    spent: a uniform, reproducible sample. ``domain=("language", "python")`` keeps one domain.
    ``tokens_file``: every part's tokens, already concatenated by :class:`CopyPartTokens`
    (only when every document is kept).
    """
    parts = finished_parts(parts_dir)
    writer = ShardWriter(out_dir, vocab_size, tokens_file)
    infos = [p.load("docs.npy") for p in parts]
    keep = [np.ones(len(i), dtype=bool) for i in infos]
    if domain is not None:
        kind, name = domain
        keep = [k & (info[kind] == (p.meta["names"][kind].index(name) if name in p.meta["names"][kind] else -1))
                for k, info, p in zip(keep, infos, parts)]
    if max_tokens and parts:
        lengths = np.concatenate([p.index[:, 1] for p in parts])
        mask = np.concatenate(keep)
        keys = np.concatenate([i["key"] for i in infos])
        order = np.argsort(keys, kind="stable")
        order = order[mask[order]]
        chosen = order[np.cumsum(lengths[order]) <= max_tokens]
        mask = np.zeros(len(mask), dtype=bool)
        mask[chosen] = True
        keep = np.split(mask, np.cumsum([len(i) for i in infos])[:-1])
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0, "tokens": 0})
    by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0, "tokens": 0})
    fim_rows: dict[str, int] = defaultdict(int)
    for part, info, k in zip(parts, infos, keep):
        for mode, n in part.meta.get("fim_rows", {}).items():
            fim_rows[mode] += n  # counted before any budget cut
        if not k.any():
            continue
        index = part.index[k]
        if k.all():
            writer.add_shard(part)
        else:
            for off, length in index:
                writer.add(part.tokens[off:off + length])
        names = part.meta["names"]
        for (_, n_bytes, lang, src), length in zip(info[k].tolist(), index[:, 1].tolist()):
            for table, name in ((stats, names["language"][lang]), (by_source, names["source"][src])):
                table[name]["documents"] += 1
                table[name]["bytes"] += n_bytes
                table[name]["tokens"] += length
    total_bytes = sum(s["bytes"] for s in stats.values())
    meta = {**metadata, "bytes": total_bytes, "vocab_size": vocab_size, "languages": dict(sorted(stats.items())),
            "by_source": dict(sorted(by_source.items())), "fim_rows": dict(fim_rows)}
    writer.close(meta)
    return {**meta, "documents": len(writer.offsets), "tokens": writer.n_tokens}


def domains_of(parts_dir: str | Path | DataFolder, kind: str) -> list[str]:
    """Every language (or source) present in the parts of one split."""
    return sorted({name for part in finished_parts(parts_dir) for name in part.meta["names"][kind]})
