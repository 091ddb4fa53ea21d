"""Continuous batching: requests decoded together, joining and leaving the batch at any step.

* :class:`Request` — one generation: prompt ids, :class:`SamplingParams`, text as it becomes
  safe to show (``on_text``), a finish reason.
* :class:`Decoder` — the request side of :class:`~codefoundry.infer.decode.DecodeBatch`:
  :meth:`Decoder.add` prefills new requests, :meth:`Decoder.step` decodes one token for every
  row, applies each row's stop tokens, stop strings and token limit, and frees finished or
  cancelled rows at once. An error in one row's sampling fails that request alone.
* :func:`run_batch` — decode a list of requests to the end (no thread): chat, agent, post.
* :class:`Engine` — a queue and a worker thread around one :class:`Decoder`: a request that
  arrives mid-batch joins at the next step, up to ``max_batch`` rows; ``close`` lets running
  rows finish (or cancels them after a grace period).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from codefoundry.infer.decode import DecodeBatch, TextDeltas, fit_prompt
from codefoundry.infer.sampling import SamplingParams, make_generator, sample_rows, token_logprobs
from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer

__all__ = ["Decoder", "Engine", "EngineBusy", "Request", "RequestRejected", "SamplingParams", "run_batch"]

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """A request the engine cannot take (empty, or too long for the context)."""


class EngineBusy(RequestRejected):
    """Too many requests are already waiting, or the engine is closing; retry later."""


class Request:
    """One generation. ``on_text(delta)`` receives text as it becomes safe to show and
    ``on_done(request)`` is called once it has ended (both from the decoding thread); ``done``
    is set once ``finish_reason`` is known."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None,
                 on_done: Callable[[Request], None] | None = None) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_text = on_text
        self.on_done = on_done
        self.completion_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.finish_token: int | None = None  # the stop token that ended it, if any
        self.error: str | None = None
        # With params.logprobs: (log-probability, [(token, log-probability) of the top alternatives])
        # for each completion token.
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.done = threading.Event()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None  # perf_counter() of the first generated token
        self.finished_at: float | None = None

    def emit(self, delta: str) -> None:
        if delta:
            self.text += delta
            if self.on_text is not None:
                self.on_text(delta)

    def finish(self, reason: str, token: int | None = None, error: str | None = None) -> None:
        self.finish_reason, self.finish_token, self.error = reason, token, error
        self.finished_at = time.perf_counter()
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    def cancel(self) -> None:
        """Stop generating for this request (e.g. the client disconnected)."""
        self.cancelled = True


