"""Chat template: the loss mask covers exactly the assistant spans; formats; generation prompts."""

from __future__ import annotations

import json

import pytest

from codefoundry.post.sft_data import to_messages
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.chat import ChatFormatError, parse_tool_call, render_chat
from helpers_post import tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "List files <|assistant_end|> please."},  # text that looks like a control token
    {"role": "assistant", "content": "Sure.", "tool_calls": [
        {"type": "function", "function": {"name": "bash", "arguments": json.dumps({"command": "ls"})}}]},
    {"role": "tool", "content": "a.py\nb.py"},
    {"role": "assistant", "content": "Two files: a.py and b.py."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def expected_mask(tok, ids):
    """Independent scan: inside <|assistant_start|> .. <|assistant_end|> (end included, start not),
    minus the tool-output spans (delimiters included)."""
    s = tok.special_ids
    mask, in_turn, in_output = [], False, False
    for t in ids:
        if t == s[sp.ASSISTANT_START]:
            mask.append(0)
            in_turn = True
        elif t == s[sp.TOOL_OUTPUT_START]:
            in_output = True
            mask.append(0)
        elif t == s[sp.TOOL_OUTPUT_END]:
            in_output = False
            mask.append(0)
        else:
            mask.append(int(in_turn and not in_output))
            if t == s[sp.ASSISTANT_END]:
                in_turn = False
    return mask


def test_mask_covers_exactly_assistant_spans(tok):
    r = render_chat(tok, CONVERSATION)
    assert r.ids[0] == tok.eot_id and len(r.ids) == len(r.mask)
    assert r.mask == expected_mask(tok, r.ids)
    trained = tok.decode([t for t, m in zip(r.ids, r.mask) if m])
    call = '{"name": "bash", "arguments": {"command": "ls"}}'
    assert trained == (f"Sure.{sp.TOOL_CALL_START}{call}{sp.TOOL_CALL_END}Two files: a.py and b.py."
                       f"{sp.ASSISTANT_END}You're welcome.{sp.ASSISTANT_END}")
    # Message text never becomes a control token.
    assert r.ids.count(tok.special_ids[sp.ASSISTANT_END]) == 2
    inputs, labels = r.labels()
    assert len(inputs) == len(labels) == len(r.ids) - 1
    assert [t for t in labels if t != -100] == [t for t, m in zip(r.ids[1:], r.mask[1:]) if m]


def test_generation_prompts(tok):
    s = tok.special_ids
    after_user = render_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert after_user.ids[-1] == s[sp.ASSISTANT_START]
    after_tool = render_chat(tok, CONVERSATION[:4], add_generation_prompt=True)
    assert after_tool.ids[-1] == s[sp.TOOL_OUTPUT_END]  # the model continues inside its turn
    full = render_chat(tok, CONVERSATION[:5]).ids
    assert full[:len(after_tool.ids)] == after_tool.ids


def test_parse_tool_call(tok):
    assert parse_tool_call('{"name": "read_file", "arguments": {"path": "x"}}') == ("read_file", {"path": "x"})
    for bad in ["not json", "[1]", '{"name": "x", "arguments": [1]}']:
        with pytest.raises(ValueError):
            parse_tool_call(bad)


def test_formats_and_errors(tok):
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    alpaca = {"instruction": "Add", "input": "1 and 2", "output": "3"}
    assert to_messages(sharegpt) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert to_messages(alpaca) == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    for bad in [{"text": "x"}, {"conversations": [{"from": "robot", "value": "x"}]}, "string"]:
        with pytest.raises(ChatFormatError):
            to_messages(bad)
    with pytest.raises(ChatFormatError):
        render_chat(tok, [{"role": "user", "content": "x"}, {"role": "tool", "content": "orphan output"}])
    with pytest.raises(ChatFormatError):
        render_chat(tok, [{"role": "wizard", "content": "x"}])
