"""`codefoundry serve`: the OpenAI-compatible API on FastAPI + uvicorn over the continuous-batching engine.

* ``POST /v1/completions`` — text completion (``prompt``: a string or a list of strings; ``n``,
  ``echo``, ``logprobs``);
* ``POST /v1/chat/completions`` — chat in the model's template; with ``tools`` a tool call made
  by the model comes back as OpenAI ``tool_calls``; ``logprobs``/``top_logprobs``;
* ``POST /infill`` — editor completion: ``{"prefix", "suffix"}`` (llama.cpp's
  ``input_prefix``/``input_suffix`` too) -> ``{"content"}``;
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (a chat and
  infill page), ``/openapi.json`` and ``/docs``.

Generation endpoints stream server-sent events with ``"stream": true`` and report ``usage``;
a streamed chunk carries the ``logprobs`` of the tokens decoded since the previous one, in
OpenAI's shapes, when they are asked for.
Errors keep OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (validation included), 401, 404, 408 for a client too slow to send its request, 413
for a body over the limit, 503 with ``Retry-After`` beyond the concurrency limit or while
shutting down, 500 if generation itself fails. Every generation runs through one helper
(:class:`_Job`) that streams text as it becomes safe and cancels the engine rows of a client
that goes away, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from codefoundry.infer import api_models as m
from codefoundry.infer.chat import Reply, assistant_reply
from codefoundry.infer.engine import Engine, EngineBusy, Request, RequestRejected, SamplingParams
from codefoundry.infer.metrics import ServerMetrics
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError, parse_tool_call, render_chat

log = logging.getLogger(__name__)
access_log = logging.getLogger("codefoundry.access")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/infill")
Work = Callable[[Callable[[str], None], Callable[[Request], None]], Any]  # work(on_text, run) -> result


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256
    max_prompts: int = 16  # prompts x n in one /v1/completions request
    max_concurrent: int = 64  # generation requests in flight; beyond that 503 + Retry-After
    read_timeout_s: float = 20.0  # a client that takes longer to send its request head or body is cut off
    timeout_s: float = 300.0  # a generation still running after this is cancelled
    grace_s: float = 10.0  # on shutdown, running rows get this long to finish


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc.status, str(exc), exc.code, exc.param), exc.status, headers=headers)


class _Done:
    """The end of one work of a :class:`_Job`: its result, or the exception it raised."""

    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error


class _Outbox:
    """Carries what decoding threads hand over to the event loop. ``put`` appends under a lock and
    schedules one delivery only when none is pending, so a decoding step that feeds 32 streams
    wakes the loop once, not 32 times; whatever piles up while the loop is busy goes in one go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[_Job, tuple[int, Any]]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, job: _Job, item: tuple[int, Any]) -> None:
        with self.lock:
            self.items.append((job, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed (shutdown): nobody is left to deliver to
            with self.lock:
                self.items, self.scheduled = [], False

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for job, item in items:
            job.receive(item)


class _Job:
    """Generations handed to the engine, and their events handed to the event loop: ``(index,
    text)`` as text becomes safe to show, then ``(index, _Done)``. A plain :class:`Request` is
    queued from the loop itself and reports back through its callbacks; a ``work(on_text, run)``
    (a chat reply, which may decode twice) runs on a thread of its own, where ``run`` decodes a
    request and waits for it. When the consumer stops (a streaming client went away) or the
    client disconnects (a watcher task waits for that), every engine request the job made is
    cancelled, which frees its row at the next step."""

    def __init__(self, api: Api, works: list[Work | Request]) -> None:
        self.api, self.outbox = api, api.outbox()
        self.items: list[tuple[int, Any]] = []
        self.ready = asyncio.Event()
        self.requests: list[Request] = []
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.closed = False
        self.lock = threading.Lock()
        self.pending = len(works)
        for i, work in enumerate(works):
            if isinstance(work, Request):
                self._decode(i, work)
            else:
                threading.Thread(target=self._target, args=(i, work), daemon=True).start()

    def _put(self, item: tuple[int, Any]) -> None:
        self.outbox.put(self, item)

    def receive(self, item: tuple[int, Any]) -> None:
        """On the event loop: one event arrived."""
        if isinstance(item[1], _Done) and item[0] in self.timers:
            self.timers.pop(item[0]).cancel()
        self.items.append(item)
        self.ready.set()

    def _decode(self, index: int, request: Request) -> None:
        """Queue ``request`` without a thread: its text and its end come back through its callbacks
        (on the decoding thread); it is cancelled after the generation timeout."""
        def done(request: Request) -> None:
            try:
                self.api.outcome(request)
                self._put((index, _Done(request)))
            except ApiError as exc:
                self._put((index, _Done(error=exc)))

        request.on_text, request.on_done = (lambda text: self._put((index, text))), done
        with self.lock:
            self.requests.append(request)
        try:
            self.api.submit(request)
        except ApiError as exc:
            self._put((index, _Done(error=exc)))
            return
        self.timers[index] = asyncio.get_running_loop().call_later(self.api.limits.timeout_s, request.cancel)

    def _run(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)
            if self.closed:
                request.cancel()
        self.api.run(request)

    def _target(self, index: int, work: Work) -> None:
        try:
            self._put((index, _Done(work(lambda text: self._put((index, text)), self._run))))
        except Exception as exc:
            self._put((index, _Done(error=exc)))

    async def events(self, http: HttpRequest) -> AsyncIterator[tuple[int, Any]]:
        """The events in order; text that piled up for one work while the consumer was busy comes
        as one item (fewer, larger stream chunks when the server is behind, one per token when not).
        Ends early when the client disconnects."""
        watcher = asyncio.create_task(self._watch(http))
        try:
            while self.pending:
                await self.ready.wait()
                self.ready.clear()
                if self.closed:
                    return
                items, self.items = self.items, []
                for index, item in _joined(items):
                    if isinstance(item, _Done):
                        self.pending -= 1
                        if item.error is not None:
                            raise item.error
                    yield index, item
        finally:
            watcher.cancel()
            self.close()

    async def _watch(self, http: HttpRequest) -> None:
        """Wait for the client to disconnect (the request body has been read), then close the job."""
        try:
            while (await http.receive())["type"] != "http.disconnect":
                pass
        finally:  # disconnected, or cancelled once the job has ended: closing is right either way
            self.close()
            self.ready.set()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for request in self.requests:
                request.cancel()


def _joined(items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """``items`` with the text of each index joined into its first text item (per index, order kept)."""
    out: list[tuple[int, Any]] = []
    text_at: dict[int, int] = {}
    for index, item in items:
        if isinstance(item, str) and index in text_at:
            at = text_at[index]
            out[at] = (index, out[at][1] + item)
            continue
        if isinstance(item, str):
            text_at[index] = len(out)
        else:
            text_at.pop(index, None)
        out.append((index, item))
    return out


class Api:
    """Validation, generation and response bodies."""

    def __init__(self, engine: Engine, tokenizer: CodeTokenizer, model_name: str, limits: ServerLimits,
                 metrics: ServerMetrics) -> None:
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.limits, self.metrics = limits, metrics
        self._outbox: _Outbox | None = None

    def outbox(self) -> _Outbox:
        """The hand-over from decoding threads to the running event loop."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        return self._outbox

    def params(self, body: m.Sampling, stop_ids: set[int], temperature: float = 1.0,
               max_tokens: int | None = None, logprobs: int | None = None) -> SamplingParams:
        max_tokens = max_tokens if max_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {self.limits.max_tokens}", param="max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens or min(self.limits.default_max_tokens, self.limits.max_tokens),
                temperature=temperature if body.temperature is None else body.temperature,
                top_p=body.top_p, top_k=body.top_k, stop=body.stops(),
                stop_ids=set() if body.ignore_eos else stop_ids, seed=body.seed, logprobs=logprobs)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def fit(self, prompt_ids: list[int], params: SamplingParams, explicit: bool) -> SamplingParams:
        """``params`` for this prompt: 400 unless prompt + max_tokens fits the context. When the client
        left max_tokens unset, the default shrinks to the room the prompt leaves."""
        room = self.engine.context - len(prompt_ids)
        if not explicit:
            params = replace(params, max_tokens=max(1, min(params.max_tokens, room)))
        try:
            self.engine.check(Request(prompt_ids, params))
        except EngineBusy as exc:
            raise ApiError(503, str(exc), "server_busy") from None
        except RequestRejected as exc:
            raise ApiError(400, str(exc), "context_length_exceeded") from None
        return params

    def submit(self, request: Request) -> None:
        """Queue ``request`` for the engine (503 when busy, 400 when it cannot fit)."""
        try:
            self.engine.submit(request)
        except EngineBusy as exc:
            raise ApiError(503, str(exc), "server_busy") from None
        except RequestRejected as exc:
            raise ApiError(400, str(exc), "context_length_exceeded") from None

    def outcome(self, request: Request) -> None:
        """Record a finished ``request``; 500 if generation itself failed."""
        self.metrics.observe(request)
        if request.finish_reason == "error":
            raise ApiError(500, f"generation failed: {request.error}", "server_error")

    def run(self, request: Request) -> None:
        """Decode ``request`` through the engine and wait for it (cancelled after the timeout)."""
        self.submit(request)
        if not request.done.wait(self.limits.timeout_s):
            request.cancel()
            request.done.wait()
        self.outcome(request)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text) or [self.tok.bos_id]

    def meta(self, prefix: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}

    # --- /v1/completions ---------------------------------------------------------------------

    async def completions(self, body: m.CompletionRequest, http: HttpRequest) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) * body.n > self.limits.max_prompts:
            raise ApiError(400, f"at most {self.limits.max_prompts} completions (prompts x n) per request", param="n")
        params = self.params(body, {self.tok.eot_id}, logprobs=body.logprobs)
        requests = []
        for text in prompts:
            ids = self.encode(text)
            fitted = self.fit(ids, params, body.max_tokens is not None)
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                requests.append(Request(ids, replace(fitted, seed=seed)))
        job = _Job(self, requests)
        meta = {**self.meta("cmpl"), "object": "text_completion"}
        echo = [prompts[i // body.n] if body.echo else "" for i in range(len(requests))]
        if body.stream:
            sent = [0] * len(requests)  # tokens whose log-probabilities each choice has streamed
            offsets = [len(text) for text in echo]

            def logprobs(i: int) -> dict[str, Any] | None:
                """The log-probabilities of the tokens recorded since choice i's last chunk."""
                if body.logprobs is None:
                    return None
                out, offsets[i] = self._completion_logprobs(requests[i], sent[i], offsets[i])
                sent[i] += len(out["tokens"])
                return out

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i, text in enumerate(echo):
                    if text:
                        yield {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
                async for i, item in job.events(http):
                    if isinstance(item, str):
                        choice = {"index": i, "text": item, "logprobs": logprobs(i), "finish_reason": None}
                    else:
                        choice = {"index": i, "text": "", "logprobs": logprobs(i), "finish_reason": _reason(item.result)}
                    yield {**meta, "choices": [choice]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {**meta, "choices": [], "usage": _usage(requests)}
            return _sse(chunks())
        await _drain(job, http)
        choices = [{"index": i, "text": echo[i] + r.text, "finish_reason": _reason(r),
                    "logprobs": None if body.logprobs is None else self._completion_logprobs(r, 0, len(echo[i]))[0]}
                   for i, r in enumerate(requests)]
        return JSONResponse({**meta, "choices": choices, "usage": _usage(requests)})

    def _completion_logprobs(self, request: Request, start: int, offset: int) -> tuple[dict[str, Any], int]:
        """OpenAI's completion ``logprobs`` of the tokens recorded from ``start`` on, the first at
        character ``offset`` of the choice's text; and the offset after them. Safe while the
        decoding thread appends (a token's id is recorded before its log-probability)."""
        entries = request.logprobs[start:]
        tokens = [self.tok.decode([t]) for t in request.completion_ids[start:start + len(entries)]]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [{self.tok.decode([a]): lp for a, lp in alts} for _, alts in entries]
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": top if request.params.logprobs else None, "text_offset": offsets}, offset

    # --- /v1/chat/completions ----------------------------------------------------------------

    async def chat(self, body: m.ChatRequest, http: HttpRequest) -> Response:
        if body.n > self.limits.max_prompts:
            raise ApiError(400, f"at most {self.limits.max_prompts} choices per request", param="n")
        messages = [msg.model_dump(exclude_none=True) for msg in body.messages]
        schemas = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        tools = bool(schemas) and body.tool_choice != "none"
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.params(body, set(), max_tokens=max_tokens,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        try:  # render once up front so a bad conversation gets a 400 even when streaming
            prompt = render_chat(self.tok, messages, add_generation_prompt=True, tools=schemas).ids
        except ChatFormatError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        self.fit(prompt, replace(params, max_tokens=1), True)
        choices = [replace(params, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]
        calls: list[list[Request]] = [[] for _ in choices]

        def work(i: int) -> Work:
            def reply(on_text: Callable[[str], None], run: Callable[[Request], None]) -> Reply:
                def run_and_keep(request: Request) -> None:
                    calls[i].append(request)
                    run(request)
                try:
                    return assistant_reply(self.tok, messages, choices[i], run_and_keep, self.engine.context,
                                           on_text, tools, schemas)
                except RequestRejected as exc:
                    raise ApiError(400, str(exc), "context_length_exceeded") from None
            return reply

        job = _Job(self, [work(i) for i in range(body.n)])
        meta = {**self.meta("chatcmpl"), "object": "chat.completion"}
        if body.stream:
            chunk_meta = {**meta, "object": "chat.completion.chunk"}
            sent = [0] * body.n  # tokens whose log-probabilities each choice has streamed

            def chunk(i: int, delta: dict[str, Any], finish: str | None = None, logprobs: bool = True) -> dict[str, Any]:
                """One choice's chunk, with the log-probabilities of the tokens recorded since its last one."""
                content = None
                if logprobs and body.logprobs and calls[i]:  # calls[i][0] is the request that streams text
                    content = self._chat_logprobs(calls[i][0], sent[i])
                    sent[i] += len(content)
                return {**chunk_meta, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None if content is None else {"content": content}}]}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i in range(body.n):
                    yield chunk(i, {"role": "assistant", "content": ""}, logprobs=False)
                replies: list[Reply] = []
                async for i, item in job.events(http):
                    if isinstance(item, str):
                        yield chunk(i, {"content": item})
                        continue
                    reply: Reply = item.result
                    replies.append(reply)
                    delta: dict[str, Any] = {}
                    if reply.tool_call is not None:
                        delta["tool_calls"] = [{"index": 0, **call} for call in _message(reply)["tool_calls"]]
                    yield chunk(i, delta, _reason(reply))
                if body.stream_options and body.stream_options.include_usage:
                    yield {**chunk_meta, "choices": [], "usage": _chat_usage(replies)}
            return _sse(chunks())
        replies = await _drain(job, http)
        out = []
        for i, reply in enumerate(replies):
            logprobs = None
            if body.logprobs and calls[i]:
                logprobs = {"content": self._chat_logprobs(calls[i][0])}
            out.append({"index": i, "message": _message(reply), "logprobs": logprobs, "finish_reason": _reason(reply)})
        return JSONResponse({**meta, "choices": out, "usage": _chat_usage(replies)})

    def _chat_logprobs(self, request: Request, start: int = 0) -> list[dict[str, Any]]:
        """OpenAI's chat ``logprobs.content`` of the tokens recorded from ``start`` on."""
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.tok.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        entries = request.logprobs[start:]
        return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                for t, (lp, alts) in zip(request.completion_ids[start:start + len(entries)], entries)]

    # --- /infill -------------------------------------------------------------------------------

    async def infill(self, body: m.InfillRequest, http: HttpRequest) -> Response:
        prefix = body.input_prefix if body.input_prefix is not None else body.prefix
        suffix = body.input_suffix if body.input_suffix is not None else (body.suffix or "")
        if prefix is None:
            raise ApiError(400, "'prefix' is required ('suffix' defaults to empty)", param="prefix")
        ids = self.tok.fim_prompt(prefix, suffix)
        # Editor completion is greedy unless the client asks otherwise.
        params = self.params(body, {self.tok.eot_id, self.tok.fim_pad_id}, temperature=0.0)
        request = Request(ids, self.fit(ids, params, body.max_tokens is not None))
        job = _Job(self, [request])
        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                async for _, item in job.events(http):
                    if isinstance(item, str):
                        yield {"content": item, "stop": False}
                yield {"content": "", "stop": True, "finish_reason": _reason(request), "usage": _usage([request])}
            return _sse(chunks())
        await _drain(job, http)
        return JSONResponse({"content": request.text, "stop": True, "finish_reason": _reason(request),
                             "usage": _usage([request])})


async def _drain(job: _Job, http: HttpRequest) -> list[Any]:
    """Every result of a non-streamed job, in order; a client that disconnects cancels it (499)."""
    results: dict[int, Any] = {}
    async for i, item in job.events(http):
        if isinstance(item, _Done):
            results[i] = item.result
    if job.pending:
        raise ApiError(499, "the client closed the request", "client_closed_request")
    return [results[i] for i in sorted(results)]


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
        except ApiError as exc:
            yield f"data: {json.dumps(error_body(exc.status, str(exc), exc.code, exc.param))}\n\n".encode()
        except Exception as exc:  # a bug mid-stream: tell the client in the stream's own terms
            log.error("stream failed", exc_info=exc)
            yield f"data: {json.dumps(error_body(500, f'internal error: {exc.__class__.__name__}', 'server_error'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(requests: list[Request]) -> dict[str, int]:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(r.completion_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_usage(replies: list[Reply]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in replies[:1])  # the same conversation for every choice
    completion = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _reason(result: Request | Reply) -> str:
    """OpenAI finish reasons: stop | length | tool_calls (a cancelled request ended early: stop)."""
    return result.finish_reason if result.finish_reason in ("length", "tool_calls") else "stop"


def _message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_call is not None:
        try:
            name, arguments = parse_tool_call(reply.tool_call)
            fn = {"name": name, "arguments": json.dumps(arguments)}
        except ValueError:
            fn = {"name": "", "arguments": reply.tool_call}  # malformed: hand the raw text over
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function", "function": fn}]
    return message


class Gate:
    """Pure ASGI middleware in front of the app: the structured access log, the request read
    timeout (408), the body size limit (413), the concurrency limit on generation (503 with
    Retry-After) and the API key (401). The body is read here, whole, so the app never waits
    on a slow client."""

    def __init__(self, app, limits: ServerLimits, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app, self.limits, self.metrics, self.api_key = app, limits, metrics, api_key
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, sent = time.perf_counter(), [0], [0]

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        path = scope["path"].rstrip("/") or "/"
        generation = scope["method"] == "POST" and path in GENERATION_PATHS
        body = b""
        try:
            body = await self._read_body(scope, receive)
            if generation:
                self._authorize(scope)
                if self.in_flight >= self.limits.max_concurrent:
                    raise ApiError(503, f"the server is at its limit of {self.limits.max_concurrent} "
                                        "concurrent requests; retry later", "server_busy")
        except ApiError as exc:
            await _error_response(exc)(scope, receive, send_logged)
        else:
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive_replayed():
                return replay.pop() if replay else await receive()

            self.in_flight += generation
            try:
                await self.app(scope, receive_replayed, send_logged)
            finally:
                self.in_flight -= generation
        duration = time.perf_counter() - start
        self.metrics.request(path if path in GENERATION_PATHS else "other", status[0], duration)
        access_log.info(json.dumps({"ts": round(time.time(), 3), "client": (scope.get("client") or ["?"])[0],
                                    "method": scope["method"], "path": scope["path"], "status": status[0],
                                    "bytes_in": len(body), "bytes_out": sent[0],
                                    "duration_ms": round(duration * 1000, 1)}))

    async def _read_body(self, scope, receive) -> bytes:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > self.limits.max_body_bytes:  # h11 has checked it is digits
            raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {self.limits.max_body_bytes}",
                           "request_too_large")
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.limits.read_timeout_s:g} s",
                               "request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected", "client_closed_request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {self.limits.max_body_bytes} bytes",
                               "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _authorize(self, scope) -> None:
        if self.api_key is None:
            return
        headers = dict(scope.get("headers") or [])
        if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key", "invalid_api_key")


def timed_protocol(read_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on the request head: uvicorn times out idle
    keep-alive connections but not a client that sends its headers slowly or never finishes
    them. Such a client gets 408 and is disconnected after ``read_timeout_s``."""

    class TimedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the head has arrived; Gate times the body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return TimedH11


def make_app(engine: Engine, tokenizer: CodeTokenizer, model_name: str = "codefoundry",
             limits: ServerLimits | None = None, api_key: str | None = None) -> Gate:
    """The ASGI application (wrapped in :class:`Gate`); :func:`serve` runs it under uvicorn."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(engine)
    api = Api(engine, tokenizer, model_name, limits, metrics)
    errors: dict[int | str, dict[str, Any]] = {status: {"model": m.ErrorResponse}
                                               for status in (400, 401, 408, 413, 500, 503)}
    # With "stream": true the same endpoints answer with server-sent events.
    # Each event's data is one JSON chunk (the OpenAI stream format), or [DONE] at the end.
    errors[200] = {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json"},
                       "event": {"type": "string"}}}}}}
    app = FastAPI(title="codefoundry", version="1", description=__doc__.split("\n\n")[0])

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        return JSONResponse(error_body(400, message, "invalid_request_error", where), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: HttpRequest, exc: Exception) -> JSONResponse:  # a bug must not take the server down
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body(500, f"internal error: {exc.__class__.__name__}", "server_error"), 500)

    @app.post("/v1/completions", response_model=m.Completion, responses=errors)
    async def completions(body: m.CompletionRequest, http: HttpRequest) -> Response:
        return await api.completions(body, http)

    @app.post("/v1/chat/completions", response_model=m.ChatCompletion, responses=errors)
    async def chat(body: m.ChatRequest, http: HttpRequest) -> Response:
        return await api.chat(body, http)

    @app.post("/infill", response_model=m.Infill, responses=errors)
    async def infill(body: m.InfillRequest, http: HttpRequest) -> Response:
        return await api.infill(body, http)

    @app.get("/v1/models", response_model=m.ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "codefoundry"}]}

    @app.get("/health", response_model=m.Health)
    async def health() -> dict[str, Any]:
        return {"status": "shutting_down" if engine.closing else "ok", "active_rows": engine.active_rows,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("codefoundry.infer").joinpath("web/index.html").read_text())

    return Gate(app, limits, metrics, api_key)


