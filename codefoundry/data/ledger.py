"""Counting what the pipeline drops: documents and bytes per reason, with a few example ids.

Every step that can lose a document (readers skipping bad input, filters, dedup) reports to
a :class:`DropLedger`. It has the shape of a datatrove ``exclusion_writer`` (a context manager
with ``write(doc, rank)``), so datatrove's own filters and dedup stages report through it with
no glue. Each (step, rank) writes one small JSON file when its rank finishes cleanly, which makes
the counts survive a killed-and-resumed run exactly: a finished rank's file stays, an unfinished
rank rewrites its own. The folder may be any fsspec URL (``s3://...``, ``memory://...``), like
every datatrove folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.io import DataFolder, get_datafolder

EXAMPLES_PER_REASON = 5


class DropLedger:
    def __init__(self, folder: str | Path | DataFolder, step: str, default_reason: str | None = None) -> None:
        self.folder, self.step = get_datafolder(str(folder) if isinstance(folder, Path) else folder), step
        self.default_reason = default_reason or step
        self.rank: int | None = None
        self.counts: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, where: str, n_bytes: int, rank: int, documents: int = 1) -> None:
        self.rank = rank
        entry = self.counts.setdefault(reason, {"documents": 0, "bytes": 0, "examples": []})
        entry["documents"] += documents
        entry["bytes"] += n_bytes
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(where)

    def write(self, doc: Document, rank: int = 0) -> None:
        """The datatrove exclusion-writer hook: ``doc`` was dropped by the step that owns this ledger."""
        reason = doc.metadata.get("filter_reason") or self.default_reason
        self.add(reason, doc.id, len(doc.text.encode("utf-8", "replace")), rank)

    def __enter__(self) -> "DropLedger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.rank is not None:  # a failed rank reports nothing: it will be redone
            name = f"{self.step}.{self.rank:05d}.json"
            with self.folder.open(name + ".tmp", "w") as f:
                f.write(json.dumps(self.counts))
            self.folder.mv(name + ".tmp", name)


def merge_ledgers(folder: str | Path | DataFolder) -> dict[str, dict[str, dict[str, Any]]]:
    """{step: {reason: {documents, bytes, examples}}} summed over every rank's file."""
    merged: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    folder = get_datafolder(str(folder) if isinstance(folder, Path) else folder)
    if not folder.isdir(""):
        return {}
    for name in folder.list_files(recursive=False, glob_pattern="*.json"):
        step = name.rsplit(".", 2)[0]  # "{step}.{rank}.json"
        with folder.open(name, "r") as f:
            counts = json.load(f)
        for reason, entry in counts.items():
            total = merged[step].setdefault(reason, {"documents": 0, "bytes": 0, "examples": []})
            total["documents"] += entry["documents"]
            total["bytes"] += entry["bytes"]
            total["examples"] = (total["examples"] + entry["examples"])[:EXAMPLES_PER_REASON]
    return dict(merged)
