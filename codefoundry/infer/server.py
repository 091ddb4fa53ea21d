"""`codefoundry serve`: OpenAI-compatible HTTP endpoints over the batching engine.

* ``POST /v1/completions`` — text completion (``prompt``: a string or a list of strings);
* ``POST /v1/chat/completions`` — chat in the model's template; when the request lists
  ``tools``, a tool call made by the model comes back as OpenAI ``tool_calls``;
* ``POST /infill`` — editor completion: ``{"prefix", "suffix"}`` (llama.cpp's
  ``input_prefix``/``input_suffix`` are accepted too) -> ``{"content"}``;
* ``GET /v1/models``, ``GET /health``.

Generation endpoints stream server-sent events with ``"stream": true`` and report
``usage`` token counts. Bad requests get a 4xx JSON error ``{"error": {"message", "type",
"code"}}`` and the server keeps serving. It is the standard library's threaded HTTP server
(no extra dependency): one thread per connection, all feeding one :class:`Engine`.
For serving at scale, export the checkpoint to Hugging Face format and run it on vLLM.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import SimpleQueue
from typing import Any, Callable, Iterator

from codefoundry.infer.chat import Reply, assistant_reply
from codefoundry.infer.engine import Engine, EngineBusy, Request, RequestRejected, SamplingParams
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import ChatFormatError, parse_tool_call, render_chat

log = logging.getLogger(__name__)

Json = dict[str, Any]
DRAIN_LIMIT = 64 << 20  # refused bodies up to this size are read and discarded
# A generation endpoint answers with a JSON body, or with a stream of SSE event payloads.
Answer = tuple[Json | None, Iterator[Json] | None]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256
    max_prompts: int = 16  # prompts in one /v1/completions request
    timeout_s: float = 300.0  # a generation still running after this is cancelled


def _get(body: Json, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"'{name}' has the wrong type ({type(value).__name__})")
    return value


class _Stream:
    """Runs ``work(on_text, run)`` on a thread and yields its text deltas as they come, then
    its result. Every engine request it makes is cancelled if the consumer goes away."""

    _END = object()

    def __init__(self, api: "Api", work: Callable[[Callable[[str], None], Callable[[Request], None]], Any]) -> None:
        self.api, self.requests = api, []
        self.events: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._target, args=(work,), daemon=True).start()

    def _run(self, request: Request) -> None:
        self.requests.append(request)
        self.api.run(request)

    def _target(self, work) -> None:
        try:
            self.events.put((self._END, work(self.events.put, self._run)))
        except Exception as exc:
            self.events.put((self._END, exc))

    def __iter__(self) -> Iterator[str | Any]:
        try:
            while True:
                item = self.events.get()
                if isinstance(item, tuple) and item and item[0] is self._END:
                    if isinstance(item[1], Exception):
                        raise item[1]
                    yield item[1]
                    return
                yield item
        finally:
            for request in self.requests:
                request.cancel()


class Api:
    """Validation, generation and response bodies, independent of the HTTP plumbing."""

    def __init__(self, engine: Engine, tokenizer: CodeTokenizer, model_name: str,
                 limits: ServerLimits | None = None) -> None:
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.limits = limits or ServerLimits()

    def params(self, body: Json, stop_ids: set[int], temperature: float = 1.0) -> SamplingParams:
        max_tokens = _get(body, "max_completion_tokens", int, _get(body, "max_tokens", int))
        max_tokens = min(self.limits.default_max_tokens, self.limits.max_tokens) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {self.limits.max_tokens}")
        temperature = float(_get(body, "temperature", (int, float), temperature))
        top_p = float(_get(body, "top_p", (int, float), 1.0))
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise ApiError(400, "temperature must be in [0, 2] and top_p in (0, 1]")
        stop = _get(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 strings")
        if _get(body, "n", int, 1) != 1:
            raise ApiError(400, "only n=1 is supported")
        if body.get("ignore_eos") is True:  # vLLM's extension: always run to max_tokens (benchmarks)
            stop_ids = set()
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=_get(body, "top_k", int, 0), stop=stop, stop_ids=stop_ids,
                              seed=_get(body, "seed", int))

    def check(self, request: Request, body: Json | None = None) -> None:
        """4xx unless the engine can take ``request``. When the client left max_tokens unset,
        the default shrinks to the room the prompt leaves in the context."""
        if body is not None and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            room = self.engine.context - len(request.prompt_ids)
            request.params = replace(request.params, max_tokens=max(1, min(request.params.max_tokens, room)))
        try:
            self.engine.check(request)
        except EngineBusy as exc:
            raise ApiError(503, str(exc), "server_busy") from None
        except RequestRejected as exc:
            raise ApiError(400, str(exc), "context_length_exceeded") from None

    def run(self, request: Request) -> None:
        """Decode ``request`` through the engine and wait for it (cancelled after the timeout)."""
        self.check(request)
        self.engine.submit(request)
        self.wait(request)

    def wait(self, request: Request) -> None:
        if not request.done.wait(self.limits.timeout_s):
            request.cancel()
            request.done.wait()
        if request.finish_reason == "error":
            raise ApiError(500, f"generation failed: {request.error}", "server_error")

    def _meta(self, obj: str, prefix: str) -> Json:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
                "model": self.model_name}

    # --- /v1/completions ---------------------------------------------------------------------

    def completions(self, body: Json) -> Answer:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings")
        if len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"at most {self.limits.max_prompts} prompts per request")
        params = self.params(body, {self.tok.eot_id})
        requests = [Request(self.tok.encode(p) or [self.tok.bos_id], params) for p in prompts]
        for r in requests:
            self.check(r, body)
        meta = self._meta("text_completion", "cmpl")
        if body.get("stream"):
            if len(requests) != 1:
                raise ApiError(400, "streaming takes one prompt")
            return None, self._stream_completion(requests[0], meta, _include_usage(body))
        for r in requests:  # all queued before waiting, so they share a batch
            self.engine.submit(r)
        for r in requests:
            self.wait(r)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _reason(r.finish_reason)}
                   for i, r in enumerate(requests)]
        usage = _usage(sum(len(r.prompt_ids) for r in requests), sum(len(r.completion_ids) for r in requests))
        return {**meta, "choices": choices, "usage": usage}, None

    def _stream_completion(self, request: Request, meta: Json, include_usage: bool) -> Iterator[Json]:
        def work(on_text, run):
            request.on_text = on_text
            run(request)
            return request

        for item in _Stream(self, work):
            if isinstance(item, str):
                yield {**meta, "choices": [{"index": 0, "text": item, "logprobs": None, "finish_reason": None}]}
        yield {**meta, "choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": _reason(request.finish_reason)}]}
        if include_usage:
            yield {**meta, "choices": [], "usage": _usage(len(request.prompt_ids), len(request.completion_ids))}

    # --- /v1/chat/completions ----------------------------------------------------------------

    def chat(self, body: Json) -> Answer:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list")
        tools = bool(body.get("tools"))
        params = self.params(body, set())
        try:  # render once up front so a bad conversation gets a 400 even when streaming
            prompt = render_chat(self.tok, messages, add_generation_prompt=True).ids
        except ChatFormatError as exc:
            raise ApiError(400, f"messages: {exc}") from None
        self.check(Request(prompt, SamplingParams(max_tokens=1)))
        meta = self._meta("chat.completion", "chatcmpl")

        def work(on_text, run) -> Reply:
            return assistant_reply(self.tok, messages, params, run, self.engine.context, on_text, tools)

        if body.get("stream"):
            return None, self._stream_chat(_Stream(self, work), {**meta, "object": "chat.completion.chunk"},
                                           _include_usage(body))
        reply = work(None, self.run)
        choice = {"index": 0, "message": _message(reply), "logprobs": None,
                  "finish_reason": _reason(reply.finish_reason)}
        return {**meta, "choices": [choice], "usage": _usage(reply.prompt_tokens, reply.completion_tokens)}, None

    def _stream_chat(self, stream: _Stream, meta: Json, include_usage: bool) -> Iterator[Json]:
        def chunk(delta: Json, finish: str | None = None) -> Json:
            return {**meta, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        reply = None
        for item in stream:
            if isinstance(item, str):
                yield chunk({"content": item})
            else:
                reply = item
        delta: Json = {}
        if reply.tool_call is not None:
            delta["tool_calls"] = [{"index": 0, **call} for call in _message(reply)["tool_calls"]]
        yield chunk(delta, _reason(reply.finish_reason))
        if include_usage:
            yield {**meta, "choices": [], "usage": _usage(reply.prompt_tokens, reply.completion_tokens)}

    # --- /infill -------------------------------------------------------------------------------

    def infill(self, body: Json) -> Answer:
        prefix = _get(body, "input_prefix", str, _get(body, "prefix", str))
        suffix = _get(body, "input_suffix", str, _get(body, "suffix", str, ""))
        if prefix is None:
            raise ApiError(400, "'prefix' is required ('suffix' defaults to empty)")
        # Editor completion is greedy unless the client asks otherwise.
        request = Request(self.tok.fim_prompt(prefix, suffix),
                          self.params(body, {self.tok.eot_id, self.tok.fim_pad_id}, temperature=0.0))
        self.check(request, body)
        if body.get("stream"):
            def events() -> Iterator[Json]:
                def work(on_text, run):
                    request.on_text = on_text
                    run(request)
                for item in _Stream(self, work):
                    if isinstance(item, str):
                        yield {"content": item, "stop": False}
                yield {"content": "", "stop": True, "finish_reason": _reason(request.finish_reason),
                       "usage": _usage(len(request.prompt_ids), len(request.completion_ids))}
            return None, events()
        self.run(request)
        return {"content": request.text, "finish_reason": _reason(request.finish_reason),
                "usage": _usage(len(request.prompt_ids), len(request.completion_ids))}, None


def _include_usage(body: Json) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _reason(reason: str | None) -> str:
    """OpenAI finish reasons: stop | length | tool_calls (a cancelled request ended early: stop)."""
    return reason if reason in ("length", "tool_calls") else "stop"


def _message(reply: Reply) -> Json:
    message: Json = {"role": "assistant", "content": reply.content}
    if reply.tool_call is not None:
        try:
            name, arguments = parse_tool_call(reply.tool_call)
            fn = {"name": name, "arguments": json.dumps(arguments)}
        except ValueError:
            fn = {"name": "", "arguments": reply.tool_call}  # malformed: hand the raw text over
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function", "function": fn}]
    return message


class Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: JSON in, JSON or SSE out, errors as OpenAI-style JSON."""

    protocol_version = "HTTP/1.1"
    api: Api  # set on the subclass made by make_server
    api_key: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.api.model_name, "object": "model",
                                                         "created": 0, "owned_by": "codefoundry"}]})
        else:
            self._error(ApiError(404, f"no route GET {self.path}", "not_found"))

    def do_POST(self) -> None:
        routes = {"/v1/completions": self.api.completions, "/v1/chat/completions": self.api.chat,
                  "/infill": self.api.infill}
        try:
            route = routes.get(self.path.split("?")[0].rstrip("/"))
            if route is None:
                self._drain()
                raise ApiError(404, f"no route POST {self.path}", "not_found")
            self._authorize()
            body, stream = route(self._body())
        except ApiError as exc:
            self._error(exc)
            return
        except Exception as exc:  # a bug must not take the server down: report it and carry on
            log.exception("request failed")
            self._error(ApiError(500, f"internal error: {exc.__class__.__name__}", "server_error"))
            return
        if stream is None:
            self._json(200, body)
        else:
            self._sse(stream)

    def _authorize(self) -> None:
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._drain()
            raise ApiError(401, "missing or wrong API key", "invalid_api_key")

    def _drain(self) -> None:
        """Read and discard the body, so the client sees our answer instead of a reset
        connection; one too big to be worth reading just closes the connection afterwards."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def _body(self) -> Json:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required") from None
        if length > self.api.limits.max_body_bytes:
            self._drain()
            self.close_connection = True
            raise ApiError(413, f"request body is {length} bytes; the limit is {self.api.limits.max_body_bytes}",
                           "request_too_large")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _json(self, status: int, obj: Json) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ApiError) -> None:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        self._json(exc.status, {"error": {"message": str(exc), "type": kind, "code": exc.code}})

    def _sse(self, events: Iterator[Json]) -> None:
        """Server-sent events; the response ends with the connection (no Content-Length)."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except ApiError as exc:
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away mid-stream")  # the stream's requests were cancelled


def make_server(engine: Engine, tokenizer: CodeTokenizer, host: str = "127.0.0.1", port: int = 8000,
                model_name: str = "codefoundry", limits: ServerLimits | None = None,
                api_key: str | None = None) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free one: see ``server.server_address``); call serve_forever()."""
    handler = type("BoundHandler", (Handler,), {"api": Api(engine, tokenizer, model_name, limits),
                                                "api_key": api_key})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
