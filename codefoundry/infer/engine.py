"""A batching engine: concurrent generation requests decoded together through one KV cache.

Requests are queued; a worker thread takes up to ``max_batch`` of them (waiting at most
``max_wait_ms`` after the first for others to arrive), decodes them as one left-padded
batch with :func:`generate_tokens`, and hands each request its text as it becomes safe to
show. Each row keeps its own sampling settings, stop strings, stop tokens and token limit;
the batch ends when its last row does. This is static batching: a request that arrives
mid-batch waits for the next one (continuous batching would need per-row cache
positions). For serving at scale, export to Hugging Face format and run vLLM.

:func:`run_batch` is the decoding step itself and is also used directly (no thread) by
the chat and agent commands.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from codefoundry.infer.generate import TextDeltas, generate_tokens, sample_next
from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer

log = logging.getLogger(__name__)

class RequestRejected(ValueError):
    """A request the engine cannot take (empty, or too long for the context)."""


class EngineBusy(RequestRejected):
    """Too many requests are already waiting; the client should retry later."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)  # generation ends at any of these tokens (not shown)
    seed: int | None = None


class Request:
    """One generation. ``on_text(delta)`` receives text as it becomes safe to show (called from
    the engine thread); ``done`` is set once ``finish_reason`` is known."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_text = on_text
        self.completion_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.finish_token: int | None = None  # the stop token that ended it, if any
        self.error: str | None = None
        self.done = threading.Event()
        self.cancelled = False

    def emit(self, delta: str) -> None:
        if delta:
            self.text += delta
            if self.on_text is not None:
                self.on_text(delta)

    def finish(self, reason: str, token: int | None = None) -> None:
        self.finish_reason, self.finish_token = reason, token
        self.done.set()

    def cancel(self) -> None:
        """Stop generating for this request (e.g. the client disconnected)."""
        self.cancelled = True


def _row_sampler(requests: list[Request], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-row sampling: greedy rows by one argmax, unseeded rows that share settings by one
    call, and seeded rows each with their own generator (reproducible whatever the batch)."""
    generators = [torch.Generator(device=device).manual_seed(r.params.seed) if r.params.seed is not None else None
                  for r in requests]
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, r in enumerate(requests):
        if r.params.temperature > 0 and generators[row] is None:
            groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(row)
    seeded = [row for row, g in enumerate(generators) if g is not None and requests[row].params.temperature > 0]

    def sample(logits: torch.Tensor) -> torch.Tensor:
        out = logits.argmax(dim=-1)
        for (temperature, top_k, top_p), rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            out[index] = sample_next(logits[index], temperature, top_k, top_p)
        for row in seeded:
            p = requests[row].params
            out[row] = sample_next(logits[row:row + 1], p.temperature, p.top_k, p.top_p, generators[row])[0]
        return out

    return sample


def run_batch(model: Transformer, tokenizer: CodeTokenizer, requests: list[Request]) -> None:
    """Decode ``requests`` together until each has finished; every request ends with ``done`` set."""
    deltas = [TextDeltas(tokenizer, r.params.stop) for r in requests]
    live = len(requests)
    try:
        steps = generate_tokens(model, [r.prompt_ids for r in requests], max(r.params.max_tokens for r in requests),
                                sample=_row_sampler(requests, model.embed.weight.device))
        for step in steps:
            for row, t in enumerate(step.tolist()):
                req = requests[row]
                if req.finish_reason is not None:
                    continue
                if req.cancelled:
                    req.finish("cancelled")
                elif t in req.params.stop_ids:
                    req.emit(deltas[row].flush())
                    req.finish("stop", t)
                else:
                    req.completion_ids.append(t)
                    req.emit(deltas[row].add(t))
                    if deltas[row].stopped:
                        req.finish("stop")
                    elif len(req.completion_ids) >= req.params.max_tokens:
                        req.emit(deltas[row].flush())
                        req.finish("length")
                live -= req.finish_reason is not None
            if live == 0:
                break
        for row, req in enumerate(requests):  # the context filled up before the row ended
            if req.finish_reason is None:
                req.emit(deltas[row].flush())
                req.finish("length")
    except Exception as exc:  # never leave a client waiting forever
        for req in requests:
            if req.finish_reason is None:
                req.error = f"{exc.__class__.__name__}: {exc}"
                req.finish("error")
        raise


class Engine:
    """Queue + worker thread around :func:`run_batch`. Use as a context manager or call close()."""

    def __init__(self, model: Transformer, tokenizer: CodeTokenizer, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_pending: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.max_pending = max_pending
        self.context = model.cfg.max_seq_len
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._deferred: list[Request] = []
        self.batches = 0  # batches run so far (tests and benchmarks check that batching happened)
        self._thread = threading.Thread(target=self._loop, name="codefoundry-engine", daemon=True)
        self._thread.start()

    def check(self, request: Request) -> None:
        """RequestRejected when ``request`` cannot fit the context or the queue is full."""
        need = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids:
            raise RequestRejected("the prompt is empty")
        if need > self.context:
            raise RequestRejected(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                                  f"({request.params.max_tokens}) exceeds the context of {self.context} tokens")
        if self._queue.qsize() + len(self._deferred) >= self.max_pending:
            raise EngineBusy("the server is overloaded; retry later")

    def submit(self, request: Request) -> Request:
        """Queue a request (after :meth:`check`)."""
        self.check(request)
        self._queue.put(request)
        return request

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_batch(self) -> list[Request] | None:
        """Deferred requests first, then whatever arrives within the wait window. A request joins
        only if the batch's widest prompt plus its longest completion still fits the context."""
        pending, self._deferred = self._deferred, []
        if not pending:
            first = self._queue.get()
            if first is None:
                return None
            pending = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(pending) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # re-deliver the shutdown signal after this batch
                break
            pending.append(nxt)
        batch: list[Request] = []
        for req in pending:
            trial = batch + [req]
            width = max(len(r.prompt_ids) for r in trial)
            longest = max(r.params.max_tokens for r in trial)
            if len(batch) < self.max_batch and width + longest <= self.context and not req.cancelled:
                batch.append(req)
            elif req.cancelled:
                req.finish("cancelled")
            else:
                self._deferred.append(req)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self.batches += 1
                try:
                    run_batch(self.model, self.tokenizer, batch)
                except Exception:  # each request got the error from run_batch; keep serving
                    log.exception("engine: a batch failed")
        for req in self._deferred:
            req.finish("cancelled")
