"""SFT data: conversation formats, sources, weighted mixing and packing.

Formats (detected per record):

* OpenAI ``{"messages": [{"role", "content", "tool_calls"?}, ...]}``;
* ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}, ...]}``;
* Alpaca ``{"instruction", "input"?, "output"}``.

Sources are ``PATH.jsonl``, ``hf:NAME[:SPLIT]`` (Hugging Face ``datasets``, online, the
``post`` extra) or a named hub mix component ``hub:NAME`` (:data:`HUB_SFT`: CodeAlpaca,
Code-Feedback, GSM8K), each with an optional ``@WEIGHT``. A hub component is read from the
hub's parquet files in their own column layout, straight through ``hf://`` (huggingface_hub,
no ``datasets`` needed); ``hub:NAME=PATH`` reads a local copy in the same layout (a parquet
file or a folder of them). Records that cannot be used are skipped and counted by reason,
never silently dropped: a hub file without the dataset's columns is counted with all its rows.

Packing: rendered conversations are laid end to end in rows of ``seq_len`` tokens. Each
conversation starts with the EOT token and the model runs with document masking on
(``ModelConfig.doc_mask``), so no token attends across conversations; labels are
computed per conversation, so none is predicted from its neighbour either.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codefoundry.errors import UserError
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError, render_chat
from codefoundry.tokenizer.special import IGNORE_INDEX

Messages = list[dict[str, Any]]
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


def to_messages(record: Any) -> Messages:
    """OpenAI messages from a record in any supported format; ChatFormatError if it fits none."""
    if not isinstance(record, dict):
        raise ChatFormatError("record is not a JSON object")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ChatFormatError("'messages' must be a list of objects")
        return msgs
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ChatFormatError("'conversations' must be a list")
        out = []
        for turn in turns:
            role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None:
                raise ChatFormatError(f"unknown ShareGPT speaker {turn!r:.60}")
            out.append({"role": role, "content": turn.get("value", "")})
        return out
    if "instruction" in record and "output" in record:
        request = str(record["instruction"])
        if record.get("input"):
            request += "\n\n" + str(record["input"])
        return [{"role": "user", "content": request}, {"role": "assistant", "content": str(record["output"])}]
    raise ChatFormatError("record has none of 'messages', 'conversations', 'instruction'+'output'")


@dataclass(frozen=True)
class Skipped:
    """Rows a reader could not use, passed down the stream so the load report counts them."""

    reason: str
    rows: int = 1


CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "3 + 4 = <<3+4=7>>7"


def _gsm8k(row: dict[str, Any]) -> Messages:
    """GSM8K's answer is the worked solution then ``#### N``; the reply keeps both, in words,
    without the calculator annotations."""
    work, _, final = CALCULATOR_NOTE.sub("", str(row["answer"])).rpartition("####")
    reply = f"{work.strip()}\nThe answer is {final.strip()}." if work else str(row["answer"])
    return [{"role": "user", "content": str(row["question"])}, {"role": "assistant", "content": reply}]


def _alpaca(row: dict[str, Any]) -> Messages:
    return to_messages({k: row[k] for k in ("instruction", "input", "output")})


def _messages(row: dict[str, Any]) -> Messages:
    return to_messages({"messages": row["messages"]})


@dataclass(frozen=True)
class HubSFT:
    """A chat dataset on the hub: its parquet files (the hub's ``refs/convert/parquet`` branch,
    ``CONFIG/SPLIT/NNNN.parquet``), the columns it must have, and how a row becomes messages."""

    repo: str
    config: str
    split: str
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Messages]

    def hub_folder(self) -> str:
        return f"datasets/{self.repo}@refs%2Fconvert%2Fparquet/{self.config}/{self.split}"


HUB_SFT: dict[str, HubSFT] = {
    # 20k instruction/input/output code tasks (Chaudhary 2023)
    "codealpaca": HubSFT("sahil2801/CodeAlpaca-20k", "default", "train", ("instruction", "input", "output"), _alpaca),
    # 66k multi-turn code conversations with execution feedback: id, messages[{role, content}]
    "code-feedback": HubSFT("m-a-p/Code-Feedback", "default", "train", ("messages",), _messages),
    # 7.5k grade-school maths word problems: question, answer ("... #### 72")
    "gsm8k": HubSFT("openai/gsm8k", "main", "train", ("question", "answer"), _gsm8k),
}


def hub_records(name: str, local: str | None = None, fs: Any = None) -> Iterator[Any]:
    """Records (OpenAI messages) of a :data:`HUB_SFT` dataset, from the hub or a local copy in its
    layout; rows and files that do not fit the dataset's columns come as :class:`Skipped`."""
    import pyarrow.parquet as pq

    if name not in HUB_SFT:
        raise UserError(f"unknown hub SFT dataset {name!r}; use one of: {', '.join(HUB_SFT)}")
    spec = HUB_SFT[name]
    if local is not None:
        root = Path(local)
        if not root.exists():
            raise UserError(f"hub:{name}={local}: no such file or folder (give a parquet file in the hub's layout)")
        files = [str(root)] if root.is_file() else sorted(str(p) for p in root.rglob("*.parquet"))
        opener = open
    else:
        if fs is None:
            from codefoundry.data.hub_corpus import default_fs

            fs = default_fs()
        try:
            files = sorted(fs.glob(f"{spec.hub_folder()}/*.parquet"))
        except Exception as exc:  # no network, no access, no such dataset
            raise UserError(f"cannot list {spec.repo} on the hub ({type(exc).__name__}: {exc})") from None
        opener = fs.open
    usable = 0
    found: set[str] = set()
    for path in files:
        with opener(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = [c for c in spec.columns if c not in names]
            if missing:
                found |= names
                yield Skipped(f"{name}: missing columns {', '.join(missing)}", pf.metadata.num_rows)
                continue
            usable += 1
            for batch in pf.iter_batches(columns=list(spec.columns)):
                for row in batch.to_pylist():
                    try:
                        yield {"messages": spec.convert(row)}
                    except (ChatFormatError, TypeError, KeyError):
                        yield Skipped(f"{name}: malformed row")
    if not usable:
        have = f" (the files have {', '.join(sorted(found))})" if found else ""
        raise UserError(f"hub:{name}: no parquet file with the columns {', '.join(spec.columns)}{have} "
                        f"in {local or spec.repo}")


@dataclass
class Source:
    """Where conversations come from, and how often the mixture draws from it."""

    location: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``PATH[@WEIGHT]``, ``hf:NAME[:SPLIT][@WEIGHT]``, or ``hub:NAME[=LOCAL_PATH][@WEIGHT]``."""
        location, _, weight = spec.rpartition("@") if "@" in spec else (spec, "", "")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"data source {spec!r}: weight {weight!r} is not a number (use PATH@WEIGHT)") from None
        if w <= 0:
            raise UserError(f"data source {spec!r}: weight must be positive")
        return cls(location, w)

    def records(self) -> Iterator[Any]:
        """Raw records; a line that is not JSON yields the string ``"<bad json>"`` so it gets counted."""
        if self.location.startswith("hub:"):
            name, _, local = self.location[4:].partition("=")
            yield from hub_records(name, local or None)
            return
        if self.location.startswith("hf:"):
            yield from _hf_records(self.location[3:])
            return
        path = Path(self.location)
        if not path.is_file():
            raise UserError(f"data file {path} not found (give a JSONL file or hf:DATASET_NAME)")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield "<bad json>"


def _hf_records(name: str) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the `datasets` package: pip install 'codefoundry[post]'") from None
    name, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, missing dataset, bad split: all the user's to fix
        raise UserError(f"cannot load Hugging Face dataset {name!r} ({exc.__class__.__name__}: {exc})") from None
    yield from ds


@dataclass
class Example:
    """One rendered conversation as next-token pairs (labels IGNORE_INDEX outside assistant spans)."""

    inputs: list[int]
    labels: list[int]


@dataclass
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.kept} conversations" + (f" (skipped: {skipped})" if skipped else "")


def render_examples(records: Iterable[Any], tok: CodeTokenizer, seq_len: int,
                    report: LoadReport | None = None) -> list[Example]:
    """Render records to examples, skipping (and counting) malformed, untrainable or too long ones."""
    report = report if report is not None else LoadReport()
    out = []
    for record in records:
        if isinstance(record, Skipped):
            report.skipped[record.reason] += record.rows
            continue
        try:
            rendered = render_chat(tok, to_messages(record))
        except ChatFormatError:
            report.skipped["malformed"] += 1
            continue
        inputs, labels = rendered.labels()
        if len(inputs) > seq_len:
            report.skipped["longer than seq_len"] += 1
        elif all(t == IGNORE_INDEX for t in labels):
            report.skipped["no assistant tokens"] += 1
        else:
            out.append(Example(inputs, labels))
            report.kept += 1
    return out


class Mixture:
    """An endless stream of examples: each draw picks a source with probability proportional to
    its weight, then that source's next example (each source reshuffled every epoch)."""

    def __init__(self, sets: list[list[Example]], weights: list[float], seed: int = 0) -> None:
        pairs = [(s, w) for s, w in zip(sets, weights) if s]
        if not pairs:
            raise UserError("no usable SFT conversations in the given data")
        self.sets, self.weights = [list(s) for s, _ in pairs], [w for _, w in pairs]
        self.rng = random.Random(seed)
        self.cursor = [len(s) for s in self.sets]  # forces a shuffle on first use

    def __iter__(self) -> Iterator[Example]:
        while True:
            i = self.rng.choices(range(len(self.sets)), weights=self.weights)[0]
            if self.cursor[i] == len(self.sets[i]):
                self.rng.shuffle(self.sets[i])
                self.cursor[i] = 0
            self.cursor[i] += 1
            yield self.sets[i][self.cursor[i] - 1]


def pack_rows(examples: Iterable[Example], seq_len: int, pad_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """Rows of exactly ``seq_len`` (inputs, labels), conversations laid end to end.

    A conversation that does not fit the rest of a row starts the next one (conversations are
    never split); the remainder of a row is padding with label IGNORE_INDEX.
    """
    row_x: list[int] = []
    row_y: list[int] = []
    for ex in examples:
        if row_x and len(row_x) + len(ex.inputs) > seq_len:
            pad = seq_len - len(row_x)
            yield row_x + [pad_id] * pad, row_y + [IGNORE_INDEX] * pad
            row_x, row_y = [], []
        row_x, row_y = row_x + ex.inputs, row_y + ex.labels
    if row_x:
        pad = seq_len - len(row_x)
        yield row_x + [pad_id] * pad, row_y + [IGNORE_INDEX] * pad


def pack_batches(examples: Iterable[Example], batch_size: int, seq_len: int, pad_id: int,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) tensors of shape (rows, seq_len) from :func:`pack_rows`; the last batch
    of a finite stream may have fewer rows."""
    rows = pack_rows(examples, seq_len, pad_id)
    while batch := list(itertools.islice(rows, batch_size)):
        xs, ys = zip(*batch)
        yield (torch.tensor(xs, dtype=torch.long, device=device), torch.tensor(ys, dtype=torch.long, device=device))
