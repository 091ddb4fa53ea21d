"""Attention masks built once per forward pass and shared by every layer.

The common case (a full causal row with no padding and no document boundaries) returns
``None`` so attention can use SDPA's fused ``is_causal`` path. Anything else becomes one
explicit boolean mask (True = may attend) of shape (B, 1, Tq, Tk):

* causal offset: queries sit at positions ``start .. start+Tq-1`` of ``Tk`` keys (KV cache);
* left padding: keys flagged invalid in ``KVCache.key_valid`` are hidden;
* document masking (``cfg.doc_mask``): packed rows hold documents that each begin with
  ``cfg.doc_sep_id`` (EOT); a query only sees keys of its own document. Document ids are the
  running count of separators, so the cache can carry them across decoding steps.

The dense boolean mask works on every device (on CUDA SDPA runs it in its memory-efficient
kernel). It costs O(T^2) memory per row; a FlexAttention block-sparse mask, which would
skip fully masked tiles, is not implemented.
"""

from __future__ import annotations

import torch

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache


def document_ids(idx: torch.Tensor, sep_id: int, first: torch.Tensor | int = 0) -> torch.Tensor:
    """(B, T) document index of every position: ``first`` plus the separators seen so far (inclusive)."""
    return (idx == sep_id).cumsum(dim=1) + first


def attention_mask(idx: torch.Tensor, cfg: ModelConfig, cache: KVCache | None = None) -> torch.Tensor | None:
    """The mask for token ids ``idx`` (B, Tq) appended after ``cache.pos`` cached positions.

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
