"""Readers: every kind of source becomes a stream of datatrove ``Document``s.

A source is a local folder of code (language from the extension), a JSONL / JSONL.gz /
JSONL.zst file or folder, a Parquet file or folder, or ``hf:NAME`` (HF ``datasets`` streaming,
needs network). Rows may use the column layouts of The Stack v1/v2, StarCoderData and
CodeParrot; :func:`code_adapter` maps them all to one document shape::

    Document(text, id, metadata={"language", "path", "source"})

Bad input never stops a run: corrupt JSON lines, undecodable or binary files, unreadable
Parquet files and rows without a text column are skipped and counted in a :class:`DropLedger`.
Readers shard their input over datatrove ranks, so the same reader serves a laptop and a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader

from codefoundry.data.ledger import DropLedger
from codefoundry.data.sources import decode_text, iter_source_files, language_of, normalize_language
from codefoundry.errors import UserError

TEXT_KEYS = ("content", "text", "code")
LANGUAGE_KEYS = ("lang", "language")
PATH_KEYS = ("path", "max_stars_repo_path", "file_path")
REPO_KEYS = ("repo_name", "repository_name", "max_stars_repo_name")
ID_KEYS = ("id", "blob_id", "hexsha")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


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


def _first(data: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if data.get(k) is not None:
            return data[k]
    return None


def code_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """datatrove adapter for code datasets (bound to the reader: ``self`` has ``ledger`` and ``source``)."""
    text = _first(data, TEXT_KEYS)
    where = f"{path}:{id_in_file}"
    if not isinstance(text, str):
        self.ledger.add("missing_text_column", where, 0, self.rank)
        return {"text": "", "id": where}
    file_path = _first(data, PATH_KEYS) or ""
    repo = _first(data, REPO_KEYS)
    lang = _first(data, LANGUAGE_KEYS)
    language = normalize_language(lang) if isinstance(lang, str) else (language_of(file_path, include_markup=True) or "unknown")
    doc_id = _first(data, ID_KEYS) or (f"{repo}/{file_path}" if repo and file_path else where)
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

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.rank = rank
        with self.ledger:
            yield from super().run(data, rank, world_size)


class CodeJsonlReader(_LedgerMixin, JsonlReader):
    """JSONL(.gz/.zst) rows; a line that is not valid JSON (or not UTF-8) is counted and skipped."""

    name = "code jsonl"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        # Text mode (zstd streams cannot iterate lines in binary mode); undecodable bytes become
        # surrogates, which orjson rejects, so such a line is counted like any corrupt one.
        with self.data_folder.open(filepath, "r", compression=self.compression, errors="surrogateescape") as f:
            for li, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.ledger.add("corrupt_json", f"{filepath}:{li}", len(line.encode(errors="surrogateescape")),
                                    self.rank)
                    continue
                if not isinstance(row, dict):
                    self.ledger.add("corrupt_json", f"{filepath}:{li}", len(line.encode()), self.rank)
                    continue
                doc = self.get_document_from_dict(row, filepath, li)
                if doc:
                    yield doc


class CodeParquetReader(_LedgerMixin, ParquetReader):
    """Parquet row groups; a file pyarrow cannot read is counted and skipped."""

    name = "code parquet"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            yield from super().read_file(filepath)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ... on corrupt files
            self.ledger.add("corrupt_parquet", f"{filepath}: {type(exc).__name__}", 0, self.rank)


class CodeFolderReader(PipelineStep):
    """A folder (or single file) of source files, one document per file, sharded over ranks by file."""

    type = "📖 - READER"
    name = "code folder"

    def __init__(self, root: str | Path, source: str, ledger: DropLedger, languages: set[str] | None) -> None:
        super().__init__()
        self.root, self.source, self.ledger, self.languages = Path(root), source, ledger, languages

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        with self.ledger:
            for sf in list(iter_source_files([self.root], self.languages))[rank::world_size]:
                try:
                    raw = sf.path.read_bytes()
                except OSError:
                    self.ledger.add("unreadable", str(sf.path), 0, rank)
                    continue
                text, reason = decode_text(raw)
                if reason:
                    self.ledger.add(reason, str(sf.path), len(raw), rank)
                    continue
                self.stat_update("documents")
                yield Document(text=text, id=f"{self.source}/{sf.relpath}",
                               metadata={"language": sf.language, "path": sf.relpath, "source": self.source})


def build_reader(spec: SourceSpec, ledger_dir: Path, languages: set[str] | None) -> PipelineStep:
    """The datatrove reader for one source, chosen by what the path holds."""
    ledger = DropLedger(ledger_dir, f"read-{spec.name}", "unreadable")
    common = {"adapter": code_adapter}
    if spec.location.startswith("hf:"):
        return _hf_reader(spec, ledger)
    path = Path(spec.location)
    if not path.exists():
        raise UserError(f"source {path} does not exist; pass a folder or file of code with --source")
    if path.is_file():
        folder, glob = str(path.parent), path.name
        kind = "parquet" if path.name.endswith(".parquet") else "jsonl" if path.name.endswith(JSONL_SUFFIXES) else "code"
    else:
        folder, glob, kind = str(path), None, _folder_kind(path)
    if kind == "parquet":
        reader = CodeParquetReader(folder, glob_pattern=glob or "**/*.parquet", **common)
    elif kind == "jsonl":
        reader = CodeJsonlReader(folder, glob_pattern=glob or "**/*.jsonl*", **common)
    else:
        return CodeFolderReader(path, spec.name, ledger, languages)
    reader.ledger, reader.source = ledger, spec.name
    return reader


def _folder_kind(folder: Path) -> str:
    """'code' for a folder holding any source file, else 'parquet' / 'jsonl' for a dataset folder."""
    if next(iter_source_files([folder]), None) is not None:
        return "code"
    if next(folder.rglob("*.parquet"), None) is not None:
        return "parquet"
    return "jsonl" if next(folder.rglob("*.jsonl*"), None) is not None else "code"


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
