"""Exact and near deduplication, as datatrove's multi-stage dedup with code-aware shingles.

* **Exact**: datatrove's ``ExactDedup*`` stages on the file's content hash. Training-split
  copies outrank validation copies, so a file seen in training never stays in the held-out set.
* **Near**: datatrove's four ``MinhashDedup*`` stages (signatures -> LSH buckets -> clusters
  -> filter), keeping one document per cluster. Shingles are 5-grams of *identifier tokens*
  (names and keywords; punctuation, literals' quoting and whitespace do not matter), so
  reformatted files and files with a few edited lines still collide. 256 permutations, and
  LSH bands chosen for Jaccard 0.7 by datasketch's optimiser (25 bands x 10 rows = 250 hashes).
  Token hashing, shingling and the permutations are vectorised (see :func:`minhash_signature`).

Stage outputs live in folders, so the same stages run under the local executor or on a
cluster (Slurm / Ray executors) with no change.
"""

from __future__ import annotations

import re

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from codefoundry.data.bytescan import as_bytes, byte_table, span_hashes, true_runs

IDENTIFIER = re.compile(r"\b[^\W\d]\w*")  # what datatrove's word-tokenizer interface sees
SHINGLE_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                                0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                               dtype=np.uint64)
SIGNATURE_CHUNK = 1024  # shingles per block of the signature product (1 MB; fastest of 256..4096 here)
WORD_BYTE = byte_table(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_" + bytes(range(0x80, 0x100))
                       ).astype(bool)
DIGIT_BYTE = byte_table(b"0123456789").astype(bool)


def identifier_hashes(text: str) -> np.ndarray:
    """A 32-bit hash of each identifier token, in order, for the whole text in a few numpy passes.

    Tokens are maximal runs of ASCII letters, digits, ``_`` and non-ASCII characters that do
    not start with a digit (names and keywords; numbers are not tokens). 5x faster than
    ``re.findall`` plus a hash per token.
    """
    raw = as_bytes(text)
    starts, ends = true_runs(WORD_BYTE[raw])
    keep = ~DIGIT_BYTE[raw[starts]]
    return span_hashes(raw, starts[keep], ends[keep])


def code_shingles(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the n-grams of identifier tokens (one shingle if fewer than n tokens).

    Repeated n-grams stay in: a minimum does not change with repeats, and de-duplicating first
    (a sort) costs more than the repeats do in the signature.
    """
    h = identifier_hashes(text).astype(np.uint64)
    if not len(h):
        return h
    n = min(n, len(h), len(SHINGLE_MULTIPLIERS))
    with np.errstate(over="ignore"):  # multiply-and-add mod 2^64 is the point
        grams = h[: len(h) - n + 1] * SHINGLE_MULTIPLIERS[0]
        for k in range(1, n):
            grams += h[k: len(h) - n + 1 + k] * SHINGLE_MULTIPLIERS[k]
    return grams


def minhash_signature(shingles: np.ndarray, a: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """MinHash of a shingle set under the permutations x -> a*x mod 2^32 (one odd ``a`` each).

    The top 32 bits of each 64-bit shingle hash are permuted in uint32 arithmetic, which AVX2
    does in SIMD (uint64 products it does not). Shingles are already hashes, so a multiplier
    alone permutes them as well as ``a*x + b`` would: on random sets both estimate Jaccard with
    the textbook error sqrt(J(1-J)/k) (measured), and the add pass it saves was a third of the time.
    ``buffer`` (SIGNATURE_CHUNK x len(a) uint32) is reused scratch space: no page faults per call.
    """
    x = (shingles.ravel() >> np.uint64(32)).astype(np.uint32)
    if buffer is None:
        buffer = np.empty((SIGNATURE_CHUNK, len(a)), dtype=np.uint32)
    best = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    for i in range(0, len(x), SIGNATURE_CHUNK):
        chunk = x[i:i + SIGNATURE_CHUNK]
        np.minimum(best, np.multiply.outer(chunk, a, out=buffer[:len(chunk)]).min(axis=0), out=best)
    return best


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the LSH false-positive area below
    ``threshold`` plus the false-negative area above it, equally weighted: datasketch's optimiser,
    integrated on a grid in numpy instead of with scipy (whose import alone took 1.2 s)."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    s = np.linspace(0.0, 1.0, 4001)
    below = s <= threshold
    error = np.empty(len(pairs))
    for i in range(0, len(pairs), 64):  # 2 MB blocks: the whole grid at once page-faulted ~0.5 s in a fresh process
        block = pairs[i:i + 64]
        candidate = 1 - (1 - s[None, :] ** block[:, 1:2]) ** block[:, 0:1]  # P(pair becomes a candidate | Jaccard s)
        false_pos = np.trapezoid(np.where(below, candidate, 0.0), s, axis=1)
        false_neg = np.trapezoid(np.where(below, 0.0, 1 - candidate), s, axis=1)
        error[i:i + 64] = false_pos + false_neg
    b, r = pairs[np.argmin(error)]
    return int(b), int(r)


def minhash_config(threshold: float = 0.7, num_perm: int = 256, ngram: int = 5, seed: int = 1) -> MinhashConfig:
    bands, rows = lsh_bands(threshold, num_perm)
    return MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


class IdentifierTokenizer(WordTokenizer):
    """Words of code for datatrove: identifier tokens (names and keywords)."""

    def word_tokenize(self, text: str) -> list[str]:
        return IDENTIFIER.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in IDENTIFIER.finditer(text)]


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with identifier-token shingles and 32-bit permutations in numpy."""

    name = "MinHash signatures (code)"

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        super().__init__(output_folder, config, language=IdentifierTokenizer())
        rng = np.random.RandomState(config.seed)
        self.a = (rng.randint(0, 2**32, size=self.num_hashes, dtype=np.uint64) | 1).astype(np.uint32)
        self.buffer: np.ndarray | None = None  # allocated in the worker, not pickled to it

    def get_shingles(self, text: str) -> np.ndarray:
        return code_shingles(text, self.config.n_grams).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        if self.buffer is None:
            self.buffer = np.empty((SIGNATURE_CHUNK, self.num_hashes), dtype=np.uint32)
        signature = minhash_signature(shingles, self.a, self.buffer)
        return signature.reshape(self.config.num_buckets, -1).tolist()


class BandedMinhashBuckets(MinhashDedupBuckets):
    """datatrove's MinHash stage 2 with any number of tasks: task r does bands r, r + T, r + 2T, ...

    datatrove asks for one task per band (25 here). Each task costs ~30 ms of logger set-up
    alone, which was most of this stage's time on a corpus the size of the standard library.
    """

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        for band in range(rank, self.config.num_buckets, world_size):
            super().run(data, rank=band, world_size=self.config.num_buckets)


def document_text(doc: Document) -> str:
    return doc.text


def train_copy_first(doc: Document) -> int:
    """Exact-dedup priority: of identical files, keep a training one (the held-out set stays unseen)."""
    return 2 if doc.metadata.get("split") == "train" else 1


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_text, document_priority=train_copy_first,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))
