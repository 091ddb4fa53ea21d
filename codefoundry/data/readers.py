"""Readers: every kind of source becomes a stream of datatrove ``Document``s.

A source is a folder or a file, local or at an fsspec URL (``file://``, ``s3://``, ``hf://``,
``memory://``...), or ``hf:NAME`` (HF ``datasets`` streaming, needs network). A folder may mix
code files (language from the extension), JSONL / JSONL.gz / JSONL.zst and Parquet files: every
one of them is read. Rows may use the column layouts of The Stack v1/v2, StarCoderData and
CodeParrot; :func:`code_adapter` maps them all to one document shape::

    Document(text, id, metadata={"language", "path", "source"})

Bad input never stops a run: corrupt JSON lines, truncated or corrupt compressed files (the rows
before the damage are kept), undecodable, binary, oversized or non-regular files, symlinks
leaving the source tree, unreadable Parquet files, and rows or files without a text column are
skipped and counted in a :class:`DropLedger`. Files are sharded over datatrove ranks, so the
same reader serves a laptop and a cluster.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl

import zstandard
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from fsspec.core import url_to_fs

from codefoundry.data.ledger import DropLedger
from codefoundry.data.sources import (MAX_FILE_BYTES, FolderEntry, decode_text, kind_of, language_of,
                                      normalize_language, read_bytes, scan_folder)
from codefoundry.errors import UserError

TEXT_KEYS = ("content", "text", "code")
LANGUAGE_KEYS = ("lang", "language")
PATH_KEYS = ("path", "max_stars_repo_path", "file_path")
REPO_KEYS = ("repo_name", "repository_name", "max_stars_repo_name")
ID_KEYS = ("id", "blob_id", "hexsha")
# What a damaged file raises while it is streamed: gzip's EOFError / BadGzipFile (an OSError),
# zstandard's ZstdError, pyarrow's ArrowInvalid (a ValueError) and ArrowIOError (an OSError).
READ_ERRORS = (EOFError, OSError, ValueError, zstandard.ZstdError)


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source`` argument: a path (or ``hf:NAME``) and its mixing weight."""

    location: str
    weight: float = 1.0

    @classmethod
    def parse(cls, arg: str) -> "SourceSpec":
        """``PATH`` or ``PATH=WEIGHT`` (weight 0.5 keeps half the documents, 2 repeats each twice)."""
        location, _, weight = arg.rpartition("=")
        if location and _is_number(weight):
            if float(weight) < 0:
                raise UserError(f"source weight must be >= 0, got {arg!r}")
            return cls(location, float(weight))
        return cls(arg)

    @property
    def name(self) -> str:
        """A short name used in ids, metadata, weights and the per-source validation sets: the
        last path component (``hf:bigcode/the-stack-smol`` -> ``the-stack-smol``)."""
        return self.location.removeprefix("hf:").split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "source"


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _first(data: dict, keys: tuple[str, ...], kind: type | tuple[type, ...] = str) -> Any:
    """The first of ``keys`` whose value has the expected type: a dataset whose ``path`` column
    holds numbers (or a list) loses only that field, not the row."""
    for k in keys:
        if isinstance(data.get(k), kind) and data[k] != "":
            return data[k]
    return None


def code_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """datatrove adapter for code datasets (bound to the reader: ``self`` has ``ledger`` and ``source``)."""
    text = _first(data, TEXT_KEYS)
    where = f"{path}:{id_in_file}"
    if text is None and any(isinstance(data.get(k), str) for k in TEXT_KEYS):
        text = ""  # an empty text column: counted as empty below
    if text is None:
        self.ledger.add("missing_text_column", where, 0, self.rank)
        return {"text": "", "id": where}
    file_path = _first(data, PATH_KEYS) or ""
    repo = _first(data, REPO_KEYS)
    lang = _first(data, LANGUAGE_KEYS)
    language = normalize_language(lang) if isinstance(lang, str) else (language_of(file_path, include_markup=True) or "unknown")
    doc_id = _first(data, ID_KEYS, (str, int)) or (f"{repo}/{file_path}" if repo and file_path else where)
    if len(text) > self.max_bytes // 4 and len(text.encode()) > self.max_bytes:
        self.ledger.add("too_large", where, len(text.encode()), self.rank)
        return {"text": "", "id": where}
    if not text.strip():
        self.ledger.add("empty", where, len(text.encode()), self.rank)
    return {"text": text, "id": f"{self.source}/{doc_id}",
            "metadata": {"language": language, "path": f"{repo}/{file_path}" if repo else (file_path or where),
                         "source": self.source}}


