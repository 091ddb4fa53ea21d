"""A model's own Jinja chat template, applied exactly as transformers applies it.

Rendering goes through transformers' own ``render_jinja_template`` (its sandboxed Jinja
environment, ``tojson``, ``raise_exception``, ``strftime_now``; the ``hf`` extra), with the
``bos_token`` / ``eos_token`` strings of the tokenizer config, and the text is encoded with
special-token strings parsed as those tokens, as ``apply_chat_template(tokenize=True)`` does.
So ``codefoundry chat`` feeds a model the very ids transformers would.

Loss masks: templates rarely mark assistant text (``{% generation %}``), so the assistant spans
are found by rendering prefixes. Assistant message *i* covers the text between the conversation
up to *i-1* with the generation prompt and the conversation up to *i* — its content, tool calls
and end-of-turn token — and a token is trained when it starts inside such a span. A template
whose prefixes are not prefixes of the whole (Qwen3 drops the reasoning block of earlier turns)
falls back to finding each message's text in order, an assistant span then running through
the next end-of-turn token; a conversation neither way can place is refused in one line.

As with transformers' default (``sanitize_control_tokens=False``), special-token text inside a
message becomes that token here; our own template (models trained here) never allows that.
"""

from __future__ import annotations

from typing import Any

from codefoundry.errors import UserError
from codefoundry.tokenizer.bpe import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError


def render_text(tok: CodeTokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The template's text for a conversation."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise UserError("this model brings its own chat template, which needs transformers: "
                        "pip install 'codefoundry[hf]'") from None
    cfg = tok.config
    specials = {k: v for k, v in (("bos_token", cfg.bos_token), ("eos_token", cfg.eos_token)) if v is not None}
    try:
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=cfg.chat_template,
                                            add_generation_prompt=add_generation_prompt, **specials)
    except Exception as exc:  # jinja2 raises TemplateError, and the template's own code any error
        raise ChatFormatError(f"the model's chat template failed to render this conversation "
                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return rendered[0]


def assistant_spans(tok: CodeTokenizer, messages: list[dict[str, Any]], text: str,
                    tools: list[dict[str, Any]] | None = None) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole conversation) that the assistant wrote."""
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = render_text(tok, messages[:i], True, tools)
        after = render_text(tok, messages[:i + 1], False, tools)
        if not (after.startswith(before) and text.startswith(after)):
            return spans_by_search(tok, messages, text)
        spans.append((len(before), len(after)))
    return spans


def spans_by_search(tok: CodeTokenizer, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Assistant spans for templates that re-render earlier turns (Qwen3 drops the reasoning block of all but
    the last one): every message's text is found in order, and an assistant span runs from its text through
    the next end-of-turn token."""
    from codefoundry.tokenizer import special as sp
    from codefoundry.tokenizer.chat import text_of

    end_token = tok.role_tokens().get(sp.ASSISTANT_END)
    spans, pos = [], 0
    for i, msg in enumerate(messages):
        content = text_of(msg.get("content"))
        at = text.find(content, pos) if content else -1
        if at < 0 or end_token is None:
            raise ChatFormatError(f"the model's chat template renders message {i} differently once the conversation "
                                  "goes on and its text cannot be found in the whole, so its assistant turns cannot "
                                  "be located for the loss mask")
        pos = at + len(content)
        if msg.get("role") == "assistant":
            end = text.find(end_token, pos)
            pos = len(text) if end < 0 else end + len(end_token)
            spans.append((at, pos))
    return spans


def render_ids(tok: CodeTokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask): the template's ids and, unless a generation prompt was asked for, its assistant mask."""
    text = render_text(tok, messages, add_generation_prompt, tools)
    ids, offsets = tok.encode_with_specials(text)
    if add_generation_prompt:  # a prompt to continue: nothing in it is trained
        return ids, [0] * len(ids)
    spans = assistant_spans(tok, messages, text, tools)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return ids, mask
