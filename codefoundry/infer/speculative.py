"""Greedy speculative decoding: the target model's exact greedy output in fewer target calls.

A cheap drafter proposes the next few tokens; one target call over ``[last token] + drafts``
checks them all at once. Drafts are accepted while they equal the target's own greedy
choice, and the target's prediction after the last accepted token comes for free, so each
call yields between 1 and ``k + 1`` tokens. Rejected positions are rolled back from the KV
cache (:meth:`KVCache.truncate`).

* :func:`mtp_speculative_generate` — self-speculative: the model's own MTP heads draft.
* :func:`draft_speculative_generate` — a separate (smaller) draft model drafts.

Both run one sequence (batch 1); the model should be in eval mode (dropout off).
"""

from __future__ import annotations

from typing import Any

import torch

from codefoundry.errors import UserError
from codefoundry.infer.decode import cut_at_stop_id, fit_prompt
from codefoundry.model import Transformer


def _greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).flatten().tolist()


def _accept(drafts: list[int], preds: list[int]) -> int:
    """How many leading drafts equal the target's predictions."""
    n = 0
    while n < len(drafts) and drafts[n] == preds[n]:
        n += 1
    return n


def _fit(model: Transformer, prompt_ids: list[int], max_new_tokens: int, k: int) -> tuple[list[int], int]:
    """Prompt tail and token budget that leave room for the last verification window (the
    shared prompt-fitting rule with ``k`` more tokens to hold)."""
    max_len = model.cfg.max_seq_len
    if not prompt_ids:
        raise UserError("speculative decoding needs a non-empty prompt")
    prompt = fit_prompt(prompt_ids, max_new_tokens + k, max_len)
    return prompt, max(0, min(max_new_tokens, max_len - len(prompt) - k))


def _stats(out: list[int], calls: int, drafted: int, accepted: int) -> dict[str, Any]:
    return {"tokens": len(out), "model_calls": calls, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            "tokens_per_call": len(out) / calls if calls else 0.0}


@torch.no_grad()
def mtp_speculative_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                             stop_ids: set[int] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Greedy completion ids (up to and including a stop id) and decoding statistics.

    The MTP heads chain: head 1 drafts token t+2 from the hidden state at t and token t+1,
    head 2 drafts t+3 from head 1's state and that draft, and so on.
    """
    k = len(model.mtp)
    if k == 0:
        raise UserError("this model has no MTP heads (model.mtp_heads=0); use normal decoding")
    stop_ids = stop_ids or set()
    prompt, budget = _fit(model, prompt_ids, max_new_tokens, k)
    if budget == 0:
        return [], _stats([], 0, 0, 0)
    device = model.embed.weight.device
    cache = model.new_cache(1, len(prompt) + budget + k + 1)
    h = model.hidden_states(torch.tensor([prompt], device=device), cache)[:, -1:]
    out = _greedy(model.logits(h))
    calls, drafted, accepted = 1, 0, 0
    while len(out) < budget and out[-1] not in stop_ids:
        drafts, state, tok = [], h, out[-1]
        for head in model.mtp[:min(k, budget - len(out) - 1)]:
            state, hn = head(state, model.embed(torch.tensor([[tok]], device=device)))
            tok = _greedy(model.logits(hn))[0]
            drafts.append(tok)
        start = cache.pos
        h_all = model.hidden_states(torch.tensor([[out[-1]] + drafts], device=device), cache)
        calls += 1
        preds = _greedy(model.logits(h_all))
        n_ok = _accept(drafts, preds)
        cache.truncate(start + 1 + n_ok)
        drafted, accepted = drafted + len(drafts), accepted + n_ok
        out.extend(drafts[:n_ok] + [preds[n_ok]])
        h = h_all[:, n_ok:n_ok + 1]
    out = cut_at_stop_id(out[:budget], stop_ids)
    return out, _stats(out, calls, drafted, accepted)


@torch.no_grad()
def draft_speculative_generate(target: Transformer, draft: Transformer, prompt_ids: list[int],
                               max_new_tokens: int, k: int = 4,
                               stop_ids: set[int] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Greedy completion of ``target`` with ``k`` tokens drafted per round by ``draft`` (same tokenizer).

    ``model_calls`` counts target calls; ``draft_calls`` the draft model's.
    """
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(f"draft model vocab {draft.cfg.vocab_size} != target vocab {target.cfg.vocab_size}; "
                        "the draft must share the target's tokenizer")
    stop_ids = stop_ids or set()
    prompt, budget = _fit(target, prompt_ids, max_new_tokens, k)
    prompt, budget = _fit(draft, prompt, budget, k)
    if budget == 0:
        return [], _stats([], 0, 0, 0) | {"draft_calls": 0}
    device = target.embed.weight.device
    size = len(prompt) + budget + k + 1
    tcache, dcache = target.new_cache(1, size), draft.new_cache(1, size)
    out = _greedy(target(torch.tensor([prompt], device=device), cache=tcache)[:, -1])
    draft(torch.tensor([prompt], device=device), cache=dcache)
    calls, draft_calls, drafted, accepted = 1, 1, 0, 0
    pending = [out[-1]]  # tokens of the sequence the draft cache has not seen yet
    while len(out) < budget and out[-1] not in stop_ids:
        n = min(k, budget - len(out) - 1)
        dstart, drafts, feed = dcache.pos, [], pending
        for _ in range(n):
            drafts += _greedy(draft(torch.tensor([feed], device=device), cache=dcache)[:, -1])
            feed = drafts[-1:]
        draft_calls += n
        tstart = tcache.pos
        preds = _greedy(target(torch.tensor([[out[-1]] + drafts], device=device), cache=tcache))
        calls += 1
        n_ok = _accept(drafts, preds)
        tcache.truncate(tstart + 1 + n_ok)
        drafted, accepted = drafted + n, accepted + n_ok
        out.extend(drafts[:n_ok] + [preds[n_ok]])
        if n == 0:
            pending = pending + out[-1:]
        else:
            # The draft fed pending + drafts[:-1]; keep what was accepted, queue what it has not seen.
            dcache.truncate(min(dstart + len(pending) + n_ok, dcache.pos))
            pending = (drafts[-1:] if n_ok == n else []) + out[-1:]
    out = cut_at_stop_id(out[:budget], stop_ids)
    return out, _stats(out, calls, drafted, accepted) | {"draft_calls": draft_calls}