class _LedgerMixin:
    """Gives a reader its skip ledger and the current rank (the adapter needs both)."""

    ledger: DropLedger
    source: str
    rank: int = 0
    max_bytes: int = MAX_FILE_BYTES

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.rank = rank
        with self.ledger:
            yield from super().run(data, rank, world_size)


class CodeJsonlReader(_LedgerMixin, JsonlReader):
    """JSONL(.gz/.zst) rows; a line that is not valid JSON (or not UTF-8) is counted and skipped,
    and a truncated or corrupt file keeps the rows read before the damage and is counted once.
    A file whose first line cannot start a JSON object row (a lone ``{``, or no ``{``) is not JSON
    Lines: it is skipped whole, counted once."""

    name = "code jsonl"

    def _lines(self, filepath: str) -> Iterator[tuple[int, str]]:
        # Text mode (zstd streams cannot iterate lines in binary mode); undecodable bytes become
        # surrogates, which orjson rejects, so such a line is counted like any corrupt one.
        try:
            with self.data_folder.open(filepath, "r", compression=self.compression, errors="surrogateescape") as f:
                yield from enumerate(f)
        except READ_ERRORS as exc:
            self.ledger.add("truncated_or_corrupt_file", f"{filepath}: {type(exc).__name__}", 0, self.rank)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        first = True
        for li, line in self._lines(filepath):
            stripped = line.strip()
            if not stripped:
                continue
            if first and (stripped in ("{", "[") or not stripped.startswith("{")):
                # e.g. a pretty-printed `.json.gz` (botocore ships hundreds): one count, not one per line
                self.ledger.add("not_json_lines", filepath, 0, self.rank)
                return
            first = False
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                self.ledger.add("corrupt_json", f"{filepath}:{li}", len(line.encode(errors="surrogateescape")),
                                self.rank)
                continue
            doc = self.get_document_from_dict(row, filepath, li)
            if doc:
                yield doc