class _Row:
    """A request while it holds a row: its text state, generator and token limit."""

    def __init__(self, request: Request, tokenizer: CodeTokenizer, context: int, device: torch.device) -> None:
        self.request = request
        self.prompt = fit_prompt(request.prompt_ids, request.params.max_tokens, context)
        self.limit = min(request.params.max_tokens, context - len(self.prompt))
        self.deltas = TextDeltas(tokenizer, request.params.stop)
        self.generator = make_generator(request.params, device)
        self.last = 0

    def accept(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take one generated token (and its log-probabilities if asked); True once the request has finished."""
        req, p = self.request, self.request.params
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        self.last = token
        if token in p.stop_ids:
            req.emit(self.deltas.flush())
            req.finish("stop", token)
            return True
        req.completion_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        req.emit(self.deltas.add(token))
        if self.deltas.stopped:
            req.finish("stop")
        elif len(req.completion_ids) >= self.limit:
            req.emit(self.deltas.flush())
            req.finish("length")
        return req.finish_reason is not None


class Decoder:
    """Requests decoded together through one :class:`DecodeBatch` of ``slots`` rows."""

    def __init__(self, model: Transformer, tokenizer: CodeTokenizer, slots: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = model.cfg.max_seq_len
        self.batch = DecodeBatch(model, slots)
        self.rows: list[_Row] = []
        self.device = model.embed.weight.device
        self.tokens_out = 0  # generated tokens so far (metrics)

    @property
    def room(self) -> int:
        return self.batch.room

    def add(self, requests: list[Request]) -> None:
        """Prefill ``requests`` (at most :attr:`room`) and sample their first tokens."""
        rows = []
        for req in requests:
            if req.cancelled:
                req.finish("cancelled")
            elif not req.prompt_ids:
                req.finish("error", error="the prompt is empty")
            else:
                rows.append(_Row(req, self.tokenizer, self.context, self.device))
        if not rows:
            return
        before = self.batch.n
        try:
            logits = self.batch.join([r.prompt for r in rows])
        except Exception as exc:  # the prefill failed: only the joining requests fail
            for r in rows:
                r.request.finish("error", error=f"{exc.__class__.__name__}: {exc}")
            self.batch.leave(set(range(before, self.batch.n)))
            raise
        self.rows += rows
        self._take(logits, rows, first=len(self.rows) - len(rows))

    def step(self) -> None:
        """Decode one token for every row; free the rows that finished or were cancelled."""
        cancelled = {i for i, r in enumerate(self.rows) if r.request.cancelled}
        for i in cancelled:
            self.rows[i].request.finish("cancelled")
        self._leave(cancelled)
        if not self.rows:
            return
        last = torch.tensor([r.last for r in self.rows], device=self.device)
        try:
            logits = self.batch.step(last)
        except Exception as exc:  # a failed forward pass fails the rows in it, and the engine goes on
            for r in self.rows:
                r.request.finish("error", error=f"{exc.__class__.__name__}: {exc}")
            self._leave(set(range(len(self.rows))))
            raise
        self._take(logits, self.rows, first=0)

    def cancel_all(self) -> None:
        for r in self.rows:
            r.request.finish("cancelled")
        self._leave(set(range(len(self.rows))))

    def _take(self, logits: torch.Tensor, rows: list[_Row], first: int) -> None:
        """Sample a token for each of ``rows`` (rows ``first..`` of the batch) and apply it."""
        tokens, failed = sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows])
        want = [i for i, r in enumerate(rows) if r.request.params.logprobs is not None and i not in failed]
        logprobs = {}
        if want:
            index = torch.tensor(want, device=logits.device)
            top = max(rows[i].request.params.logprobs for i in want)
            for i, (lp, alts) in zip(want, token_logprobs(logits[index], tokens[index], top)):
                logprobs[i] = (lp, alts[:rows[i].request.params.logprobs])
        done = set()
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):
            if i in failed:
                r.request.finish("error", error=f"sampling failed: {failed[i]}")
                done.add(first + i)
            elif r.accept(t, logprobs.get(i)):
                done.add(first + i)
        self.tokens_out += len(rows) - len(failed)
        self._leave(done)

    def _leave(self, rows: set[int]) -> None:
        if rows:
            order = self.batch.leave(rows)
            self.rows = [self.rows[i] for i in order]


def run_batch(model: Transformer, tokenizer: CodeTokenizer, requests: list[Request]) -> None:
    """Decode ``requests`` together until each has finished; every request ends with ``done`` set."""
    decoder = Decoder(model, tokenizer, max(1, len(requests)))
    decoder.add(requests)
    while decoder.rows:
        decoder.step()


class Engine:
    """A queue and worker thread around one :class:`Decoder`. Use as a context manager or call close()."""

    def __init__(self, model: Transformer, tokenizer: CodeTokenizer, max_batch: int = 8,
                 max_pending: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_pending = max_batch, max_pending
        self.context = model.cfg.max_seq_len
        self.decoder = Decoder(model, tokenizer, max_batch)
        self._queue: queue.Queue[Request] = queue.Queue()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self.steps = 0  # decode steps so far
        self.peak_rows = 0  # most rows decoded in one step (tests and benchmarks check batching)
        self._thread = threading.Thread(target=self._loop, name="codefoundry-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    @property
    def active_rows(self) -> int:
        return len(self.decoder.rows)

    def check(self, request: Request) -> None:
        """RequestRejected when ``request`` cannot fit the context; EngineBusy when the queue is full."""
        need = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids:
            raise RequestRejected("the prompt is empty")
        if need > self.context:
            raise RequestRejected(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                                  f"({request.params.max_tokens}) exceeds the context of {self.context} tokens")
        if self._closing.is_set():
            raise EngineBusy("the server is shutting down")
        if self._queue.qsize() >= self.max_pending:
            raise EngineBusy("the server is overloaded; retry later")

    def submit(self, request: Request) -> Request:
        """Queue a request (after :meth:`check`); it joins the batch at the next step."""
        self.check(request)
        self._queue.put(request)
        return request

    def close(self, grace_s: float = 10.0) -> None:
        """Stop taking requests; let queued and running ones finish for ``grace_s``, then cancel the rest."""
        self._closing.set()
        self._thread.join(timeout=grace_s)
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _admit(self) -> list[Request]:
        """Waiting requests, as many as there are free rows (blocks briefly when idle)."""
        new: list[Request] = []
        if not self.decoder.rows:
            try:
                new.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return new
        while len(new) < self.decoder.room:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return new

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._closing.is_set() and not self.decoder.rows and self._queue.empty():
                break
            try:
                if new := self._admit():
                    self.decoder.add(new)
                if self.decoder.rows:
                    self.peak_rows = max(self.peak_rows, len(self.decoder.rows))
                    self.decoder.step()
                    self.steps += 1
            except Exception:  # the requests involved got the error; keep serving the others
                log.exception("engine: a decoding step failed")
        self.decoder.cancel_all()
        while not self._queue.empty():
            self._queue.get_nowait().finish("cancelled")
