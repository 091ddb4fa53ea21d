"""The one decoding step, the one prompt-fitting rule and the one stop-string handler.

Every way of generating text is built on these: :func:`~codefoundry.infer.generate.generate_tokens`
(a static batch, token tensors out), :func:`~codefoundry.infer.generate.stream` and
:func:`~codefoundry.infer.engine.run_batch` (requests with their own settings), the serving
:class:`~codefoundry.infer.engine.Engine` (continuous batching) and speculative decoding.

* :func:`fit_prompt` — a prompt longer than the context keeps its end.
* :class:`TextDeltas` — incremental detokenizing with stop strings, safe for partial UTF-8.
* :class:`DecodeBatch` — rows of one KV cache decoded a token at a time; rows join (their
  prompts prefilled together) and leave between steps, each with its own cache positions.
"""

from __future__ import annotations

import torch

from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer

PACK_SLACK = 32  # columns no row owns that a step may attend over before the rows are packed


def fit_prompt(ids: list[int], max_new_tokens: int, context: int) -> list[int]:
    """Keep the prompt's end when prompt + completion exceed the context (at least one token)."""
    keep = max(1, context - max_new_tokens)
    return list(ids[-keep:])


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def cut_at_stop_id(ids: list[int], stop_ids: set[int]) -> list[int]:
    """``ids`` up to and including the first stop id."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i + 1]
    return ids


class TextDeltas:
    """Turns generated token ids into text deltas that are safe to show.

    Text that could be the start of a stop string, or a partial UTF-8 character, is held
    back until it is safe; once a stop string appears the text is cut before it and
    ``stopped`` becomes True.
    """

    def __init__(self, tokenizer: CodeTokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far, cut at the first stop string."""
        return cut_at_stop(self.tokenizer.decode(self.ids), self.stop)[0]

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty)."""
        self.ids.append(token_id)
        text, self.stopped = cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        if self.stopped:
            return self._show(len(text), text)
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        return self._show(safe, text)

    def flush(self) -> str:
        """The held-back remainder, at the end of generation."""
        text = self.text
        return self._show(len(text), text)

    def _show(self, upto: int, text: str) -> str:
        if upto <= self.shown:
            return ""
        delta, self.shown = text[self.shown:upto], upto
        return delta


class DecodeBatch:
    """Rows of one KV cache, decoded together one token per step.

    Rows ``0 .. n-1`` are occupied. :meth:`join` prefills new prompts (left-padded together in
    a cache of their own, the way a static batch is) and splices them in after the last row;
    :meth:`leave` frees rows at once, refilling the holes with the last rows. Each row keeps
    its own first column and RoPE position, so a row decodes the same tokens whenever it
    joined and whoever it shares the batch with. When every row's position is its column
    (one static batch) no per-row positions are passed to the model at all.
    """

    def __init__(self, model: Transformer, slots: int, length: int | None = None) -> None:
        self.model = model
        self.cache = model.new_cache(slots, length or model.cfg.max_seq_len)
        self.starts: list[int] = []  # first column of each row
        self.positions: list[int] = []  # RoPE position of each row's next token

    @property
    def n(self) -> int:
        return len(self.starts)

    @property
    def room(self) -> int:
        """Free rows."""
        return self.cache.k.shape[1] - self.n

    @torch.no_grad()
    def join(self, prompts: list[list[int]]) -> torch.Tensor:
        """Add non-empty ``prompts`` as rows ``n .. n+len-1``; return their next-token logits (len, V)."""
        device = self.cache.k.device
        width = max(len(p) for p in prompts)
        batch = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            batch[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        fresh = self.model.new_cache(len(prompts), width)
        if any(len(p) != width for p in prompts):
            fresh.set_padding([len(p) for p in prompts], width)
        logits = self.model(batch, cache=fresh)[:, -1]
        if not self.starts:
            self.cache.pos = 0
        if width > self.cache.pos:  # make room before the shared column for the longest prompt
            self.starts = self.cache.realign(self.starts, width)
        for i, p in enumerate(prompts):
            self.starts.append(self.cache.place(self.n, fresh, i, width - len(p)))
            self.positions.append(width)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The one decoding step: feed each row's latest token (n,), return next-token logits (n, V)."""
        cache = self.cache
        longest = max(cache.pos - s for s in self.starts)
        # Out of columns, or attending over many columns no row owns (after the longest rows left):
        # pack every row to end at the longest row's length.
        if cache.pos >= cache.max_len or cache.pos - longest > PACK_SLACK:
            self.starts = cache.realign(self.starts, longest)
        view = cache.rows(self.n)
        device = cache.k.device
        if any(self.starts):
            columns = torch.arange(cache.max_len, device=device)
            view.key_valid = columns[None, :] >= torch.tensor(self.starts, device=device)[:, None]
        if any(p != cache.pos for p in self.positions):
            view.row_pos = torch.tensor(self.positions, device=device)
        logits = self.model(tokens[:, None], cache=view)[:, -1]
        cache.pos = view.pos
        self.positions = [p + 1 for p in self.positions]
        return logits

    def leave(self, rows: set[int]) -> list[int]:
        """Free ``rows``; return, for each remaining row in its new order, its old index."""
        order = list(range(self.n))
        for row in sorted(rows, reverse=True):
            last = len(order) - 1
            if row != last:
                self.cache.move_row(row, last)
                order[row] = order[last]
                self.starts[row], self.positions[row] = self.starts[last], self.positions[last]
            order.pop()
            self.starts.pop()
            self.positions.pop()
        return order
