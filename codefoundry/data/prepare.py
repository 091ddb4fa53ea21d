"""`data prepare`: source files in, tokenized train/val shards out.

Layout of the output directory::

    OUT/tokenizer.json      copy of the tokenizer used (the data is meaningless without it)
    OUT/train/{tokens.bin,index.npy,metadata.json}
    OUT/val/{tokens.bin,index.npy,metadata.json}

Each document is stored as ``[EOT] + encode(text)``. Files that cannot be used are skipped
and counted (with a few example paths per reason) in both metadata files.
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from codefoundry.data.shards import ShardWriter
from codefoundry.data.sources import SourceFile, iter_source_files, read_text, split_of
from codefoundry.errors import UserError
from codefoundry.progress import Progress
from codefoundry.tokenizer import CodeTokenizer

SPLITS = ("train", "val")
EXAMPLES_PER_REASON = 5


class SkipLog:
    """Counts skipped inputs by reason and keeps a few examples of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}


def collect_files(sources: list[Path], languages: set[str] | None, val_fraction: float,
                  skips: SkipLog) -> dict[str, list[tuple[SourceFile, str]]]:
    """Read every usable file once and assign it to a split."""
    for src in sources:
        if not Path(src).exists():
            raise UserError(f"source {src} does not exist; pass a folder or file of code with --source")
    by_split: dict[str, list[tuple[SourceFile, str]]] = {s: [] for s in SPLITS}
    for sf in iter_source_files(sources, languages):
        text, reason = read_text(sf.path)
        if reason:
            skips.add(reason, str(sf.path))
            continue
        by_split[split_of(sf.relpath, val_fraction)].append((sf, text))
    return by_split


def prepare(sources: list[Path], tokenizer: CodeTokenizer, out_dir: Path, val_fraction: float = 0.04,
            languages: set[str] | None = None, batch_docs: int = 128, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize the sources into ``out_dir``; returns the per-split metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / "tokenizer.json")
    skips = SkipLog()
    by_split = collect_files(sources, languages, val_fraction, skips)
    if not any(by_split.values()):
        raise UserError(f"no usable source files found under {', '.join(map(str, sources))}")
    results = {}
    for split in SPLITS:
        files = by_split[split]
        total_bytes = sum(len(t.encode()) for _, t in files)
        writer = ShardWriter(out_dir / split, tokenizer.vocab_size)
        lang_bytes: Counter[str] = Counter()
        lang_docs: Counter[str] = Counter()
        progress = Progress(f"tokenize {split}", total=total_bytes / 1e6, unit="MB", enabled=show_progress)
        for i in range(0, len(files), batch_docs):
            batch = files[i:i + batch_docs]
            for (sf, text), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
                writer.add([tokenizer.eot_id] + ids)
                lang_bytes[sf.language] += len(text.encode())
                lang_docs[sf.language] += 1
            progress.update(sum(len(t.encode()) for _, t in batch) / 1e6)
        progress.close()
        meta = {
            "split": split,
            "bytes": total_bytes,
            "vocab_size": tokenizer.vocab_size,
            "val_fraction": val_fraction,
            "sources": [str(s) for s in sources],
            "languages": {lang: {"documents": lang_docs[lang], "bytes": lang_bytes[lang]} for lang in sorted(lang_docs)},
            "files": [sf.relpath for sf, _ in files],
            "skipped": skips.to_dict(),
        }
        writer.close(meta)
        results[split] = {k: v for k, v in meta.items() if k != "files"} | {"documents": len(files), "tokens": writer.n_tokens}
    return results


def copy_tokenizer(data_dir: Path, dest: Path) -> None:
    shutil.copyfile(Path(data_dir) / "tokenizer.json", dest)
