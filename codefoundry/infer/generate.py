"""Generation from a model, built on the one decoding step (:mod:`codefoundry.infer.decode`).

* :func:`generate_tokens` — a static batch of left-padded prompts under shared sampling
  settings; yields each step's (B,) token tensor (tests, exports and benches compare them).
* :func:`stream` — text deltas for one prompt (a :class:`~codefoundry.infer.engine.Request`
  decoded step by step).
* :func:`complete_batch` — completions for many prompts (eval, speedrun).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from codefoundry.infer.decode import DecodeBatch, TextDeltas, fit_prompt
from codefoundry.infer.engine import Decoder, Request
from codefoundry.infer.sampling import SamplingParams, sample_next
from codefoundry.model import Transformer
from codefoundry.tokenizer import CodeTokenizer

__all__ = ["complete_batch", "generate_tokens", "sample_next", "stream"]


@torch.no_grad()
def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, stop_ids: set[int] | None = None,
                    seed: int | None = None,
                    sample: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield a (B,) tensor of new tokens per step; stops when every row has hit a stop id.

    Every row stays in the batch to the end and one generator (``seed``) samples them all, so
    a row's tokens depend on its batch; ``sample`` (logits (B, V) -> ids (B,)) replaces the
    shared temperature/top-k/top-p sampler.
    """
    max_len = model.cfg.max_seq_len
    prompts = [fit_prompt(p, max_new_tokens, max_len) for p in prompts]
    width = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, max_len - width)
    batch = DecodeBatch(model, len(prompts), width + max_new_tokens)
    device = batch.cache.k.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    logits = batch.join(prompts)
    for _ in range(max_new_tokens):
        tok = sample(logits) if sample is not None else sample_next(logits, temperature, top_k, top_p, generator)
        yield tok
        if len(stop):
            done |= torch.isin(tok, stop)
            if bool(done.all()):
                return
        logits = batch.step(tok)


def stream(model: Transformer, tokenizer: CodeTokenizer, prompt: str | list[int], max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
           seed: int | None = None, stop_at_eot: bool = True, stop_ids: set[int] | None = None) -> Iterator[str]:
    """Yield text deltas of one completion, ending at a stop string, EOT or any of ``stop_ids``."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stop_ids = set(stop_ids or ()) | ({tokenizer.eot_id} if stop_at_eot else set())
    pending: list[str] = []
    request = Request(ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, stop=list(stop or []), stop_ids=stop_ids, seed=seed),
                      on_text=pending.append)
    decoder = Decoder(model, tokenizer, 1)
    decoder.add([request])
    while True:
        yield from pending
        pending.clear()
        if request.done.is_set():
            return
        decoder.step()


def complete_batch(model: Transformer, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   stop: list[str] | None = None, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Completion text for each prompt (string or token ids), cut at the first stop string or EOT.

    Each chunk of ``batch_size`` prompts is one :func:`generate_tokens` batch seeded ``seed + offset``.
    """
    results: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in chunk]
        rows = [TextDeltas(tokenizer, stop) for _ in chunk]
        finished = [False] * len(chunk)
        for tok in generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p,
                                   {tokenizer.eot_id}, seed + lo):
            for r, t in enumerate(tok.tolist()):
                if finished[r]:
                    continue
                if t == tokenizer.eot_id:
                    finished[r] = True
                    continue
                rows[r].add(t)
                finished[r] = rows[r].stopped
            if all(finished):
                break
        results.extend(r.text for r in rows)
    return results
