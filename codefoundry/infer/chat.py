"""Chat: one assistant reply (text, maybe a tool call) and the interactive `codefoundry chat` session.

:func:`assistant_reply` generates in two phases: the text streams until the model ends its
turn or opens a tool call; on ``<|tool_call_start|>`` a second, non-streamed phase reads
the call up to ``<|tool_call_end|>``. The ``run`` callback decodes a request, directly
(CLI) or through the server's batching engine, so every caller shares this logic.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from codefoundry.errors import UserError
from codefoundry.infer.engine import Request, RequestRejected, SamplingParams, run_batch
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.chat import render_chat

RunRequest = Callable[[Request], None]


@dataclass
class Reply:
    content: str
    tool_call: str | None  # the raw JSON between the tool-call tokens, if the model made a call
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int


def assistant_reply(tok: CodeTokenizer, messages: list[dict[str, Any]], params: SamplingParams, run: RunRequest,
                    context: int, on_text: Callable[[str], None] | None = None, tools: bool = True,
                    schemas: list[dict[str, Any]] | None = None) -> Reply:
    """The model's next assistant message for ``messages`` (``schemas``: the request's tool
    definitions, for a chat template that lists them).

    RequestRejected when the conversation leaves no room in the ``context`` to answer.
    """
    s = tok.special_ids
    prompt = render_chat(tok, messages, add_generation_prompt=True, tools=schemas).ids
    room = context - len(prompt)
    if room < 1:
        raise RequestRejected(f"the conversation ({len(prompt)} tokens) fills the model's context of {context}")
    ends = {s[sp.ASSISTANT_END], tok.eot_id} | ({s[sp.TOOL_CALL_START]} if tools else set())
    text = Request(prompt, replace(params, max_tokens=min(params.max_tokens, room), stop_ids=ends), on_text)
    run(text)
    used = len(text.completion_ids)
    if text.finish_token != s[sp.TOOL_CALL_START]:
        return Reply(text.text, None, text.finish_reason or "error", len(prompt), used)
    call_prompt = prompt + text.completion_ids + [s[sp.TOOL_CALL_START]]
    room = context - len(call_prompt)
    if room < 1:
        return Reply(text.text, None, "length", len(prompt), used)
    call = Request(call_prompt, replace(params, max_tokens=min(params.max_tokens, room), stop=[],
                                        stop_ids={s[sp.TOOL_CALL_END], s[sp.ASSISTANT_END], tok.eot_id}))
    run(call)
    reason = "tool_calls" if call.finish_token == s[sp.TOOL_CALL_END] else (call.finish_reason or "error")
    return Reply(text.text, call.text, reason, len(prompt), used + 1 + len(call.completion_ids))


HELP = """commands: /reset (new conversation)  /undo (drop the last exchange)  /history  /system TEXT
          /save PATH  /load PATH (JSON messages)  /help  /quit"""


class ChatSession:
    """A multi-turn conversation with a model, plus the history commands of the REPL."""

    def __init__(self, model, tok: CodeTokenizer, params: SamplingParams, system: str | None = None) -> None:
        self.model, self.tok, self.params = model, tok, params
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Add a user message, stream the reply through ``on_text``, and keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            reply = assistant_reply(self.tok, self.messages, self.params,
                                    lambda r: run_batch(self.model, self.tok, [r]), self.model.cfg.max_seq_len,
                                    on_text, tools=False)
        except RequestRejected as exc:
            self.messages.pop()
            raise UserError(f"{exc}; /reset or /undo to make room") from None
        self.messages.append({"role": "assistant", "content": reply.content})
        return reply

    def command(self, line: str) -> str | None:
        """Run a /command; return text to show, or None to quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return None
        if name == "/reset":
            self.reset()
            return "(new conversation)"
        if name == "/undo":
            last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
            if last_user is None:
                return "(nothing to undo)"
            del self.messages[last_user:]
            return "(dropped the last exchange)"
        if name == "/history":
            return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages) or "(empty)"
        if name == "/system":
            self.system = arg or None
            self.messages = [m for m in self.messages if m["role"] != "system"]
            if self.system:
                self.messages.insert(0, {"role": "system", "content": self.system})
            return f"(system prompt {'set' if self.system else 'cleared'})"
        if name == "/save" and arg:
            Path(arg).write_text(json.dumps(self.messages, indent=2) + "\n")
            return f"(saved {len(self.messages)} messages to {arg})"
        if name == "/load" and arg:
            try:
                messages = json.loads(Path(arg).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                return f"(cannot load {arg}: {exc.__class__.__name__})"
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                return f"(cannot load {arg}: expected a JSON list of messages)"
            self.messages = messages
            return f"(loaded {len(messages)} messages)"
        return HELP


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read lines until /quit or end of input, streaming each reply to ``out``; /lines are commands."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write("codefoundry chat: /help for commands\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            shown = session.command(line)
            if shown is None:
                return
            write(shown + "\n")
            continue
        write("assistant> ")
        try:
            session.send(line, on_text=write)
        except UserError as exc:
            write(f"(error: {exc})")
        write("\n")
