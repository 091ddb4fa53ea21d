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

    Decoding is incremental, the way TGI and vLLM detokenize: each token decodes only a short
    window (the last settled tokens as context, then the new ones) and appends what the window
    adds, so a token costs the same at the 1,000th token as at the first, where decoding every
    id again grew with the completion. The window settles once its text no longer ends in a
    partial character; until then it grows. With byte-level BPE the text and the deltas are
    exactly those of decoding every id (tests compare them), as with decoders that strip the
    first space; only a decoder that rewrites text already shown (ByteFallback turning a whole
    run of bytes into U+FFFD) differs, where decoding every id would have shown text it then took back.
    """

    def __init__(self, tokenizer: CodeTokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.hold = max(self.longest_stop, 1) - 1
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        self.text = ""  # all text so far, cut at the first stop string
        self._settled = ""  # the text of ids[:_read], final
        self._prefix = self._read = 0  # ids[_prefix:_read]: context decoded again with the new ids
        self._prefix_len = 0  # len(decode(ids[_prefix:_read]))

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty)."""
        self.ids.append(token_id)
        if self.stopped:  # the text ended at a stop string, whatever follows
            return ""
        searched = max(0, len(self._settled) - self.longest_stop + 1)
        window = self.tokenizer.decode(self.ids[self._prefix:])
        self.text = full = self._settled + window[self._prefix_len:]
        if not window.endswith("\ufffd"):  # a clean boundary: later tokens cannot change this text
            self._settled = full
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_len = len(self.tokenizer.decode(self.ids[self._prefix:]))
        if self.stop:  # a stop string found now ends in the unsettled text: earlier ones were found before
            cut = min((i for i in (full.find(s, searched) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped, self.text = True, full[:cut]
                return self._show(cut)
        safe = len(full) - self.hold
        if full.endswith("\ufffd"):  # incomplete multi-byte character: wait for the rest
            safe = min(safe, len(full) - 1)
        return self._show(safe)

    def flush(self) -> str:
        """The held-back remainder, at the end of generation."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown:upto], upto
        return delta


class DecodeBatch:
    """Rows of one KV cache, decoded together one token per step.

    Rows ``0 .. n-1`` are occupied. :meth:`join` prefills new prompts (left-padded together in
    a cache of their own, the way a static batch is) and splices them in after the last row;
    :meth:`leave` frees rows at once, refilling the holes with the last rows. Each row keeps
    its own first column and RoPE position, so a row decodes the same tokens whenever it
    joined and whoever it shares the batch with. When every row's position is its column
    (one static batch) no per-row positions are passed to the model at all.

    The per-row key mask and positions are tensors built once when rows join, leave or are
    packed, not every step: between those events the mask is unchanged and the model advances
    the positions in place with the cache.
    """

    def __init__(self, model: Transformer, slots: int, length: int | None = None) -> None:
        self.model = model
        self.cache = model.new_cache(slots, length or model.cfg.max_seq_len)
        self.starts: list[int] = []  # first column of each row
        self.positions: list[int] = []  # RoPE position of each row's next token
        self._key_valid: torch.Tensor | None = None  # (n, columns) keys each row owns, if not all
        self._row_pos: torch.Tensor | None = None  # (n,) positions, if not every row's column
        self._fresh = False  # the two above match starts/positions

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
        self._fresh = False
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
            self._fresh = False
        if not self._fresh:
            device = cache.k.device
            self._key_valid = self._row_pos = None
            if any(self.starts):
                columns = torch.arange(cache.max_len, device=device)
                self._key_valid = columns[None, :] >= torch.tensor(self.starts, device=device)[:, None]
            if any(p != cache.pos for p in self.positions):
                self._row_pos = torch.tensor(self.positions, device=device)
            self._fresh = True
        view = cache.rows(self.n)
        view.key_valid, view.row_pos = self._key_valid, self._row_pos
        logits = self.model(tokens[:, None], cache=view)[:, -1]
        cache.pos = view.pos
        self._row_pos = view.row_pos  # advanced with the cache (KVCache.advance)
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
        self._fresh = False
        return order
