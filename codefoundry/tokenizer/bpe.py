"""Train and use the byte-level BPE tokenizer.

Training and the on-disk format are HF `tokenizers` (so `transformers` loads the JSON
unchanged); :class:`CodeTokenizer` adds the ids of our special tokens and helpers for
FIM prompts. Raw code is always encoded with special-token parsing off, so a source file
that happens to contain ``<|endoftext|>`` can never inject a control token.

Bulk encoding (``encode_batch``) goes through ``tiktoken`` when it is installed (the ``data``
extra): built from the same merges and the same split regex it yields identical ids about
four times faster. It is used only for tokenizers with our pre-tokenizer, and only after it
reproduces HF's ids on a probe text; otherwise HF `tokenizers` does the work.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

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
        self._fast: Any = None  # tiktoken.Encoding once built; False when unavailable

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
        fast = self._fast_encoder()
        if fast:
            return fast.encode_ordinary_batch(texts)
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def _fast_encoder(self) -> Any:
        if self._fast is None:
            self._fast = _build_tiktoken(self) or False
        return self._fast

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """PSM-ordered infilling prompt; the model continues with the middle."""
        return ([self.fim_prefix_id] + self.encode(prefix) + [self.fim_suffix_id] + self.encode(suffix)
                + [self.fim_middle_id])


PROBE = "def f(x):\r\n\treturn [x**2 for x in range(1234)]  # café 東京\n        pass\n\n\n  'it''s'\n"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table (what byte-level BPE tokens are spelled in), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _build_tiktoken(tok: CodeTokenizer) -> Any:
    """A tiktoken Encoding equal to ``tok`` for ordinary text, or None if that cannot be guaranteed."""
    try:
        import tiktoken
    except ImportError:
        return None
    state = json.loads(tok.tk.to_str())
    splits = [p for p in (state.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) != 1 or splits[0].get("pattern", {}).get("Regex") != sp.SPLIT_PATTERN or state.get("normalizer"):
        return None
    decoder = _byte_decoder()
    specials = set(tok.special_ids.values())
    try:
        ranks = {bytes(decoder[c] for c in token): i for token, i in tok.tk.get_vocab().items() if i not in specials}
        enc = tiktoken.Encoding("codefoundry", pat_str=sp.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError):
        return None
    if enc.encode_ordinary(PROBE) != tok.encode(PROBE):
        return None
    return enc


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
