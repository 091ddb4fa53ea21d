"""Chat: replies with tool calls (two-phase decoding), history commands, the REPL, and the
`generate --speculative` path of the CLI."""

from __future__ import annotations

import io

import pytest
from helpers_post import make_checkpoint, tiny_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.cli import main
from codefoundry.infer.chat import ChatSession, assistant_reply, repl
from codefoundry.infer.engine import Request, SamplingParams
from codefoundry.tokenizer import special as sp


@pytest.fixture(scope="module")
def model_tok():
    return load_model(tiny_checkpoint())


def test_reply_with_tool_call_decodes_in_two_phases(model_tok):
    _, tok = model_tok
    s = tok.special_ids
    call = '{"name": "bash", "arguments": {"command": "ls"}}'
    script = [(tok.encode("Let me look."), s[sp.TOOL_CALL_START]), (tok.encode(call), s[sp.TOOL_CALL_END])]
    seen: list[Request] = []

    def fake_run(req: Request) -> None:  # stands in for the engine: replays scripted tokens
        ids, end = script[len(seen)]
        seen.append(req)
        req.completion_ids, req.text = ids, tok.decode(ids)
        req.finish("stop", end)

    reply = assistant_reply(tok, [{"role": "user", "content": "files?"}], SamplingParams(max_tokens=50), fake_run, 256)
    assert (reply.content, reply.tool_call, reply.finish_reason) == ("Let me look.", call, "tool_calls")
    assert seen[1].prompt_ids == seen[0].prompt_ids + script[0][0] + [s[sp.TOOL_CALL_START]]
    assert reply.completion_tokens == len(script[0][0]) + 1 + len(script[1][0])


def test_history_commands(model_tok, tmp_path):
    model, tok = model_tok
    chat = ChatSession(model, tok, SamplingParams(max_tokens=4), system="be brief")
    streamed: list[str] = []
    reply = chat.send("hello", on_text=streamed.append)
    assert "".join(streamed) == reply.content
    chat.send("again")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.command("/undo") == "(dropped the last exchange)" and len(chat.messages) == 3
    saved = tmp_path / "chat.json"
    chat.command(f"/save {saved}")
    chat.command("/reset")
    assert chat.messages == [{"role": "system", "content": "be brief"}]
    assert chat.command(f"/load {saved}") == "(loaded 3 messages)" and chat.messages[1]["content"] == "hello"
    chat.command("/system ")
    assert all(m["role"] != "system" for m in chat.messages)
    assert "cannot load" in chat.command(f"/load {tmp_path / 'missing.json'}")
    assert chat.command("/quit") is None and "/undo" in chat.command("/help")


def test_repl_streams_and_quits(model_tok):
    model, tok = model_tok
    lines = iter(["hi", "/history", "/quit", "never read"])
    out = io.StringIO()
    repl(ChatSession(model, tok, SamplingParams(max_tokens=3)), read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "assistant> " in text and "[user] hi" in text and "never read" not in text


def test_generate_speculative_matches_greedy(tmp_path, capsys):
    target = tiny_checkpoint()
    draft = make_checkpoint(tmp_path / "draft", seed=3)
    args = ["generate", "--checkpoint", str(target), "--prompt", "def f(x):", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative", "draft", "--draft-checkpoint", str(draft)]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--speculative", "draft"]) == 2  # no draft given: one-line error
