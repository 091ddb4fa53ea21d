"""Byte-level BPE tokenizer for code (HF `tokenizers` format) with FIM, chat and tool tokens."""

from codefoundry.tokenizer.bpe import CodeTokenizer, train_tokenizer
from codefoundry.tokenizer.special import SPECIAL_TOKENS
from codefoundry.tokenizer.superbpe import train_superbpe

__all__ = ["CodeTokenizer", "SPECIAL_TOKENS", "train_superbpe", "train_tokenizer"]
