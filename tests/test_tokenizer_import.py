"""`codefoundry tokenizer import`: a pretrained tokenizer's own tokens play our roles; ours fill only the gaps;
its chat template renders exactly as transformers renders it, with loss masks on assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from codefoundry.cli import main
from codefoundry.data.sources import stdlib_root
from codefoundry.errors import UserError
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.chat import ChatFormatError, render_chat
from codefoundry.tokenizer.pretrained import import_tokenizer

STARCODER = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
        "<|fim_pad|>", "<tool_call>", "</tool_call>"]
# Qwen2.5's ChatML shape, tool calls included (the real one also lists tool schemas).
CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{{ m.content or '' }}"
          "{%- for tc in m.tool_calls or [] %}{{ '\\n<tool_call>\\n' }}{{ tc.function | tojson }}"
          "{{ '\\n</tool_call>' }}"
          "{%- endfor %}{{ '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "List files."},
    {"role": "assistant", "content": "Sure.", "tool_calls": [
        {"type": "function", "function": {"name": "bash", "arguments": {"command": "ls"}}}]},
    {"role": "tool", "content": "a.py"},
    {"role": "assistant", "content": "One file: a.py."},
]


def pretrained_dir(path: Path, specials: list[str], config: dict | None = None) -> Path:
    """A tokenizer directory as transformers saves one: BPE with the given special tokens, tokenizer_config."""
    texts = [(stdlib_root() / name).read_text() for name in ("textwrap.py", "fnmatch.py", "bisect.py")]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_starcoder_style_fim_tokens_are_adopted_and_only_missing_roles_appended(tmp_path, capsys):
    src = pretrained_dir(tmp_path / "sc", STARCODER)
    out = tmp_path / "out" / "tokenizer.json"
    assert main(["tokenizer", "import", str(src), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "<|fim_prefix|>         -> <fim_prefix> (id 1)" in report and "appended" in report
    tok = CodeTokenizer.from_file(out)
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert tok.eot_id == 0 and tok.fim_prefix_id == original.token_to_id("<fim_prefix>")
    assert tok.fim_prompt("a", "b") == [1] + tok.encode("a") + [3] + tok.encode("b") + [2]
    # No template of its own: our chat tokens (10 of them) are appended after the original vocabulary.
    appended = [r for r in sp.SPECIAL_TOKENS if tok.special_ids[r] >= original.get_vocab_size()]
    assert appended == [t for t in sp.SPECIAL_TOKENS if t not in STARCODER[:1] + sp.SPECIAL_TOKENS[1:5]]
    assert tok.vocab_size == original.get_vocab_size() + len(appended)
    assert render_chat(tok, CONVERSATION[:2], True).ids[-1] == tok.special_ids[sp.ASSISTANT_START]


def test_tokenizer_import_keeps_data_prepare_working(tmp_path):
    from codefoundry.data.prepare import prepare
    from codefoundry.data.shards import Shard

    src = pretrained_dir(tmp_path / "sc", [*STARCODER, "<|im_start|>", "<|im_end|>"], {"chat_template": CHATML})
    tok = import_tokenizer(src, tmp_path / "tokenizer.json").tokenizer
    prepare([stdlib_root() / "json"], tok, tmp_path / "data", val_fraction=0.2, show_progress=False, fim_rate=1.0)
    train = Shard(tmp_path / "data" / "train")
    first = train.document(0)
    assert first[0] == tok.eot_id == 0 and first[1] == tok.fim_prefix_id == 1  # the tokenizer's own ids
    prepared = CodeTokenizer.from_file(tmp_path / "data" / "tokenizer.json")  # what pretrain copies into checkpoints
    assert prepared.config.chat_template == CHATML and prepared.special_ids == tok.special_ids


def test_chatml_template_renders_as_transformers_and_masks_assistant_turns(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = pretrained_dir(tmp_path / "qwen", QWEN, {"chat_template": CHATML, "eos_token": "<|im_end|>"})
    adopted = import_tokenizer(src, tmp_path / "out" / "tokenizer.json")
    assert adopted.appended == []  # FIM, end-of-turn and tool-call tokens all exist
    tok = CodeTokenizer.from_file(tmp_path / "out" / "tokenizer.json")
    im_end = tok.tk.token_to_id("<|im_end|>")
    assert tok.special_ids[sp.ASSISTANT_END] == im_end and im_end in tok.chat_stop_ids
    assert tok.special_ids[sp.TOOL_CALL_START] == tok.tk.token_to_id("<tool_call>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for n, prompt in ((2, True), (4, True), (5, False)):
        expected = hf_tok.apply_chat_template(CONVERSATION[:n], add_generation_prompt=prompt, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert render_chat(tok, CONVERSATION[:n], prompt).ids == list(expected)
    rendered = render_chat(tok, CONVERSATION)
    trained = tok.tk.decode([t for t, m in zip(rendered.ids, rendered.mask) if m], skip_special_tokens=False)
    call = json.dumps({"name": "bash", "arguments": {"command": "ls"}})
    assert trained == f"Sure.\n<tool_call>\n{call}\n</tool_call><|im_end|>\nOne file: a.py.<|im_end|>\n"


# Qwen3's habit, reduced: the reasoning block is printed for the final assistant turn only.
THINKING = CHATML.replace("{{ m.content or '' }}",
                          "{%- if m.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
                          "{{ m.content or '' }}")


def test_template_that_rerenders_earlier_turns_is_masked_by_search(tmp_path):
    pytest.importorskip("transformers")
    src = pretrained_dir(tmp_path / "qwen3", QWEN, {"chat_template": THINKING, "eos_token": "<|im_end|>"})
    tok = import_tokenizer(src, tmp_path / "out" / "tokenizer.json").tokenizer
    chat = [CONVERSATION[1], {"role": "assistant", "content": "No."}, {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because."}]
    rendered = render_chat(tok, chat)
    trained = tok.tk.decode([t for t, m in zip(rendered.ids, rendered.mask) if m], skip_special_tokens=False)
    assert trained == "No.<|im_end|>Because.<|im_end|>"  # each span ends with its end-of-turn token
    assert "<think>" in tok.tk.decode(rendered.ids, skip_special_tokens=False)  # context, not trained


def test_missing_role_and_bad_template_are_one_line_errors(tmp_path):
    pytest.importorskip("transformers")
    src = pretrained_dir(tmp_path / "bare", ["<|end_of_text|>"],
                         {"chat_template": "{{ raise_exception('no system messages') }}"})
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|end_of_text|>"}}))
    tok = import_tokenizer(src, tmp_path / "out" / "tokenizer.json", append=False).tokenizer
    assert tok.eot_id == tok.tk.token_to_id("<|end_of_text|>") and tok.config.eos_token == "<|end_of_text|>"
    with pytest.raises(UserError, match="no token for the role <\\|fim_prefix\\|> \\(FIM tokens\\)"):
        tok.fim_prompt("a", "b")
    with pytest.raises(ChatFormatError, match="chat template failed to render.*no system messages"):
        render_chat(tok, CONVERSATION[:2], True)
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_tokenizer(tmp_path / "nowhere", tmp_path / "x" / "tokenizer.json")
    assert not (tmp_path / "x" / "tokenizer.json").exists()


def test_spm_order_is_kept_for_infilling(tmp_path):
    src = pretrained_dir(tmp_path / "sc", STARCODER)
    tok = import_tokenizer(src, tmp_path / "tokenizer.json", fim_order="spm").tokenizer
    again = CodeTokenizer.from_file(tmp_path / "tokenizer.json")  # the order travels in the sidecar
    assert again.config.fim_order == "spm"
    assert again.fim_prompt("a", "b") == [1, 3] + tok.encode("b") + [2] + tok.encode("a")


def test_our_tokenizers_keep_ids_and_no_sidecar(tiny_tokenizer):
    tok, path = tiny_tokenizer
    assert [tok.special_ids[t] for t in sp.SPECIAL_TOKENS] == list(range(len(sp.SPECIAL_TOKENS)))
    assert not (path.parent / "tokenizer_config.json").exists() and tok.config.chat_template is None


def test_prepare_with_fim_and_no_fim_tokens_fails_before_writing(tmp_path):
    from codefoundry.data.prepare import prepare

    src = pretrained_dir(tmp_path / "bare", ["<|endoftext|>"])
    tok = import_tokenizer(src, tmp_path / "tokenizer.json", append=False).tokenizer
    with pytest.raises(UserError, match="no token for the role <\\|fim_prefix\\|> \\(FIM tokens\\)"):
        prepare([stdlib_root() / "json"], tok, tmp_path / "data", show_progress=False, fim_rate=0.5)
    assert not (tmp_path / "data").exists()
    prepare([stdlib_root() / "json"], tok, tmp_path / "data", val_fraction=0.2, show_progress=False, fim_rate=0.0)
    assert (tmp_path / "data" / "train" / "tokens.bin").is_file()
