"""Fill-in-the-middle training rows (Bavarian et al. 2022, as in SantaCoder / StarCoder).

With probability ``rate`` a document is cut at two uniformly random *character* positions
into prefix / middle / suffix and re-ordered so a left-to-right model learns to infill:

* PSM: ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle``
* SPM: ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle`` (the variant whose
  tokens also teach PSM, as in the StarCoder training code)

PSM and SPM are each used half the time. Each part is tokenized on its own, so decoding
the parts and re-assembling them gives back the document exactly. The choice is a pure
function of (seed, document id): re-running or resuming a prepare writes the same rows.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from codefoundry.tokenizer import CodeTokenizer


@dataclass(frozen=True)
class FimSplit:
    mode: str  # "psm" or "spm"
    prefix: str
    middle: str
    suffix: str


def doc_rng(seed: int, doc_id: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def fim_split(text: str, rate: float, seed: int, doc_id: str) -> FimSplit | None:
    """The FIM cut for this document, or None when it stays left-to-right."""
    rng = doc_rng(seed, doc_id)
    if rate <= 0 or rng.random() >= rate:
        return None
    lo, hi = sorted(rng.randint(0, len(text)) for _ in range(2))
    mode = "psm" if rng.random() < 0.5 else "spm"
    return FimSplit(mode, text[:lo], text[lo:hi], text[hi:])


def fim_tokens(tok: CodeTokenizer, split: FimSplit, encoded: tuple[Sequence[int], Sequence[int], Sequence[int]]
               ) -> np.ndarray:
    """Token ids of one FIM row from the separately encoded (prefix, middle, suffix)."""
    pre, mid, suf = encoded
    if split.mode == "psm":
        parts = [[tok.fim_prefix_id], pre, [tok.fim_suffix_id], suf, [tok.fim_middle_id], mid]
    else:
        parts = [[tok.fim_prefix_id, tok.fim_suffix_id], suf, [tok.fim_middle_id], pre, mid]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def reassemble(tok: CodeTokenizer, ids: Sequence[int]) -> str:
    """The original document from a FIM (or plain) row: the inverse that tests check."""
    ids = [int(i) for i in ids]
    p, s, m = tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id
    if not ids or ids[0] != p:
        return tok.decode(ids)
    mid_at = ids.index(m)
    if ids[1] == s:  # SPM: suffix, then prefix + middle (one run: split point unknown, not needed)
        return tok.decode(ids[mid_at + 1:]) + tok.decode(ids[2:mid_at])
    suf_at = ids.index(s)
    return tok.decode(ids[1:suf_at]) + tok.decode(ids[mid_at + 1:]) + tok.decode(ids[suf_at + 1:mid_at])
