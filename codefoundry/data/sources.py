"""Where code comes from: local folders (default: the Python standard library's source).

Files are read as bytes and decoded strictly; anything unreadable, binary, non-UTF-8 or
empty is reported with a reason so the caller can count it instead of dropping it silently.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Extension -> language. The data-pipeline issue extends this; the default corpus is Python.
LANGUAGE_BY_EXTENSION = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".go": "go",
    ".rs": "rust", ".rb": "ruby", ".php": "php", ".sh": "shell", ".cs": "csharp", ".kt": "kotlin",
    ".swift": "swift", ".scala": "scala", ".lua": "lua", ".sql": "sql",
}
# Data and markup files are not code to learn from by default: a folder yields them only when
# ``languages`` names them (they then meet the StarCoder2 data-file / XML / HTML filters).
MARKUP_AND_DATA_BY_EXTENSION = {
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".xml": "xml", ".html": "html",
    ".htm": "html", ".md": "markdown", ".css": "css", ".csv": "csv",
}
# Spellings used by The Stack / StarCoderData / CodeParrot `lang`/`language` columns -> our names.
LANGUAGE_ALIASES = {
    "c++": "cpp", "c#": "csharp", "js": "javascript", "ts": "typescript", "bash": "shell", "sh": "shell",
    "py": "python", "golang": "go", "yml": "yaml", "htm": "html", "md": "markdown", "jupyter notebook": "jupyter",
}
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "site-packages"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library source folder: the default corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relpath: str  # path under its source root: stable across machines, used for splitting
    language: str


def normalize_language(name: str) -> str:
    """Our canonical language name for a dataset's spelling ('C++' -> 'cpp', 'Python' -> 'python')."""
    key = name.strip().lower()
    return LANGUAGE_ALIASES.get(key, key)


def language_of(path: str, include_markup: bool = False) -> str | None:
    """Language from a file name's extension (markup/data languages only with ``include_markup``)."""
    suffix = os.path.splitext(path)[1].lower()
    lang = LANGUAGE_BY_EXTENSION.get(suffix)
    if lang is None and include_markup:
        lang = MARKUP_AND_DATA_BY_EXTENSION.get(suffix)
    return lang


def iter_source_files(roots: list[Path], languages: set[str] | None = None) -> Iterator[SourceFile]:
    """Every code file under the roots in a stable (sorted) order, filtered by language."""
    for root in roots:
        root = Path(root)
        if root.is_file():
            lang = language_of(root.name, include_markup=bool(languages))
            if lang and (languages is None or lang in languages):
                yield SourceFile(root, root.name, lang)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                lang = language_of(name, include_markup=bool(languages))
                if lang and (languages is None or lang in languages):
                    path = Path(dirpath) / name
                    yield SourceFile(path, path.relative_to(root).as_posix(), lang)


def read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) with reason in unreadable / binary / non_utf8 / empty."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    return decode_text(data)


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """Strict UTF-8 decode of one file's bytes: (text, None) or (None, binary / non_utf8 / empty)."""
    if b"\x00" in data[:8192]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    if not text.strip():
        return None, "empty"
    return text, None


def split_of(relpath: str, val_fraction: float) -> str:
    """'val' or 'train' by a stable hash of the relative path (same answer on every machine)."""
    h = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"
