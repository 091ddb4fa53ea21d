"""Sampling and KV-cache generation.

* :func:`sample_next` — temperature / top-k / top-p (nucleus) sampling; temperature 0 is greedy.
* :func:`generate_tokens` — batched decoding of left-padded prompts with one KV cache.
* :class:`TextDeltas` — incremental detokenizing with stop strings, safe for partial UTF-8.
* :func:`stream` — text deltas for one prompt (a :class:`TextDeltas` over :func:`generate_tokens`).
* :func:`complete_batch` — completions for many prompts (used by eval and the server).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _fit_prompt(ids: list[int], max_new_tokens: int, max_len: int) -> list[int]:
    """Keep the prompt's end when prompt + completion exceed the context."""
    keep = max(1, max_len - max_new_tokens)
    return ids[-keep:]


@torch.no_grad()
def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, stop_ids: set[int] | None = None,
                    seed: int | None = None,
                    sample: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield a (B,) tensor of new tokens per step; stops when every row has hit a stop id.

    ``sample`` (logits (B, V) -> ids (B,)) replaces the shared temperature/top-k/top-p
    sampler, e.g. for per-row settings in the serving engine.
    """
    device = model.embed.weight.device
    max_len = model.cfg.max_seq_len
    prompts = [_fit_prompt(p, max_new_tokens, max_len) for p in prompts]
    width = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, max_len - width)
    batch = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    cache = model.new_cache(len(prompts), width + max_new_tokens)
    if any(len(p) != width for p in prompts):
        cache.set_padding([len(p) for p in prompts], width)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    logits = model(batch, cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        tok = sample(logits) if sample is not None else sample_next(logits, temperature, top_k, top_p, generator)
        yield tok
        if len(stop):
            done |= torch.isin(tok, stop)
            if bool(done.all()):
                return
        logits = model(tok[:, None], cache=cache)[:, -1]


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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
        return _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)[0]

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty)."""
        self.ids.append(token_id)
        text, self.stopped = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
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


def stream(model: Transformer, tokenizer: CodeTokenizer, prompt: str | list[int], max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
           seed: int | None = None, stop_at_eot: bool = True, stop_ids: set[int] | None = None) -> Iterator[str]:
    """Yield text deltas of one completion, ending at a stop string, EOT or any of ``stop_ids``."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stop_ids = set(stop_ids or ()) | ({tokenizer.eot_id} if stop_at_eot else set())
    deltas = TextDeltas(tokenizer, stop)
    for tok in generate_tokens(model, [ids], max_new_tokens, temperature, top_k, top_p, stop_ids, seed):
        t = int(tok[0])
        if t in stop_ids:
            break
        if delta := deltas.add(t):
            yield delta
        if deltas.stopped:
            return
    if delta := deltas.flush():
        yield delta


def complete_batch(model: Transformer, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   stop: list[str] | None = None, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Completion text for each prompt (string or token ids), cut at the first stop string or EOT."""
    results: list[str] = []
    stop = [s for s in (stop or []) if s]
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in chunk]
        rows: list[list[int]] = [[] for _ in chunk]
        finished = [False] * len(chunk)
        for tok in generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p,
                                   {tokenizer.eot_id}, seed + lo):
            for r, t in enumerate(tok.tolist()):
                if finished[r]:
                    continue
                if t == tokenizer.eot_id:
                    finished[r] = True
                    continue
                rows[r].append(t)
                # Check stop strings on the tail only: cheap, and enough to end the row early.
                if stop and _cut_at_stop(tokenizer.decode(rows[r][-32:]), stop)[1]:
                    finished[r] = True
            if all(finished):
                break
        results.extend(_cut_at_stop(tokenizer.decode(r), stop)[0] for r in rows)
    return results
