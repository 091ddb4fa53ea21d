import numpy as np
import pytest

from codefoundry.tokenizer import SPECIAL_TOKENS, CodeTokenizer
from codefoundry.errors import UserError

SAMPLES = [
    "def f(x):\r\n\treturn x  # CRLF and tab\r\n",
    "naïve = 'café — 東京 🚀'\n\n\n    \t  trailing   \n",
    "x = 1_000_000 + 0xFF\nprint(f'{x!r:>10}')\n",
    "\x0b\x0c odd whitespace \u2028 line sep\n",
    "<|endoftext|> is just text here <|fim_prefix|>",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tiny_tokenizer, text):
    tok, _ = tiny_tokenizer
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_fixed_ids_and_never_injected(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("a <|endoftext|> b <|fim_middle|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))


def test_fim_prompt_layout(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    ids = tok.fim_prompt("def f(", "):\n")
    assert ids[0] == tok.fim_prefix_id and ids[-1] == tok.fim_middle_id and tok.fim_suffix_id in ids


def test_indentation_is_one_token(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    ids = tok.encode("        return value\n")
    assert tok.decode(ids[:1]) == " " * 7  # the 8th space joins " return" (Llama-3 split)


def test_loads_in_transformers(tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    tok, path = tiny_tokenizer
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES[:4]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_missing_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CodeTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid"):
        CodeTokenizer.from_file(bad)


def test_fast_bulk_encoder_gives_identical_ids(tiny_tokenizer):
    pytest.importorskip("fastokens")
    from codefoundry.data.sources import iter_source_files, read_text, stdlib_root

    tok, path = tiny_tokenizer
    texts = [t for sf in iter_source_files([stdlib_root() / "json", stdlib_root() / "email"]) if (t := read_text(sf.path)[0])]
    texts += SAMPLES + ["<|endoftext|> and <|fim_middle|> are text here", ""]
    assert tok._fast_encoder(), "the fastokens path should be available for our own tokenizers"
    slow = [e.ids for e in tok.tk.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == slow


def test_fast_encoder_is_refused_when_it_disagrees(tiny_tokenizer, monkeypatch):
    fastokens = pytest.importorskip("fastokens")

    class Wrong:
        def encode_batch_flat(self, texts, split_special_tokens):
            return np.zeros(3, dtype=np.uint32).tobytes(), np.array([0, 3], dtype=np.uint64).tobytes()

    monkeypatch.setattr(fastokens.Tokenizer, "from_json_str", lambda _: Wrong())
    _, path = tiny_tokenizer
    other = CodeTokenizer.from_file(path)
    assert not other._fast_encoder()
    text = "x = 1  # comment\n    y = 22\n"
    assert other.encode_batch([text]) == [other.encode(text)]
