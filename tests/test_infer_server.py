"""The HTTP server through the official `openai` client on 127.0.0.1: completions, chat,
streaming with usage, /infill, concurrent batching, and 4xx errors that leave it serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from helpers_post import tiny_server

from codefoundry.infer.server import ServerLimits

LIMITS = ServerLimits(max_body_bytes=20_000, max_tokens=64, max_concurrent=40, read_timeout_s=2.0)


@pytest.fixture(scope="module")
def server():
    with tiny_server(LIMITS) as (url, engine, _, _):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_completions_plain_and_streamed(client):
    full = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop") and full.usage.completion_tokens <= 12
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write hello world"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_infill(server):
    base, _ = server
    status, body = post(base + "/infill", json.dumps({"prefix": "def f(x):\n    return ", "suffix": "\n",
                                                      "max_tokens": 8}).encode())
    assert status == 200 and isinstance(body["content"], str) and body["usage"]["completion_tokens"] <= 8


def test_concurrent_requests_are_batched(client, server):
    _, engine = server

    def one(i: int) -> str:
        return client.completions.create(model="tiny", prompt=f"x = {i}", max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(texts) == 8
    assert engine.peak_rows > 1  # requests shared the batch


def test_errors_are_4xx_json_and_server_keeps_serving(client, server):
    base, _ = server
    status, body = post(base + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post(base + "/v1/completions", json.dumps({"prompt": "x" * 30_000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = post(base + "/v1/nothing", b"{}")
    assert status == 404
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=None, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 300, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "orphan"}], max_tokens=5)
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=3).usage.completion_tokens <= 3
    assert [m.id for m in client.models.list().data] == ["tiny"]
