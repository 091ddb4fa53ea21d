"""SuperBPE: exact round trips, fixed special ids, real superwords (never across a newline), better compression."""

import json

import pytest

from codefoundry.data.sources import iter_source_files, read_text, stdlib_root
from codefoundry.errors import UserError
from codefoundry.tokenizer import SPECIAL_TOKENS, CodeTokenizer, train_tokenizer
from codefoundry.tokenizer.superbpe import chars_per_token, train_superbpe

VOCAB, TRANSITION = 2048, 1536  # smaller vocabs leave too little room for superwords to pay off
TRICKY = [
    "def f(x):\r\n\treturn x  # CRLF and tab\r\n",
    "naïve = 'café — 東京 🚀'\n\n\n    \t  trailing   \n",
    "x = 1_000_000 + 0xFF\nprint(f'{x!r:>10}')\n",
    "\x0b\x0c odd whitespace \u2028 line sep\r\r\n \n",
    "<|endoftext|> is just text here <|fim_prefix|>",
    "        return self._value if self is not None else None\n",
    "   ",
    "",
]


def _texts(*folders: str) -> list[str]:
    return [t for sf in iter_source_files([stdlib_root() / f for f in folders]) if (t := read_text(sf.path)[0])]


@pytest.fixture(scope="module")
def superbpe(tmp_path_factory):
    sup, plain = train_superbpe(_texts("json", "logging", "http"), VOCAB, TRANSITION, show_progress=False)
    path = tmp_path_factory.mktemp("superbpe") / "tokenizer.json"
    sup.save(path)
    return CodeTokenizer.from_file(path), plain, path


def _superwords(tok: CodeTokenizer) -> list[str]:
    """Stage-2 tokens, decoded to text."""
    return [tok.decode([i]) for i in range(TRANSITION, tok.vocab_size)]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact(superbpe, text):
    tok, _, _ = superbpe
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_held_out_files(superbpe):
    tok, _, _ = superbpe
    texts = _texts("html")
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_specials_keep_fixed_ids_and_are_never_injected(superbpe):
    tok, _, _ = superbpe
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == VOCAB
    assert not set(tok.encode("a <|endoftext|> b <|fim_middle|>")) & set(range(len(SPECIAL_TOKENS)))


def test_superwords_span_spaces_but_never_newlines(superbpe):
    tok, _, _ = superbpe
    words = _superwords(tok)
    assert sum(" " in w.strip() for w in words) >= 100, words[:40]
    assert not [w for w in words if "\n" in w or "\r" in w]
    ids = tok.encode("        return self.value\n")
    assert any(i >= TRANSITION for i in ids)


def test_compresses_held_out_code_better_than_plain_bpe(superbpe):
    tok, plain, _ = superbpe
    held_out = _texts("urllib", "wsgiref", "concurrent")
    assert chars_per_token(tok, held_out)[0] > 1.02 * chars_per_token(plain, held_out)[0]
    assert plain.vocab_size == tok.vocab_size


def test_bulk_encoding_gives_identical_ids(superbpe):
    tok, _, _ = superbpe
    texts = TRICKY + _texts("wsgiref")
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_loads_in_transformers(superbpe):
    transformers = pytest.importorskip("transformers")
    tok, _, path = superbpe
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TRICKY[:4]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("transition", [100, VOCAB])
def test_transition_out_of_range_is_a_user_error(transition):
    with pytest.raises(UserError, match="transition"):
        train_superbpe(["x = 1\n"], VOCAB, transition)


def test_stage1_is_plain_bpe_trained_to_the_transition(superbpe):
    """SuperBPE inherits the plain BPE's first merges: valid only because BPE training is greedy and deterministic."""
    tok, _, _ = superbpe
    stage1 = json.loads(train_tokenizer(_texts("json", "logging", "http"), TRANSITION, show_progress=False).tk.to_str())
    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    assert merges[:len(stage1["model"]["merges"])] == stage1["model"]["merges"]
