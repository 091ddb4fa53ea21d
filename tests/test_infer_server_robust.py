"""Attacks on the server (issue 18 items 4-8) and its operations (issue 16): each answered with
the right status and the server keeps serving. Raw sockets where the HTTP client would not
misbehave on purpose."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from helpers_post import tiny_server

from codefoundry.infer.engine import Engine, Request, SamplingParams
from codefoundry.infer.server import BackgroundServer, ServerLimits, make_app
from codefoundry.tokenizer import special as sp

LIMITS = ServerLimits(max_body_bytes=20_000, max_tokens=200, max_concurrent=40, read_timeout_s=1.0)


@pytest.fixture(scope="module")
def served():
    with tiny_server(LIMITS) as served:
        yield served


def post(url: str, body, timeout: float = 60) -> tuple[int, dict, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def raw(url: str, payload: bytes, wait: float = 5.0) -> bytes:
    """Send ``payload`` on a fresh connection and return whatever comes back before it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(payload)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_bad_numbers_never_fail_batch_neighbours(served):
    """Item 4: temperature 1e-300 decodes (greedily); seed 2**70 is a 400; the good ones all answer."""
    url, *_ = served
    bodies = [{"prompt": "def f(", "max_tokens": 8, "temperature": 1e-300},
              {"prompt": "def f(", "max_tokens": 8, "temperature": 0.9, "seed": 2 ** 70}]
    bodies += [{"prompt": f"x = {i}", "max_tokens": 8, "temperature": 0.8, "seed": i} for i in range(3)]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda b: post(url + "/v1/completions", b), bodies))
    assert [r[0] for r in results] == [200, 400, 200, 200, 200]
    assert results[1][1]["error"]["param"] == "seed"
    greedy = post(url + "/v1/completions", {"prompt": "def f(", "max_tokens": 8, "temperature": 0})[1]
    assert results[0][1]["choices"][0]["text"] == greedy["choices"][0]["text"]
    for bad in ({"temperature": float("inf")}, {"temperature": -1}, {"top_p": 0}):
        status, body, _ = post(url + "/v1/completions", json.dumps({"prompt": "x", **bad}).replace(
            "Infinity", "1e999").encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_32_concurrent_streams_all_served(served):
    """Item 5: no connection reset at 32 concurrent streaming clients (backlog 2048, limit 40)."""
    url, *_ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    def one(i: int) -> int:
        chunks = client.completions.create(model="tiny", prompt=f"# {i}\n", max_tokens=16, stream=True,
                                           extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        return [c.usage.completion_tokens for c in chunks if c.usage][0]

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(one, range(32))) == [16] * 32


def test_over_the_concurrency_limit_is_503_with_retry_after(served):
    url, engine, model, tok = served
    limits = ServerLimits(max_tokens=200, max_concurrent=1)
    hook = model.register_forward_hook(lambda *_: time.sleep(0.02))
    try:
        with BackgroundServer(make_app(engine, tok, "tiny", limits), limits=limits) as other:
            slow = threading.Thread(target=post, args=(other + "/v1/completions",
                                                       {"prompt": "x", "max_tokens": 100, "ignore_eos": True}))
            slow.start()
            time.sleep(0.5)
            status, body, headers = post(other + "/v1/completions", {"prompt": "y", "max_tokens": 2})
            slow.join()
    finally:
        hook.remove()
    assert status == 503 and headers["Retry-After"] == "1" and body["error"]["code"] == "server_busy"


def test_slow_partial_and_malformed_requests(served):
    """Item 6: partial heads and bodies time out (408), a bad Content-Length gets 400."""
    url, *_ = served
    start = time.monotonic()
    head = raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    assert head.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 4
    body = raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"prompt\"")
    assert body.startswith(b"HTTP/1.1 408") and b"request_timeout" in body
    for length in (b"-1", b"abc", b"1, 2"):
        bad = raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
        assert bad.startswith(b"HTTP/1.1 400"), bad[:40]
    big = raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413")
    assert post(url + "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_hostile_text_is_400(served):
    """Item 7: a lone surrogate, content parts with non-string text, tool_calls: 5."""
    url, *_ = served
    surrogate = b'{"prompt": "\\ud800 hi", "max_tokens": 2}'
    assert post(url + "/v1/completions", surrogate)[0] == 400
    chat = url + "/v1/chat/completions"
    assert post(chat, b'{"messages": [{"role": "user", "content": "\\udfff"}]}')[0] == 400
    assert post(chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})[0] == 400
    assert post(chat, {"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "", "tool_calls": 5}]})[0] == 400
    assert post(url + "/infill", b'{"prefix": "\\ud83d"}')[0] == 400
    status, body, _ = post(chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  "max_tokens": 3})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_disconnected_client_cancels_its_row(served, stream):
    """Item 8: a client that hangs up (streaming or not) frees its row within a moment."""
    url, engine, model, _ = served
    hook = model.register_forward_hook(lambda *_: time.sleep(0.02))
    try:
        before = metric(url, 'codefoundry_generations_total{reason="cancelled"}')
        body = json.dumps({"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": stream}).encode()
        host, port = url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait(lambda: engine.active_rows == 1)
        s.close()
        assert wait(lambda: engine.active_rows == 0, 3.0)
        assert wait(lambda: metric(url, 'codefoundry_generations_total{reason="cancelled"}') == before + 1)
    finally:
        hook.remove()


def wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_chat_tool_call_through_the_openai_client(served):
    """A model that calls a tool: OpenAI tool_calls, plain and streamed (scripted logits)."""
    url, _, model, tok = served
    s = tok.special_ids
    script = [s[sp.TOOL_CALL_START]] + tok.encode('{"name": "bash", "arguments": {"command": "ls"}}') + \
             [s[sp.TOOL_CALL_END]]
    at = [0]

    def force(module, args, logits):
        if args[0].shape[1] > 1:  # a prefill: phase 1 starts the call, phase 2 (after its start token) the JSON
            at[0] = int(args[0][0, -1] == s[sp.TOOL_CALL_START])
        out = logits.clone()
        out[:, -1, :] = -1e4
        out[:, -1, script[min(at[0], len(script) - 1)]] = 0
        at[0] += 1
        return out

    hook = model.register_forward_hook(force)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "list files"}]
    try:
        full = client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=60)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=60,
                                                     stream=True))
    finally:
        hook.remove()
    call = full.choices[0].message.tool_calls[0]
    assert full.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("bash", {"command": "ls"})
    streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert streamed[0][0].function.name == "bash" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_logprobs_echo_and_seed(served):
    url, *_ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny", prompt="def f(", max_tokens=6, n=2, temperature=1.0, seed=3,
                                    logprobs=2, echo=True)
    again = client.completions.create(model="tiny", prompt="def f(", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [c.index for c in out.choices] == [0, 1] and all(c.text.startswith("def f(") for c in out.choices)
    assert [c.text.removeprefix("def f(") for c in out.choices] == [c.text for c in again.choices]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == len("def f(")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the top token


def test_metrics_schema_docs_and_access_log(served):
    url, *_ = served
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    access = logging.getLogger("codefoundry.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        assert post(url + "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200
        deadline = time.monotonic() + 5
        while not records and time.monotonic() < deadline:  # the line is written once the last byte has gone
            time.sleep(0.01)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    entry = json.loads(records[-1].getMessage())
    assert entry["path"] == "/v1/completions" and entry["status"] == 200 and entry["duration_ms"] > 0
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    for name in ("codefoundry_requests_total", "codefoundry_prompt_tokens_total", "codefoundry_completion_tokens_total",
                 "codefoundry_queue_depth", "codefoundry_batch_occupancy", "codefoundry_time_to_first_token_seconds",
                 "codefoundry_tokens_per_second"):
        assert name in text
    schema = json.load(urllib.request.urlopen(url + "/openapi.json"))
    assert {"/v1/completions", "/v1/chat/completions", "/infill", "/v1/models", "/health"} <= set(schema["paths"])
    assert b"swagger" in urllib.request.urlopen(url + "/docs").read().lower()
    assert b"<title>codefoundry</title>" in urllib.request.urlopen(url + "/").read()


def test_close_finishes_running_rows_then_cancels(served):
    """Graceful shutdown: rows finish within the grace period; past it they are cancelled."""
    _, _, model, tok = served
    engine = Engine(model, tok, max_batch=2)
    short = engine.submit(Request(tok.encode("x"), SamplingParams(max_tokens=20)))
    engine.close(grace_s=30)
    assert short.finish_reason == "length" and len(short.completion_ids) == 20
    hook = model.register_forward_hook(lambda *_: time.sleep(0.02))
    try:
        engine = Engine(model, tok, max_batch=2)
        long = engine.submit(Request(tok.encode("x"), SamplingParams(max_tokens=200)))
        engine.close(grace_s=0.3)
    finally:
        hook.remove()
    assert long.finish_reason == "cancelled" and long.done.is_set()
