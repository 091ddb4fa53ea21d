"""Bits per byte on held-out shards, and the same figure for gzip and xz.

Bits per byte is tokenizer-independent: the summed cross-entropy of every token of the
held-out stream (in bits) divided by the UTF-8 bytes of the original text. Every document
is ``[EOT] + tokens`` and the stream ends with one more EOT, so each document's end is
predicted too — a complete lossless code, comparable with a compressor's file size.
"""

from __future__ import annotations

import gzip
import lzma
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codefoundry.data.shards import Shard
from codefoundry.model.transformer import IGNORE_INDEX, Transformer
from codefoundry.progress import Progress
from codefoundry.runtime import autocast


def score_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(window start, first target it scores) covering every target exactly once.

    With ``stride < seq_len`` windows overlap and each scores only its targets not scored
    before, so every token after the first window is predicted with at least
    ``seq_len - stride`` tokens of context (strided sliding-window evaluation).
    """
    windows, scored_to, start = [], 0, 0
    while scored_to < n_targets:
        windows.append((start, scored_to))
        scored_to = min(start + seq_len, n_targets)
        start += stride
    return windows


@torch.no_grad()
def bits_per_byte(model: Transformer, shard_dir: str | Path, seq_len: int | None = None, batch_size: int = 8,
                  dtype: torch.dtype = torch.float32, show_progress: bool = False,
                  stride: int | None = None) -> dict[str, Any]:
    shard = Shard(shard_dir)
    device = model.embed.weight.device
    seq_len = seq_len or model.cfg.max_seq_len
    stride = min(stride or seq_len, seq_len)
    eot = int(shard.tokens[0]) if len(shard.tokens) else 0
    stream = np.concatenate([np.asarray(shard.tokens, dtype=np.int64), [eot]])
    n_targets = len(stream) - 1
    windows = score_windows(n_targets, seq_len, stride)
    model.eval()
    nats = 0.0
    progress = Progress("bits per byte", total=len(windows), unit="win", enabled=show_progress)
    for lo in range(0, len(windows), batch_size):
        rows = windows[lo:lo + batch_size]
        x = torch.zeros(len(rows), seq_len, dtype=torch.long)
        y = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
        for r, (start, first) in enumerate(rows):
            seg = stream[start: start + seq_len + 1]
            n = len(seg) - 1
            x[r, :n] = torch.from_numpy(seg[:-1])
            y[r, first - start:n] = torch.from_numpy(seg[first - start + 1:])
        with autocast(device, dtype):
            nats += model(x.to(device), y.to(device), reduction="sum").item()
        progress.update(len(rows))
    progress.close()
    n_bytes = shard.meta["bytes"]
    return {"bpb": nats / math.log(2) / n_bytes, "loss": nats / n_targets, "tokens": n_targets, "bytes": n_bytes,
            "documents": len(shard), "seq_len": seq_len, "stride": stride}


def compressor_bpb(texts: list[str]) -> dict[str, float]:
    """Bits per byte of gzip -9 and xz -9e, each file compressed on its own (container headers included)."""
    raw = [t.encode() for t in texts]
    total = sum(len(b) for b in raw)
    gz = sum(len(gzip.compress(b, compresslevel=9, mtime=0)) for b in raw)
    xz = sum(len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)) for b in raw)
    return {"gzip -9": 8 * gz / total, "xz -9e": 8 * xz / total}


def shard_texts(shard_dir: str | Path, tokenizer) -> list[str]:
    """The original documents of a shard, decoded back from tokens (byte-level BPE is lossless)."""
    shard = Shard(shard_dir)
    return [tokenizer.decode(shard.document(i)[1:].tolist()) for i in range(len(shard))]


def run_bpb(args) -> int:
    import json

    from codefoundry.infer.load import load_from_args
    from codefoundry.runtime import resolve_dtype

    model, tokenizer = load_from_args(args)
    dtype = resolve_dtype(args.dtype, model.embed.weight.device)
    result = bits_per_byte(model, args.data, args.seq_len, args.batch_size, dtype, show_progress=True,
                           stride=args.stride)
    if args.baselines:
        result.update(compressor_bpb(shard_texts(args.data, tokenizer)))
    print(json.dumps(result, indent=2))
    return 0