class CodeParquetReader(_LedgerMixin, ParquetReader):
    """Parquet row groups. A file pyarrow cannot read is counted and skipped (rows read before the
    damage are kept); a file with no text column is counted with all its rows, unread."""

    name = "code parquet"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        try:
            with self.data_folder.open(filepath, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            if not set(TEXT_KEYS) & set(meta.schema.names):
                self.ledger.add("no_text_column", f"{filepath}: columns {meta.schema.names[:8]}", 0, self.rank,
                                documents=meta.num_rows)
                return
            yield from super().read_file(filepath)
        except READ_ERRORS as exc:
            self.ledger.add("corrupt_parquet", f"{filepath}: {type(exc).__name__}", 0, self.rank)


def local_path(location: str) -> str | None:
    """The local path of a plain path or ``file://`` URL; None for any other fsspec URL."""
    if location.startswith("file://"):
        return location.removeprefix("file://")
    return None if "://" in location else location


class SourceReader(PipelineStep):
    """Every file of one source, sharded over ranks by file: a code file is one document, a
    JSONL or Parquet file one per row. Local folders are walked by :func:`scan_folder` (no depth
    limit, FIFOs never opened, symlinks leaving the tree not followed unless asked); remote ones
    are listed through fsspec. Skipped files are counted in the source's ledger."""

    type = "📖 - READER"
    name = "source"

    def __init__(self, spec: "SourceSpec", ledger: DropLedger, languages: set[str] | None,
                 max_file_bytes: int = MAX_FILE_BYTES, follow_symlinks: bool = False) -> None:
        super().__init__()
        self.location, self.source, self.ledger, self.languages = spec.location, spec.name, ledger, languages
        self.max_bytes, self.follow_symlinks = max_file_bytes, follow_symlinks
        self.local = local_path(spec.location)
        if self.local is not None:
            path = Path(self.local)
            self.root = str(path if path.is_dir() else path.parent)
        else:
            fs, path = url_to_fs(spec.location)
            self.root = spec.location if fs.isdir(path) else spec.location.rstrip("/").rsplit("/", 1)[0]
        common = {"adapter": code_adapter}
        self.readers = {"jsonl": CodeJsonlReader(self.root, **common), "parquet": CodeParquetReader(self.root, **common)}
        for reader in self.readers.values():
            reader.ledger, reader.source, reader.max_bytes = ledger, self.source, max_file_bytes

    def entries(self) -> list[FolderEntry]:
        """Every file of the source in a stable order, skipped ones included (so each is counted once)."""
        if self.local is not None:
            return list(scan_folder(Path(self.local), self.languages, self.follow_symlinks))
        fs, path = url_to_fs(self.location)
        root = url_to_fs(self.root)[1].rstrip("/")
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
        entries = []
        for name, info in sorted(found.items()):
            rel = name[len(root):].lstrip("/")
            kind = kind_of(rel.rsplit("/", 1)[-1], self.languages)
            if kind and info.get("type") == "file":
                too_large = kind[0] == "code" and (info.get("size") or 0) > self.max_bytes
                entries.append(FolderEntry(name, rel, *kind, skip="too_large" if too_large else None))
        return entries

    def _code_document(self, entry: FolderEntry, folder: DataFolder, rank: int) -> Document | None:
        if self.local is not None:
            raw, reason = read_bytes(Path(entry.path), self.max_bytes)
        else:
            with folder.open(entry.relpath, "rb") as f:
                raw, reason = f.read(self.max_bytes + 1), None
        if raw is not None and len(raw) > self.max_bytes:
            raw, reason = None, "too_large"
        text = None
        if raw is not None:
            text, reason = decode_text(raw)
        if reason:
            self.ledger.add(reason, entry.path, len(raw or b""), rank)
            return None
        self.stat_update("documents")
        return Document(text=text, id=f"{self.source}/{entry.relpath}",
                        metadata={"language": entry.language, "path": entry.relpath, "source": self.source})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        folder = DataFolder(self.root)
        with self.ledger:
            for reader in self.readers.values():
                reader.rank = rank
            for entry in self.entries()[rank::world_size]:
                if entry.skip:
                    self.ledger.add(entry.skip, entry.path, 0, rank)
                elif entry.kind == "code":
                    doc = self._code_document(entry, folder, rank)
                    if doc is not None:
                        yield doc
                elif self.local is not None and not stat.S_ISREG(os.stat(entry.path).st_mode):
                    self.ledger.add("not_regular_file", entry.path, 0, rank)  # a FIFO named x.jsonl
                else:
                    yield from self.readers[entry.kind].read_file(entry.relpath)


def build_reader(spec: SourceSpec, ledger_dir: str, languages: set[str] | None,
                 max_file_bytes: int = MAX_FILE_BYTES, follow_symlinks: bool = False) -> PipelineStep:
    """The datatrove reader for one source (a folder, a file or an URL of either; or ``hf:NAME``)."""
    ledger = DropLedger(ledger_dir, f"read-{spec.name}", "unreadable")
    if spec.location.startswith("hf:"):
        return _hf_reader(spec, ledger)
    local = local_path(spec.location)
    if local is not None:
        if not Path(local).exists() and not Path(local).is_symlink():
            raise UserError(f"source {local} does not exist; pass a folder or file of code with --source")
    else:
        fs, path = url_to_fs(spec.location)
        if not fs.exists(path):
            raise UserError(f"source {spec.location} does not exist; pass a folder or file of code with --source")
    return SourceReader(spec, ledger, languages, max_file_bytes, follow_symlinks)


class CodeHFReader(_LedgerMixin, HuggingFaceDatasetReader):
    """HF ``datasets`` streaming by name (``datasets`` is imported only when this reader is built)."""

    name = "code hf"


def _hf_reader(spec: SourceSpec, ledger: DropLedger) -> PipelineStep:
    """``hf:NAME?split=train&data_dir=data/python``: HF datasets streaming (optional dependency)."""
    name, _, query = spec.location[3:].partition("?")
    options = dict(parse_qsl(query))
    options.setdefault("split", "train")
    try:
        reader = CodeHFReader(name, dataset_options=options, streaming=True, adapter=code_adapter)
    except ImportError:
        raise UserError("hf: sources need the `datasets` package: pip install datasets") from None
    reader.ledger, reader.source = ledger, spec.name
    return reader
