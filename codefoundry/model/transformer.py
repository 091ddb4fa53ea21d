"""The decoder-only transformer: embeddings -> blocks -> norm -> (tied) LM head [+ MTP heads].

The training loss folds in every auxiliary term a config switches on (z-loss, MoE balancing
loss, multi-token prediction), so the trainer only ever calls ``model(x, y)``; in eval mode
the loss is the plain cross-entropy, so validation and bits-per-byte stay comparable.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from codefoundry.config import ModelConfig
from codefoundry.model.chunked_ce import chunked_cross_entropy
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.layers import Block
from codefoundry.model.masking import attention_kernel, build_mask
from codefoundry.model.moe import MoE
from codefoundry.model.mtp import MTPHead
from codefoundry.model.norm import RMSNorm
from codefoundry.model.rope import rope_tables
from codefoundry.tokenizer.special import (
    IGNORE_INDEX,  # the label the loss skips (re-exported for callers)
)

# model.loss_chunk=0 ("auto"): vocabularies this large get the cross-entropy in chunks of about
# AUTO_CHUNK_ELEMENTS logits (rows rounded down to a multiple of 256), so fp32 logits never exist
# for the whole batch (8 x 2048 tokens x 49,152 x 4 bytes = 3.2 GB; a 1280-row chunk is 250 MB).
AUTO_CHUNK_VOCAB = 32768
AUTO_CHUNK_ELEMENTS = 2**26


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_heads))
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_parts: dict[str, torch.Tensor] = {}  # auxiliary terms of the latest training loss
        # The MoE layers, found once: the loss, post_step and metrics visit them every step.
        self.moe_layers: list[MoE] = [m for m in self.modules() if isinstance(m, MoE)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled down with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            s = std
            if self.cfg.depth_scaled_init and name.endswith(("o_proj.weight", "down_proj.weight")):
                s = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(p, mean=0.0, std=s)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for token ids (B, T)."""
        start = cache.pos if cache is not None else 0
        t = idx.shape[1]
        if start + t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        if cache is not None and cache.row_pos is not None:  # each row at its own position (continuous batching)
            at = cache.row_pos[:, None] + torch.arange(t, device=idx.device)
            cos, sin = self.rope_cos[at][:, None], self.rope_sin[at][:, None]
        dropout = self.cfg.dropout if self.training else 0.0
        kernel = attention_kernel(self.cfg, idx.device, dropout, decoding=cache is not None)
        mask = build_mask(idx, self.cfg, kernel, cache)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) without targets; with targets the cross-entropy (ignoring -100)."""
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets, reduction)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the LM head on hidden states (B, T, dim), ignoring targets equal to -100.

        In training mode the enabled auxiliary terms are added (each already weighted):
        ``z_loss * mean(logsumexp^2)``, the MoE balancing loss, and ``mtp_loss_weight`` times
        the mean cross-entropy of the MTP heads. The head runs over :meth:`loss_chunk_rows` rows at
        a time with its gradients formed in the same pass (:mod:`codefoundry.model.chunked_ce`,
        z-loss included), so full-vocabulary logits never exist for the whole batch at once.
        """
        c = self.cfg
        with_z = self.training and c.z_loss > 0
        ce, z = self._ce_sums(h.reshape(-1, h.shape[-1]), targets.reshape(-1), with_z)
        n = (targets != IGNORE_INDEX).sum().clamp(min=1)
        main = ce if reduction == "sum" else ce / n
        if not self.training:
            return main
        parts: dict[str, torch.Tensor] = {}
        if with_z:
            parts["z_loss"] = c.z_loss * z / n
        aux = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        if aux:
            parts["moe_aux_loss"] = sum(aux)
        if len(self.mtp):
            parts["mtp_loss"] = c.mtp_loss_weight * self._mtp_loss(h, targets)
        self.loss_parts = {k: v.detach() for k, v in parts.items()}
        if not parts:
            return main
        extra = sum(parts.values())
        return main + (extra * n if reduction == "sum" else extra)

    def _ce_sums(self, h: torch.Tensor, targets: torch.Tensor, with_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and summed squared log-partition over rows (N, dim), chunked if configured."""
        chunk = self.loss_chunk_rows()
        if chunk > 0 and h.shape[0] > chunk:
            return chunked_cross_entropy(h, self.lm_head.weight, targets, chunk, self.cfg.logit_softcap, with_z)
        logits = self.logits(h).float()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if not with_z:
            return ce, ce.new_zeros(())
        return ce, (logits.logsumexp(dim=-1).square() * (targets != IGNORE_INDEX)).sum()

    def loss_chunk_rows(self) -> int:
        """Rows per cross-entropy chunk, 0 = unchunked: ``model.loss_chunk`` if > 0, none if < 0,
        and for 0 (auto) about :data:`AUTO_CHUNK_ELEMENTS` logits from a :data:`AUTO_CHUNK_VOCAB`-token vocabulary up."""
        c, vocab = self.cfg.loss_chunk, self.cfg.vocab_size
        if c == 0:
            return max(256, AUTO_CHUNK_ELEMENTS // vocab // 256 * 256) if vocab >= AUTO_CHUNK_VOCAB else 0
        return max(c, 0)

    def _mtp_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over heads of each head's mean cross-entropy; head k predicts token t+k+1 at position t.

        Head k reads the embedding of token t+k (= ``targets[:, t+k-1]``); positions whose
        input tokens are unknown (-100, e.g. a masked prompt) are not scored.
        """
        t = targets.shape[1]
        state, known = h, torch.ones_like(targets, dtype=torch.bool)
        losses = []
        for k, head in enumerate(self.mtp, start=1):
            if t <= k:
                break
            inputs = targets[:, k - 1:t - 1]
            known = known[:, :t - k] & (inputs != IGNORE_INDEX)
            state, hn = head(state[:, :t - k], self.embed(inputs.clamp(min=0)))
            tgt = targets[:, k:].masked_fill(~known, IGNORE_INDEX)
            ce, _ = self._ce_sums(hn.reshape(-1, hn.shape[-1]), tgt.reshape(-1), False)
            losses.append(ce / (tgt != IGNORE_INDEX).sum().clamp(min=1))
        return torch.stack(losses).mean() if losses else h.new_zeros(())

    def post_step(self) -> None:
        """Called by the trainer after each optimizer step: MoE aux-loss-free bias updates."""
        for m in self.moe_layers:
            m.update_bias()

    def extra_metrics(self) -> dict[str, float]:
        """Auxiliary loss terms of the latest step, and MoE router load since the previous call.

        ``moe_load_cv``: coefficient of variation of expert load, averaged over MoE layers (0 =
        perfectly even). ``moe_load_max``: the busiest expert's load relative to an even share.
        """
        out = {k: float(v) for k, v in self.loss_parts.items()}
        loads = [m.load_fractions() for m in self.moe_layers]
        if loads and all(f.sum() > 0 for f in loads):
            fractions = torch.stack(loads)
            mean = 1.0 / fractions.shape[1]
            out["moe_load_cv"] = float((fractions.std(dim=1, unbiased=False) / mean).mean())
            out["moe_load_max"] = float(fractions.max() / mean)
        return out

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.device, p.dtype)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """All parameters (tied weights once, frozen ones included)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def num_active_params(self, exclude_embedding: bool = False) -> int:
        """Parameters one token uses: all of them minus the routed experts it is not sent to."""
        inactive = sum(m.inactive_params() for m in self.moe_layers)
        return self.num_params(exclude_embedding) - inactive

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for active weights + causal attention.

        The LM head counts once per prediction (the trunk's and each MTP head's), tied or not.
        Attention per layer and token: 2·T·H·d for QK^T and 2·T·H·d_v for PV in the forward pass,
        x3 with the backward, halved because a causal query sees on average half the keys
        (FlashAttention's and torchtitan's convention); differential attention's values are
        twice as wide (d_v = 2d). Document masking skips more, which is not credited.
        """
        c = self.cfg
        n = self.num_active_params(exclude_embedding=True)
        if c.tie_embeddings:
            n += self.embed.weight.numel()  # the tied head still does its matmul
        n += c.mtp_heads * self.lm_head.weight.numel()
        d_v = 2 * c.head_dim if c.diff_attn else c.head_dim
        attention = 3 * c.n_layers * c.n_heads * (c.head_dim + d_v) * seq_len  # 6·L·H·2d·T / 2
        return 6 * n + attention
