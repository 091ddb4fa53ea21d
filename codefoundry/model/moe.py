"""Mixture-of-experts feed-forward: routed experts + always-on shared experts.

Routing (DeepSeek-V3 style):

1. scores ``s = sigmoid(router(x))`` per expert;
2. selection uses ``s + expert_bias``: experts are split into ``moe_groups`` groups, each group
   is scored by the sum of its two best biased scores, the best ``moe_group_top_k`` groups are
   kept, and the ``moe_top_k`` best experts inside them are chosen;
3. gates are the *unbiased* scores of the chosen experts, normalised to sum to 1.

Auxiliary-loss-free balancing: ``expert_bias`` only affects which experts are chosen, never
the gate values, and after every optimizer step (``update_bias``, called from the model's
``post_step``) it moves by ``moe_bias_rate`` towards equal load: up for experts that got fewer
tokens than average, down for those that got more. A Switch-style auxiliary loss
(``moe_aux_loss``) is available as well.

Dispatch is batched: (token, slot) pairs are sorted by expert and each expert runs once on
its contiguous slice, so the Python loop is over experts, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from codefoundry.config import ModelConfig
from codefoundry.model.mlp import MLP


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.groups, self.group_top_k = cfg.moe_groups, cfg.moe_group_top_k
        self.bias_rate, self.aux_coef = cfg.moe_bias_rate, cfg.moe_aux_loss
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.shared_experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.moe_shared_experts))
        # Saved with the weights: routing at inference depends on it.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        # Tokens per expert since the last bias update / the last metrics read (training only).
        self.register_buffer("load_pending", torch.zeros(cfg.n_experts), persistent=False)
        self.register_buffer("load_logged", torch.zeros(cfg.n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None  # of the latest training forward, when moe_aux_loss > 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens (N, dim): chosen experts (N, k), their gates (N, k), all scores (N, E)."""
        scores = torch.sigmoid(self.router(x).float())
        biased = scores + self.expert_bias
        if self.groups > 1:
            n, per_group = x.shape[0], self.n_experts // self.groups
            grouped = biased.view(n, self.groups, per_group)
            group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            keep = group_score.topk(self.group_top_k, dim=-1).indices
            allowed = torch.zeros(n, self.groups, dtype=torch.bool, device=x.device).scatter(1, keep, True)
            biased = biased.masked_fill(~allowed.repeat_interleave(per_group, dim=1), float("-inf"))
        experts = biased.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, experts)
        return experts, gates / gates.sum(-1, keepdim=True), scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        experts, gates, scores = self.route(flat)
        slots = experts.flatten()  # (N * k,) expert of every (token, slot)
        order = slots.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(slots, minlength=self.n_experts)
        chunks = flat[token].split(counts.tolist())
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        y = y * gates.flatten()[order, None].to(y.dtype)
        out = torch.zeros_like(flat).index_add_(0, token, y.to(flat.dtype))
        for shared in self.shared_experts:
            out = out + shared(flat)
        if self.training:
            self._record(counts, scores)
        return out.view_as(x)

    def _record(self, counts: torch.Tensor, scores: torch.Tensor) -> None:
        with torch.no_grad():
            self.load_pending += counts
            self.load_logged += counts
        self.aux_loss = None
        if self.aux_coef > 0:
            # Switch Transformer: E * sum_i (fraction of slots to i) * (mean routing probability of i).
            frac = counts.float() / counts.sum()
            prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
            self.aux_loss = self.aux_coef * self.n_experts * (frac * prob).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step: nudge under-loaded experts up, over-loaded ones down."""
        load = self.load_pending
        if self.bias_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
        load.zero_()

    @torch.no_grad()
    def load_fractions(self) -> torch.Tensor:
        """Share of routed slots each expert received since the last call (then resets the count)."""
        load = self.load_logged.clone()
        self.load_logged.zero_()
        return load / load.sum().clamp(min=1)

    def inactive_params(self) -> int:
        """Parameters a token does not use: the experts it is not routed to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.top_k) * per_expert
