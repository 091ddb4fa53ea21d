"""Where code comes from: local folders (default: the Python standard library's source).

Folders are walked without recursion (any depth), in sorted order. Files are read as bytes
and decoded strictly; anything the pipeline cannot or should not read is reported with a
reason so the caller counts it instead of dropping it silently or stalling on it:

* a FIFO, socket or device named like code (``not_regular_file``: opened non-blocking, never read);
* a file over ``max_bytes`` (``too_large``: never read into memory);
* a symlink leaving the source tree (``symlink_outside_source``: followed only when asked),
  a dangling symlink (``broken_symlink``) or a symlink loop (``symlink_loop``);
* an unreadable, binary, non-UTF-8 or empty file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Extension -> language: the eight languages of the recipes first (GitHub linguist's extensions;
# ``.h`` counts as C, as in The Stack), then others a folder may hold.
LANGUAGE_BY_EXTENSION = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp",
    ".hh": "cpp", ".hxx": "cpp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".sh": "shell", ".cs": "csharp", ".kt": "kotlin",
    ".swift": "swift", ".scala": "scala", ".lua": "lua", ".sql": "sql",
}
# The eight languages the multi-language recipes train on (configs/cf-150m.yaml).
RECIPE_LANGUAGES = ("python", "javascript", "typescript", "java", "c", "cpp", "go", "rust")
# Data and markup files are not code to learn from by default: a folder yields them only when
# ``languages`` names them (they then meet the StarCoder2 data-file / XML / HTML filters).
MARKUP_AND_DATA_BY_EXTENSION = {
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".xml": "xml", ".html": "html",
    ".htm": "html", ".md": "markdown", ".css": "css", ".csv": "csv",
}
# Spellings used by The Stack / StarCoderData / CodeParrot `lang`/`language` columns -> our names.
LANGUAGE_ALIASES = {
    "c++": "cpp", "c#": "csharp", "js": "javascript", "ts": "typescript", "bash": "shell", "sh": "shell",
    "py": "python", "golang": "go", "rs": "rust", "cplusplus": "cpp", "c/c++ header": "c", "yml": "yaml", "htm": "html", "md": "markdown", "jupyter notebook": "jupyter",
}
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "site-packages"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_SUFFIX = ".parquet"
MAX_FILE_BYTES = 10_000_000  # a safety cap, not a quality rule: the line filters judge content


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


@dataclass(frozen=True)
class FolderEntry:
    """One file a folder walk found: its kind ('code', 'jsonl', 'parquet'), or why it is skipped."""

    path: str
    relpath: str
    kind: str
    language: str | None = None
    skip: str | None = None


def kind_of(name: str, languages: set[str] | None = None) -> tuple[str, str | None] | None:
    """('code', language), ('jsonl', None), ('parquet', None), or None for a file the pipeline ignores."""
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl", None
    if lower.endswith(PARQUET_SUFFIX):
        return "parquet", None
    lang = language_of(name, include_markup=bool(languages))
    if lang and (languages is None or lang in languages):
        return "code", lang
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_folder(root: Path, languages: set[str] | None = None, follow_symlinks: bool = False,
                kinds: tuple[str, ...] = ("code", "jsonl", "parquet")) -> Iterator[FolderEntry]:
    """Every file of the given kinds under ``root`` (a folder or one file), in sorted order, each
    with the reason it must be skipped if any. Iterative (no depth limit); symlinks that leave the
    tree are reported, not followed, unless ``follow_symlinks``; folder symlinks are descended only
    then (the tree's own folders are reached through their real paths), never twice."""
    root = Path(root)
    if not root.is_dir():
        found = kind_of(root.name, languages)
        if found and found[0] in kinds:
            yield FolderEntry(str(root), root.name, *found)
        return
    real_root = os.path.realpath(root)
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}
    stack = [(str(root), "")]  # (folder, its path under root + "/"): no relpath per file (a third of the walk)
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # an unreadable folder holds nothing we could read
        subdirs = []
        for e in entries:
            rel = prefix + e.name
            found = kind_of(e.name, languages)
            if e.is_symlink():
                try:
                    st = os.stat(e.path)
                except OSError as exc:
                    if found and found[0] in kinds or exc.errno == errno.ELOOP:
                        reason = "symlink_loop" if exc.errno == errno.ELOOP else "broken_symlink"
                        yield FolderEntry(e.path, rel, *(found or ("folder", None)), skip=reason)
                    continue
                outside = not _inside(os.path.realpath(e.path), real_root)
                if stat.S_ISDIR(st.st_mode):
                    if follow_symlinks and e.name not in SKIP_DIRS:
                        if (st.st_dev, st.st_ino) in seen:  # a loop, or a folder reached twice
                            yield FolderEntry(e.path, rel, "folder", skip="symlink_to_visited_folder")
                        else:
                            subdirs.append((e.path, rel + "/"))
                    elif outside:
                        yield FolderEntry(e.path, rel, "folder", skip="symlink_outside_source")
                    continue
                if found and found[0] in kinds:
                    skip = "symlink_outside_source" if outside and not follow_symlinks else None
                    yield FolderEntry(e.path, rel, *found, skip=skip)
                continue
            if e.is_dir(follow_symlinks=False):
                if e.name not in SKIP_DIRS:
                    subdirs.append((e.path, rel + "/"))
            elif found and found[0] in kinds:
                yield FolderEntry(e.path, rel, *found)
        if follow_symlinks:
            for d, _ in subdirs:
                st = os.stat(d)
                seen.add((st.st_dev, st.st_ino))
        stack.extend(reversed(subdirs))  # pop() then visits them in sorted order


def iter_source_files(roots: list[Path], languages: set[str] | None = None) -> Iterator[SourceFile]:
    """Every code file under the roots in a stable (sorted) order, filtered by language (files
    the folder walk flags, such as symlinks leaving the tree, are left out)."""
    for root in roots:
        for entry in scan_folder(Path(root), languages, kinds=("code",)):
            if entry.skip is None:
                yield SourceFile(Path(entry.path), entry.relpath, entry.language)


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(data, None) or (None, reason): reads regular files only (a FIFO named ``x.py`` is opened
    non-blocking and never read, so it cannot hang the run) and none over ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not_regular_file"
        if st.st_size > max_bytes:
            return None, "too_large"
        try:
            return f.read(max_bytes + 1), None
        except OSError:
            return None, "unreadable"


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) with reason in unreadable / not_regular_file / too_large /
    binary / non_utf8 / empty."""
    data, reason = read_bytes(path, max_bytes)
    if data is None:
        return None, reason
    if len(data) > max_bytes:  # grew while being read
        return None, "too_large"
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
