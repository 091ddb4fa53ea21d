"""Train and use the byte-level BPE tokenizer.

Training and the on-disk format are HF `tokenizers` (so `transformers` loads the JSON
unchanged); :class:`CodeTokenizer` adds the ids of our special tokens and helpers for
FIM prompts. Raw code is always encoded with special-token parsing off, so a source file
that happens to contain ``<|endoftext|>`` can never inject a control token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

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
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """PSM-ordered infilling prompt; the model continues with the middle."""
        return ([self.fim_prefix_id] + self.encode(prefix) + [self.fim_suffix_id] + self.encode(suffix)
                + [self.fim_middle_id])


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