def serving_threads(requested: int | None) -> int:
    """Intra-op threads for the model under ``serve``: ``requested``, else every core but one.

    The event loop (HTTP, JSON, tokenization) and the engine share one process and one GIL, and
    on a CPU the clients often share the machine: a model that takes every core makes the
    other work wait for a core, and PyTorch's OpenMP workers spin between the many small
    operations of a decoding step. On 2 cores a 1.2M-parameter model served 32 clients at
    ~230 us of server CPU per token with 1 thread against ~360 with 2 (bench/bench_serve.py).
    OMP_NUM_THREADS, when set, is the default instead.
    """
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) - 1)


def server_config(app, host: str, port: int, limits: ServerLimits, log_level: str = "warning"):
    """uvicorn settings: a backlog of 2048 (5 reset clients at 32 concurrent), head/body read
    timeouts, a 5 s keep-alive and a graceful shutdown that lets streams finish."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, backlog=2048, http=timed_protocol(limits.read_timeout_s),
                          timeout_keep_alive=5, timeout_graceful_shutdown=limits.grace_s, access_log=False,
                          log_level=log_level, lifespan="off", h11_max_incomplete_event_size=64 << 10)


def serve(engine: Engine, tokenizer: CodeTokenizer, host: str, port: int, model_name: str,
          limits: ServerLimits, api_key: str | None = None, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; then stop taking requests, let running rows finish
    for ``limits.grace_s`` and cancel what is left."""
    import uvicorn

    server = uvicorn.Server(server_config(make_app(engine, tokenizer, model_name, limits, api_key), host, port,
                                          limits, "info"))
    if not access_log.handlers:  # one JSON object per request on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
            on_ready(f"http://{bound_host}:{bound_port}")
        await task

    try:
        asyncio.run(main())
    finally:
        engine.close(limits.grace_s)


class BackgroundServer:
    """The app under uvicorn on a thread (tests, benches): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None) -> None:
        import uvicorn

        self.server = uvicorn.Server(server_config(app, host, port, limits or ServerLimits()))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
