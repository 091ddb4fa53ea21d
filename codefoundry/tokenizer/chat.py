"""Chat template: conversations <-> token ids with the tokenizer's special tokens.

A conversation is a list of OpenAI-style messages (``system``, ``user``, ``assistant`` with
optional ``tool_calls``, ``tool``). It renders as::

    <|endoftext|>
    <|system_start|>...<|system_end|>
    <|user_start|>...<|user_end|>
    <|assistant_start|>text<|tool_call_start|>{"name": ..., "arguments": {...}}<|tool_call_end|>
        <|tool_output_start|>...<|tool_output_end|>more text<|assistant_end|>

An assistant *turn* is the run of assistant and tool messages between two user messages:
tool outputs sit inside the turn, so after a tool result the model simply continues. The
loss mask (1 = train on this token) covers exactly what the model must produce: assistant
text, tool calls (with their delimiters) and ``<|assistant_end|>``; everything the user,
the system or a tool wrote is context only. Text is always encoded with special-token
parsing off, so message content can never forge a control token.

That is our template, for models trained here. A model imported with its own Jinja template
(Qwen's ChatML, Llama 3's headers...) renders with it instead, exactly as transformers does:
:mod:`codefoundry.tokenizer.templates`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from codefoundry.errors import UserError
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.bpe import CodeTokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(UserError, ValueError):
    """A conversation that cannot be rendered (unknown role, tool output outside a turn, a chat template that
    fails on it...): one line, as the CLI prints user errors; the server answers it with a 400."""


@dataclass
class Rendered:
    """Token ids of a conversation and, per token, 1 when the model is trained to produce it."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)

    def add(self, ids: list[int], trained: bool) -> None:
        self.ids.extend(ids)
        self.mask.extend([int(trained)] * len(ids))

    def labels(self, ignore_index: int = sp.IGNORE_INDEX) -> tuple[list[int], list[int]]:
        """(inputs, labels) for next-token training: labels[i] = ids[i+1] where trained, else sp.IGNORE_INDEX."""
        inputs = self.ids[:-1]
        labels = [t if m else ignore_index for t, m in zip(self.ids[1:], self.mask[1:])]
        return inputs, labels


def text_of(content: Any) -> str:
    """Message content as text: a string, None, or OpenAI content parts [{"type": "text", "text": ...}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    raise ChatFormatError(f"message content must be text, got {type(content).__name__}")


def tool_call_json(call: dict[str, Any]) -> str:
    """The JSON the model emits between the tool-call tokens: {"name": ..., "arguments": {...}}.

    Accepts OpenAI's ``{"function": {"name", "arguments": "<json string>"}}`` or a bare
    ``{"name", "arguments"}``; arguments that are not valid JSON are kept as a string.
    """
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError("a tool call needs a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)


def parse_tool_call(text: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments) from the text between the tool-call tokens; ValueError if malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('tool call must be a JSON object like {"name": "...", "arguments": {...}}')
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return obj["name"], args


def render_chat(tok: CodeTokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                tools: list[dict[str, Any]] | None = None) -> Rendered:
    """Ids and loss mask of a conversation, in the model's own chat template when its tokenizer has one
    (:mod:`codefoundry.tokenizer.templates`; ``tools`` are the schemas such a template may list), else ours.

    With ``add_generation_prompt`` the result ends where the model should continue: in our template after
    ``<|assistant_start|>`` when the last message is the user's (or system's), or inside the
    open assistant turn when the last message is a tool output.
    """
    if tok.config.chat_template is not None:
        from codefoundry.tokenizer.templates import render_ids

        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatFormatError("messages must be a list of objects")
        out = Rendered()
        out.ids, out.mask = render_ids(tok, messages, add_generation_prompt, tools)
        return out
    s = tok.special_ids
    out = Rendered()
    out.add([tok.bos_id], False)
    in_turn = False  # inside an assistant turn (after <|assistant_start|>)
    pending_calls = 0  # tool calls still waiting for their output
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"message {i} is not an object")
        role = "system" if msg.get("role") == "developer" else msg.get("role")  # OpenAI's newer name
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        content = text_of(msg.get("content"))
        if role in ("system", "user"):
            if in_turn:
                out.add([s[sp.ASSISTANT_END]], True)
                in_turn, pending_calls = False, 0
            start, end = (sp.SYSTEM_START, sp.SYSTEM_END) if role == "system" else (sp.USER_START, sp.USER_END)
            out.add([s[start]] + tok.encode(content) + [s[end]], False)
        elif role == "assistant":
            if not in_turn:
                out.add([s[sp.ASSISTANT_START]], False)
                in_turn = True
            out.add(tok.encode(content), True)
            for call in msg.get("tool_calls") or []:
                out.add([s[sp.TOOL_CALL_START]] + tok.encode(tool_call_json(call)) + [s[sp.TOOL_CALL_END]], True)
                pending_calls += 1
        else:  # tool
            if not in_turn or pending_calls == 0:
                raise ChatFormatError(f"message {i} is a tool output that answers no tool call")
            pending_calls -= 1
            out.add([s[sp.TOOL_OUTPUT_START]] + tok.encode(content) + [s[sp.TOOL_OUTPUT_END]], False)
    last = messages[-1]["role"] if messages else None
    if add_generation_prompt:
        if last == "tool":
            return out
        if in_turn:
            out.add([s[sp.ASSISTANT_END]], True)
        out.add([s[sp.ASSISTANT_START]], False)
    elif in_turn:
        out.add([s[sp.ASSISTANT_END]], True)
    return out
