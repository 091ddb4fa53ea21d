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
from codefoundry.tokenizer.roles import (
    RoleIds,
    TokenizerConfig,
    config_text,
    find_roles,
    read_config,
    write_config,
)


class CodeTokenizer:
    """A HF tokenizer plus the roles of its special tokens and its sidecar config (template, FIM order).

    ``special_ids`` maps each role (named by our canonical token, see :mod:`~codefoundry.tokenizer.roles`)
    to the id of the token that plays it in *this* tokenizer; a role it lacks raises a one-line
    UserError when a command needs it, so a tokenizer without FIM tokens still prepares data
    without FIM and still chats.
    """

    def __init__(self, tokenizer: Tokenizer, config: TokenizerConfig | None = None) -> None:
        self.tk = tokenizer
        self.tk.encode_special_tokens = True  # raw text never yields special ids
        self.config = config or TokenizerConfig()
        self.special_ids = RoleIds(find_roles(tokenizer.token_to_id, self.config.chat_template is not None))
        self.eot_id = self.special_ids[sp.EOT]
        self.bos_id = self.eot_id  # documents (and our chat template) open with the separator
        self._fast: Any = None  # fastokens.Tokenizer once built; False when unavailable
        self._parsing: Tokenizer | None = None  # a copy that parses special-token text (chat templates)

    @classmethod
    def from_file(cls, path: str | Path) -> "CodeTokenizer":
        """The tokenizer JSON (or a directory's tokenizer.json) with its sidecar config if there is one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer {path} not found; train one with `codefoundry tokenizer train`")
        try:
            tk = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"tokenizer {path} is not a valid tokenizers JSON file ({exc})") from None
        return cls(tk, read_config(path))

    @property
    def fim_prefix_id(self) -> int:
        return self.special_ids[sp.FIM_PREFIX]

    @property
    def fim_middle_id(self) -> int:
        return self.special_ids[sp.FIM_MIDDLE]

    @property
    def fim_suffix_id(self) -> int:
        return self.special_ids[sp.FIM_SUFFIX]

    @property
    def fim_pad_id(self) -> int:
        return self.special_ids[sp.FIM_PAD]

    @property
    def chat_stop_ids(self) -> set[int]:
        """Tokens that end an assistant reply: the end-of-turn token, the separator and the config's EOS."""
        stops = {self.eot_id}
        if sp.ASSISTANT_END in self.special_ids:
            stops.add(self.special_ids[sp.ASSISTANT_END])
        eos = self.tk.token_to_id(self.config.eos_token) if self.config.eos_token else None
        return stops | ({eos} if eos is not None else set())

    def role_tokens(self) -> dict[str, str]:
        """Role -> the token string playing it (the mapping reported by import and kept in the sidecar)."""
        return {role: self.tk.id_to_token(i) for role, i in self.special_ids.items()}

    def save(self, path: str | Path) -> None:
        """The tokenizer JSON, and beside it the sidecar config when it is not the default."""
        self.tk.save(str(path))
        write_config(path, self.config, self.role_tokens())

    def config_json(self) -> str | None:
        """The sidecar's content (tokenizer_config.json), or None for our own defaults (no sidecar)."""
        return None if self.config.is_default() else config_text(self.config, self.role_tokens())

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

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

    def encode_with_specials(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of text whose special-token strings *are* those tokens: a rendered chat
        template, encoded the way transformers' apply_chat_template encodes it."""
        if self._parsing is None:
            self._parsing = Tokenizer.from_str(self.tk.to_str())
            self._parsing.encode_special_tokens = False
        enc = self._parsing.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """Infilling prompt in the tokenizer's FIM order; the model continues with the middle.

        PSM: ``<pre> prefix <suf> suffix <mid>``. SPM (as StarCoder and our data pipeline write it):
        ``<pre> <suf> suffix <mid> prefix``.
        """
        pre, suf, mid = self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id
        if self.config.fim_order == "spm":
            return [pre, suf] + self.encode(suffix) + [mid] + self.encode(prefix)
        return [pre] + self.encode(prefix) + [suf] + self.encode(suffix) + [mid]


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
