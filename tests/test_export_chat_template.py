"""An imported chat model keeps its own template through import and export: transformers' apply_chat_template on
the HF export, the GGUF's template rendered as llama.cpp --jinja renders it give the prompt `codefoundry chat`
renders, and chat stops on the model's own end-of-turn token."""

from __future__ import annotations

import json

import pytest
import torch
from test_tokenizer_import import CHATML, CONVERSATION

from codefoundry.checkpoint import load_model
from codefoundry.data.sources import stdlib_root
from codefoundry.export.gguf_export import export_gguf
from codefoundry.export.hf import export_hf
from codefoundry.export.hf_import import import_hf
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.bpe import build_untrained
from codefoundry.tokenizer.chat import render_chat

transformers = pytest.importorskip("transformers")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                 "<|fim_suffix|>", "<|fim_pad|>", "<tool_call>", "</tool_call>"]


@pytest.fixture(scope="module")
def imported_chat_model(tmp_path_factory):
    """A random Qwen2 'instruct' model with a ChatML tokenizer (Llama 3's split, so GGUF can carry it), imported."""
    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tmp = tmp_path_factory.mktemp("chat")
    tk = build_untrained()
    texts = [(stdlib_root() / n).read_text() for n in ("textwrap.py", "fnmatch.py", "bisect.py")]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                                      initial_alphabet=ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp / "hf")
    tk.save(str(tmp / "hf" / "tokenizer.json"))
    (tmp / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    result = import_hf(tmp / "hf", tmp / "ckpt")
    assert result["added_tokens"] == []  # everything the pipeline needs is the model's own
    return tmp


def test_hf_export_renders_the_prompt_codefoundry_chat_renders(imported_chat_model):
    tmp = imported_chat_model
    _, tok = load_model(tmp / "ckpt")
    export_hf(tmp / "ckpt", tmp / "export")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "export")
    for n in (2, 4):
        theirs = hf_tok.apply_chat_template(CONVERSATION[:n], add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert list(theirs) == render_chat(tok, CONVERSATION[:n], add_generation_prompt=True).ids
    im_end = tok.tk.token_to_id("<|im_end|>")
    assert hf_tok.eos_token == "<|im_end|>" and tok.chat_stop_ids == {tok.eot_id, im_end}
    config = json.loads((tmp / "export" / "config.json").read_text())
    assert im_end in config["eos_token_id"]  # generate() stops at the end of the turn too


def test_gguf_export_carries_the_template_and_roles(imported_chat_model):
    gguf = pytest.importorskip("gguf")
    tmp = imported_chat_model
    _, tok = load_model(tmp / "ckpt")
    export_gguf(tmp / "ckpt", tmp / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp / "m.gguf")

    def field(key):
        return reader.fields[key].contents()

    assert field("tokenizer.chat_template") == CHATML
    assert field("tokenizer.ggml.eos_token_id") == tok.tk.token_to_id("<|im_end|>")
    assert field("tokenizer.ggml.eot_token_id") == tok.special_ids[sp.ASSISTANT_END]
    assert field("tokenizer.ggml.fim_pre_token_id") == tok.tk.token_to_id("<|fim_prefix|>")
    # The template travels as text: rendered the way llama.cpp's --jinja and transformers render one (a sandboxed
    # Jinja environment), it must give the ids `codefoundry chat` feeds the model.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        field("tokenizer.chat_template"))
    prompt = template.render(messages=CONVERSATION[:2], add_generation_prompt=True, bos_token="<|endoftext|>",
                             eos_token="<|im_end|>")
    tok.tk.encode_special_tokens = False  # the rendered text's special tokens are real ones, as in llama.cpp
    ids = tok.tk.encode(prompt, add_special_tokens=False).ids
    assert ids == render_chat(tok, CONVERSATION[:2], add_generation_prompt=True).ids
