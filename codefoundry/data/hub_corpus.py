"""Code corpora on the Hugging Face hub, by name: which files hold them, and a capped download.

A recipe names its corpus as ``hub:NAME`` (``hub:codeparrot-clean``). The files are listed and
fetched through fsspec (``hf://datasets/...``, huggingface_hub's file system), then read by the
data stage's own readers (:mod:`codefoundry.data.readers`), which know each corpus's column
layout (``content`` + ``repo_name``/``path`` for CodeParrot, ``content`` + ``max_stars_repo_path``
for StarCoderData, ``text`` for the prose and math sets). The same listing serves the stream
loader, which reads the files in place instead of downloading them.

The Stack v2 (``bigcode/the-stack-v2*``) is not listed: its hub files hold only Software Heritage
blob ids, and the contents must be fetched from S3 under a separate agreement.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError

HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class HubCorpus:
    repo: str  # dataset repository on the hub
    patterns: tuple[str, ...]  # files of the corpus; "{language}" expands to each selected language
    gated: bool = False  # needs the dataset's terms accepted and HF_TOKEN set
    note: str = ""


CORPORA: dict[str, HubCorpus] = {
    "codeparrot-clean": HubCorpus("codeparrot/codeparrot-clean", ("*.json.gz",),
                                  note="Python, 5.4M files, ~50 GB; JSONL.gz with content/repo_name/path"),
    "codeparrot-clean-train": HubCorpus("codeparrot/codeparrot-clean-train", ("*.json.gz",),
                                        note="the train split of codeparrot-clean"),
    "codeparrot-clean-valid": HubCorpus("codeparrot/codeparrot-clean-valid", ("*.json.gz",),
                                        note="the valid split of codeparrot-clean"),
    "starcoderdata": HubCorpus("bigcode/starcoderdata", ("{language}/*.parquet",), gated=True,
                               note="86 languages, ~300 GB; parquet with content/max_stars_repo_path per language folder"),
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu", ("sample/10BT/*.parquet",),
                             note="English web text (educational), parquet with text"),
    "open-web-math": HubCorpus("open-web-math/open-web-math", ("data/*.parquet",),
                               note="mathematical web text, parquet with text"),
}


def hub_corpus(spec: str) -> HubCorpus:
    name = spec.removeprefix(HUB_PREFIX)
    if name not in CORPORA:
        raise UserError(f"unknown hub corpus {spec!r}; use one of: {', '.join(HUB_PREFIX + n for n in CORPORA)}")
    return CORPORA[name]


def default_fs() -> Any:
    """huggingface_hub's fsspec file system (HF_TOKEN from the environment for gated sets)."""
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise UserError("hub corpora need huggingface_hub: pip install 'codefoundry[hf]'") from None
    return HfFileSystem()


def list_files(spec: str, languages: list[str] | None = None, root: str | None = None,
               fs: Any = None) -> list[tuple[str, int]]:
    """(path, bytes) of the corpus's files in a stable order; ``root`` replaces ``datasets/REPO``
    (a local folder in the hub's layout, for tests and mirrors)."""
    corpus = hub_corpus(spec)
    fs = fs or default_fs()
    root = (root or f"datasets/{corpus.repo}").rstrip("/")
    patterns = [p.format(language=lang) for p in corpus.patterns for lang in (languages or ["*"])] \
        if any("{language}" in p for p in corpus.patterns) else list(corpus.patterns)
    try:
        found = fs.find(root, detail=True)
    except Exception as exc:  # no network, no access, no such repo: each the user's to fix, in one line
        hint = " (gated: accept its terms on the hub and set HF_TOKEN)" if corpus.gated else ""
        raise UserError(f"cannot list {corpus.repo}{hint}: {type(exc).__name__}: {exc}; "
                        "or pass --source / --hub-mirror with local files") from None
    files = []
    for path, info in sorted(found.items()):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        if info.get("type", "file") == "file" and any(fnmatch.fnmatch(rel, p) for p in patterns):
            files.append((path, int(info.get("size") or 0)))
    if not files:
        raise UserError(f"{spec}: no files match {patterns} under {root}")
    return files


def download(spec: str, dest: str | Path, max_gb: float = 0.0, languages: list[str] | None = None,
             root: str | None = None, fs: Any = None, log=print) -> dict[str, Any]:
    """Copy the corpus's files (in listing order, until ``max_gb``) to ``dest``, keeping their
    paths; files already there at the right size are kept, so a rerun resumes."""
    fs = fs or default_fs()
    files = list_files(spec, languages, root, fs)
    root = (root or f"datasets/{hub_corpus(spec).repo}").rstrip("/")
    dest = Path(dest)
    budget = max_gb * 1e9 if max_gb > 0 else float("inf")
    taken, total, reused = [], 0, 0
    for path, size in files:
        if taken and total + size > budget:
            break
        local = dest / path[len(root):].lstrip("/")
        if local.is_file() and local.stat().st_size == size:
            reused += 1
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(local.name + ".part")
            fs.get_file(path, str(part))
            part.rename(local)
        taken.append(str(local))
        total += size
    log(f"{spec}: {len(taken)} of {len(files)} files, {total / 1e9:.2f} GB -> {dest} ({reused} already there)")
    return {"corpus": spec, "files": len(taken), "files_available": len(files), "bytes": total, "folder": str(dest)}
