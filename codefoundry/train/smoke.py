"""`codefoundry pretrain --smoke-test`: check a machine end to end on synthetic data in a minute.

The synthetic corpus is generated code with learnable regularities (templated functions
with random names and constants), tokenized by a small BPE trained on it, written as a
normal prepared-data directory. A tiny model trains for a few dozen steps; the check
passes when the loss falls clearly and the checkpoint reloads. Tests and benchmarks use
the same data, so none of them depends on a corpus being present.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from codefoundry.data.shards import ShardWriter
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config
from codefoundry.tokenizer import train_tokenizer

_TEMPLATES = [
    "def {f}({a}, {b}):\n    return {a} * {n} + {b}\n",
    "def {f}({a}):\n    if {a} > {n}:\n        return {a} - {n}\n    return {a}\n",
    "class {F}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n\n    def {f}(self):\n        return self.{a} + {n}\n",
    "for {a} in range({n}):\n    {b} = {f}({a})\n    print({a}, {b})\n",
]
_WORDS = ["alpha", "beta", "count", "total", "item", "value", "node", "size", "index", "key", "data", "result"]


def synthetic_code(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 6)):
            f = "_".join(rng.sample(_WORDS, 2))
            parts.append(rng.choice(_TEMPLATES).format(f=f, F=f.title().replace("_", ""), a=rng.choice(_WORDS),
                                                       b=rng.choice(_WORDS), n=rng.randint(0, 99)))
        docs.append("\n".join(parts))
    return docs


def make_synthetic_data(out: str | Path, vocab_size: int = 512, n_docs: int = 600, seed: int = 0) -> Path:
    """A prepared-data directory (tokenizer.json, train/, val/) of synthetic code; returns ``out``."""
    out = Path(out)
    docs = synthetic_code(n_docs, seed)
    tokenizer = train_tokenizer(docs, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    n_val = max(1, n_docs // 10)
    for split, texts in (("train", docs[n_val:]), ("val", docs[:n_val])):
        writer = ShardWriter(out / split, tokenizer.vocab_size)
        for ids in tokenizer.encode_batch(texts):
            writer.add([tokenizer.eot_id] + ids)
        writer.close({"split": split, "vocab_size": tokenizer.vocab_size, "synthetic": True})
    return out


def smoke_test(out: str | Path, preset: str = "tiny", steps: int = 40, overrides: list[str] | None = None,
               show_progress: bool = True) -> dict[str, Any]:
    """Train ``preset`` on synthetic data for ``steps`` steps; raise UserError if training does not work."""
    from codefoundry.checkpoint import load_model
    from codefoundry.train.metrics import read_metrics
    from codefoundry.train.trainer import pretrain

    out = Path(out)
    data = make_synthetic_data(out / "data")
    run = build_run_config(preset, None, [f"train.data={data}", f"train.out={out / 'run'}", f"train.max_steps={steps}",
                                          "train.seq_len=64", "train.batch_size=8", "train.warmup_steps=5",
                                          "train.log_every=5", "model.max_seq_len=64", *(overrides or [])])
    summary = pretrain(run, show_progress=show_progress)
    losses = [r["loss"] for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r]
    if len(losses) < 2 or not losses[-1] < 0.8 * losses[0]:
        raise UserError(f"smoke test failed: loss went {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps "
                        "(expected a clear fall); this machine or configuration does not train correctly")
    load_model(summary["checkpoint"])
    return {"first_loss": losses[0], "last_loss": losses[-1], **summary}
