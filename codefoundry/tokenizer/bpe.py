"""Train and use the byte-level BPE tokenizer.

Training and the on-disk format are HF `tokenizers` (so `transformers` loads the JSON
unchanged); :class:`CodeTokenizer` adds the ids of our special tokens and helpers for
FIM prompts. Raw code is always encoded with special-token parsing off, so a source file
that happens to contain ``<|endoftext|>`` can never inject a control token.

Bulk encoding (``encode_batch``) goes through ``fastokens`` when it is installed (the ``data``
extra): a Rust reimplementation of HF `tokenizers` with a PCRE2-JIT pre-tokenizer that reads
the same ``tokenizer.json`` and yields identical ids ~60x faster on code (single thread; see
bench/bench_data.py). It is used only after it reproduces HF's ids on a probe text, special
-token text included; otherwise HF `tokenizers` does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from codefoundry.errors import UserError
from codefoundry.tokenizer import special as sp


class CodeTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tk = tokenizer
        self.tk.encode_special_tokens = True  # raw text never yields special ids
        missing = [t for t in sp.SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {missing}; retrain it with `codefoundry tokenizer train`")
        ids = {t: tokenizer.token_to_id(t) for t in sp.SPECIAL_TOKENS}
        self.special_ids = ids
        self.eot_id = ids[sp.EOT]
        self.bos_id = self.eot_id
        self.fim_prefix_id, self.fim_middle_id = ids[sp.FIM_PREFIX], ids[sp.FIM_MIDDLE]
        self.fim_suffix_id, self.fim_pad_id = ids[sp.FIM_SUFFIX], ids[sp.FIM_PAD]
        self._fast: Any = None  # fastokens.Tokenizer once built; False when unavailable

    @classmethod
    def from_file(cls, path: str | Path) -> "CodeTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer {path} not found; train one with `codefoundry tokenizer train`")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"tokenizer {path} is not a valid tokenizers JSON file ({exc})") from None

    def save(self, path: str | Path) -> None:
        self.tk.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def token_id(self, token: str) -> int:
        return self.special_ids[token]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of many texts as uint32 arrays (views of one buffer): the bulk path for data."""
        fast = self._fast_encoder()
        if fast:
            ids, offsets = fast.encode_batch_flat(texts, split_special_tokens=True)
            flat = np.frombuffer(ids, dtype=np.uint32)
            bounds = np.frombuffer(offsets, dtype=np.uint64).tolist()
            return [flat[a:b] for a, b in zip(bounds, bounds[1:])]
        return [np.array(e.ids, dtype=np.uint32) for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def _fast_encoder(self) -> Any:
        if self._fast is None:
            self._fast = _build_fast(self) or False
        return self._fast

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """PSM-ordered infilling prompt; the model continues with the middle."""
        return ([self.fim_prefix_id] + self.encode(prefix) + [self.fim_suffix_id] + self.encode(suffix)
                + [self.fim_middle_id])


# Covers what pre-tokenizers disagree on: CRLF, tabs, runs of spaces, digits, contractions,
# non-ASCII letters, U+2028, and special-token text that must stay ordinary text.
PROBE = ("def f(x):\r\n\treturn [x**2 for x in range(1234567)]  # café 東京\n        pass\n\n\n  'it''s' \u2028"
         " <|endoftext|><|fim_prefix|>x\n")


def _build_fast(tok: CodeTokenizer) -> Any:
    """A fastokens tokenizer equal to ``tok`` on ordinary text, or None if that cannot be shown."""
    try:
        import fastokens
    except ImportError:
        return None
    try:
        fast = fastokens.Tokenizer.from_json_str(tok.tk.to_str())
        ids, _ = fast.encode_batch_flat([PROBE], split_special_tokens=True)
    except Exception:  # a pre-tokenizer or model fastokens does not implement
        return None
    return fast if np.frombuffer(ids, dtype=np.uint32).tolist() == tok.encode(PROBE) else None


def build_untrained() -> Tokenizer:
    """An empty byte-level BPE with our pre-tokenizer and decoder, ready for training."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(sp.SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    length: int | None = None, show_progress: bool = True) -> CodeTokenizer:
    """Learn BPE merges from an iterator of documents. Special tokens take ids 0..14."""
    if vocab_size < len(sp.SPECIAL_TOKENS) + 256 + 1:
        raise UserError(f"vocab size {vocab_size} is too small: need more than {len(sp.SPECIAL_TOKENS) + 256}")
    tk = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(sp.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tk.train_from_iterator(_batched(texts), trainer=trainer, length=length)
    return CodeTokenizer(tk)


def _batched(texts: Iterable[str], size: int = 64) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
