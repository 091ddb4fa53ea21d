"""Streaming with ``logprobs`` through the official `openai` client: the chunks of a stream carry,
between them, exactly the log-probabilities the same request gets without streaming (OpenAI's
completion ``logprobs`` and chat ``choices[].logprobs.content[]`` shapes)."""

from __future__ import annotations

import openai
import pytest
from helpers_post import tiny_server

from codefoundry.infer.server import ServerLimits

LIMITS = ServerLimits(max_tokens=64, max_concurrent=16)


@pytest.fixture(scope="module")
def client():
    with tiny_server(LIMITS) as (url, *_):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_stream_carries_the_unstreamed_logprobs(client):
    kw = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "logprobs": 2,
          "echo": True, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0]
    tokens, logprobs, top, offsets, text = [], [], [], [], ""
    for chunk in client.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            logprobs += choice.logprobs.token_logprobs
            top += choice.logprobs.top_logprobs
            offsets += choice.logprobs.text_offset
    assert text == full.text and len(tokens) == 16
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert offsets[0] == len("def add(a, b):") and "".join(tokens) == text[offsets[0]:]
    assert logprobs == pytest.approx(full.logprobs.token_logprobs, abs=1e-4)
    assert [list(t) for t in top] == [list(t) for t in full.logprobs.top_logprobs]
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(lp, abs=1e-4) for t, lp in zip(top, logprobs))


def test_completion_stream_with_n_keeps_each_choice_apart(client):
    chunks = list(client.completions.create(model="tiny", prompt="x = ", max_tokens=8, temperature=1.0, seed=3, n=2,
                                            logprobs=0, stream=True, extra_body={"ignore_eos": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        assert len(tokens) == 8 and "".join(tokens) == "".join(c.text for c in mine)
        assert all(c.logprobs.top_logprobs is None for c in mine if c.logprobs)


def test_chat_stream_carries_the_unstreamed_logprobs(client):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "write a loop"}], "max_tokens": 12,
          "temperature": 0, "logprobs": True, "top_logprobs": 3}
    full = client.chat.completions.create(**kw)
    expected = full.choices[0].logprobs.content
    content, text = [], ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None:
            content += choice.logprobs.content
    assert text == full.choices[0].message.content
    assert len(content) == len(expected) == full.usage.completion_tokens
    assert [c.token for c in content] == [c.token for c in expected]
    assert [c.bytes for c in content] == [c.bytes for c in expected]
    assert [c.logprob for c in content] == pytest.approx([c.logprob for c in expected], abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)  # greedy
