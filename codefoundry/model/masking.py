"""Attention masks built once per forward pass and shared by every layer, and the choice of
attention kernel they are built for.

Three kernels (:func:`attention_kernel` says which one a config takes on a device):

* ``sdpa-causal`` — plain causal rows without sinks: SDPA's ``is_causal`` path (flash on
  CUDA, GQA through ``enable_gqa``); the mask is ``None``.
* ``flex`` — CUDA, with document masking and/or attention sinks: FlexAttention over a
  block-sparse :class:`BlockMask` (fully masked tiles are skipped; sinks are folded in through
  the log-sum-exp it returns), so no O(T^2) tensor is ever materialised.
* ``sdpa-masked`` — everything else: SDPA with one explicit boolean mask (B, 1, Tq, Tk), True =
  may attend. That is decoding with a KV cache, CPU training with document masks or sinks
  (FlexAttention is only fast when compiled for CUDA), and CUDA training with attention dropout
  (FlexAttention has none; SDPA's memory-efficient kernel takes the mask and the dropout).

The dense mask covers:

* causal offset: queries sit at positions ``start .. start+Tq-1`` of ``Tk`` keys (KV cache);
* left padding: keys flagged invalid in ``KVCache.key_valid`` are hidden;
* document masking (``cfg.doc_mask``): packed rows hold documents that each begin with
  ``cfg.doc_sep_id`` (EOT); a query only sees keys of its own document. Document ids are the
  running count of separators, so the cache can carry them across decoding steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache

if TYPE_CHECKING:  # FlexAttention imports torch._dynamo (seconds): loaded only when a block mask is built
    from torch.nn.attention.flex_attention import BlockMask

KERNELS = ("sdpa-causal", "flex", "sdpa-masked")
_forced: str | None = None  # set by force_attention_kernel (tests, the GPU check's CPU smoke run)


@contextlib.contextmanager
def force_attention_kernel(kernel: str) -> Iterator[None]:
    """Take ``kernel`` for every training/prefill forward inside the block, whatever the device."""
    global _forced
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    before, _forced = _forced, kernel
    try:
        yield
    finally:
        _forced = before


def attention_kernel(cfg: ModelConfig, device: torch.device, dropout: float = 0.0, decoding: bool = False) -> str:
    """The kernel a forward pass of ``cfg`` takes on ``device`` (``dropout``: the attention dropout
    in effect, 0 in eval mode; ``decoding``: a KV cache is in use)."""
    masked = cfg.doc_mask or cfg.attn_sinks
    if decoding:
        return "sdpa-masked" if masked else "sdpa-causal"
    if _forced is not None:
        return _forced
    if not masked:
        return "sdpa-causal"
    return "flex" if device.type == "cuda" and dropout == 0 else "sdpa-masked"


def document_ids(idx: torch.Tensor, sep_id: int, first: torch.Tensor | int = 0) -> torch.Tensor:
    """(B, T) document index of every position: ``first`` plus the separators seen so far (inclusive)."""
    return (idx == sep_id).cumsum(dim=1) + first


def build_mask(idx: torch.Tensor, cfg: ModelConfig, kernel: str,
               cache: KVCache | None = None) -> torch.Tensor | BlockMask | None:
    """The mask every layer of one forward pass uses with ``kernel`` (see the module docstring)."""
    if kernel == "flex":
        return block_mask(idx, cfg)
    return attention_mask(idx, cfg, cache)


def block_mask(idx: torch.Tensor, cfg: ModelConfig) -> BlockMask:
    """FlexAttention's block-sparse causal (and, with ``cfg.doc_mask``, same-document) mask for ``idx`` (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = idx.shape
    if not cfg.doc_mask:
        return create_block_mask(_causal, None, None, t, t, device=idx.device)
    docs = document_ids(idx, cfg.doc_sep_id)

    def same_document(batch, head, q, k):
        return (q >= k) & (docs[batch, q] == docs[batch, k])

    return create_block_mask(same_document, b, None, t, t, device=idx.device)


def _causal(batch, head, q, k):
    return q >= k


def attention_mask(idx: torch.Tensor, cfg: ModelConfig, cache: KVCache | None = None) -> torch.Tensor | None:
    """The dense mask for token ids ``idx`` (B, Tq) appended after ``cache.pos`` cached positions.

    ``None`` means "plain causal, queries are the last Tq keys" (Tq == Tk, or Tq == 1).
    Records the new positions' document ids in the cache when document masking is on.
    """
    b, tq = idx.shape
    start = cache.pos if cache is not None else 0
    tk = start + tq
    key_valid = cache.key_valid if cache is not None else None
    docs_q = docs_k = None
    if cfg.doc_mask:
        if cache is None:
            docs_q = docs_k = document_ids(idx, cfg.doc_sep_id)
        else:
            first = cache.doc_ids[:, start - 1:start] if start > 0 else 0
            docs_q = document_ids(idx, cfg.doc_sep_id, first)
            docs_k = cache.store_documents(docs_q)
    if docs_q is None and key_valid is None and (start == 0 or tq == 1):
        return None
    qpos = torch.arange(start, tk, device=idx.device)[:, None]
    kpos = torch.arange(tk, device=idx.device)[None, :]
    mask = (qpos >= kpos)[None].expand(b, tq, tk)
    if docs_q is not None:
        mask = mask & (docs_q[:, :, None] == docs_k[:, None, :])
    if key_valid is not None:
        # Each query may always see itself, so a padding row never becomes fully masked
        # (an all -inf softmax would put NaNs into the cache).
        mask = (mask & key_valid[:, None, :tk]) | (qpos == kpos)[None]
    return mask[:, None]
