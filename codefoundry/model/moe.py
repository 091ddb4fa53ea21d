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

Dispatch never reads the device from the host (no ``.tolist()``/``.item()``, no data-dependent
shapes, so ``torch.compile(fullgraph=True)`` sees one graph):

* ``grouped`` (bf16 compute, the GPU case): (token, slot) pairs are sorted by expert and all
  experts run as grouped GEMMs (``torch._grouped_mm``) over the sorted rows, with the group
  offsets computed on the device. Exactly the routed FLOPs.
* ``dense`` (fp32 compute, or a GPU without grouped GEMMs): every expert runs on every token
  and the gate matrix (zero for experts not chosen) weighs the results: ``n_experts / top_k``
  times the routed FLOPs, meant for CPU-sized models.

Both read the expert weights from the per-expert ``MLP`` modules (stacked per call), so the
parameter names stay ``experts.{i}.{gate,up,down}_proj``. The experts' ``nn.Linear`` modules
are therefore never called and never converted to FP8 (see ``train/fp8.py``).

Under data parallelism ``update_bias`` all-reduces the expert loads first, so every rank
applies the same bias update and the routing stays identical across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from codefoundry.config import ModelConfig
from codefoundry.model.mlp import MLP


def moe_dispatch(device: torch.device, dtype: torch.dtype) -> str:
    """``grouped`` or ``dense``: how the routed experts run for compute ``dtype`` on ``device``."""
    if dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return "dense"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)  # (torch.compile folds this one to a constant)
        return "grouped" if (props.major, props.minor) >= (9, 0) else "dense"
    return "grouped"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


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
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, slots, torch.ones_like(slots))
        dtype = _compute_dtype(flat)
        if moe_dispatch(x.device, dtype) == "grouped":
            routed = self._grouped(flat, slots, counts, gates, dtype)
        else:
            routed = self._dense(flat, experts, gates, dtype)
        out = routed.to(flat.dtype)
        for shared in self.shared_experts:
            out = out + shared(flat)
        if self.training:
            self._record(counts, scores)
        return out.view_as(x)

    def _stacked(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (E, out, in) of projection ``name`` over all experts, and biases (E, out) if any."""
        layers = [getattr(e, name) for e in self.experts]
        weight = torch.stack([layer.weight for layer in layers]).to(dtype)
        bias = torch.stack([layer.bias for layer in layers]).to(dtype) if layers[0].bias is not None else None
        return weight, bias

    def _expert_hidden(self, project) -> torch.Tensor:
        """The experts' activation, given ``project(name)`` = that projection's output."""
        kind = self.experts[0].kind
        if kind in ("swiglu", "smooth_swiglu"):  # Smooth-SwiGLU's scaling is exact identity outside FP8
            return F.silu(project("gate_proj")) * project("up_proj")
        up = project("up_proj")
        return F.relu(up).square() if kind == "relu2" else F.gelu(up)

    def _grouped(self, flat: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
        order = slots.argsort(stable=True)
        token, expert_of_row = order // self.top_k, slots[order]
        offsets = counts.cumsum(0).to(torch.int32)
        rows = flat[token].to(dtype)

        def grouped(inp: torch.Tensor, name: str) -> torch.Tensor:
            weight, bias = self._stacked(name, dtype)
            y = torch._grouped_mm(inp, weight.transpose(-2, -1), offs=offsets)
            return y + bias[expert_of_row] if bias is not None else y

        y = grouped(self._expert_hidden(lambda name: grouped(rows, name)), "down_proj")
        y = y * gates.flatten()[order, None].to(dtype)
        return torch.zeros_like(flat).index_add_(0, token, y.to(flat.dtype))  # top-k sums in the residual dtype

    def _dense(self, flat: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weights = torch.zeros(flat.shape[0], self.n_experts, dtype=dtype, device=flat.device).scatter(
            1, experts, gates.to(dtype))  # (N, E): the gate where chosen, else 0
        x = flat.to(dtype)

        def dense(inp: torch.Tensor, name: str) -> torch.Tensor:  # inp (N, in) or (E, N, in) -> (E, N, out)
            weight, bias = self._stacked(name, dtype)
            y = torch.matmul(inp, weight.transpose(-2, -1))
            return y + bias[:, None] if bias is not None else y

        y = dense(self._expert_hidden(lambda name: dense(x, name)), "down_proj")  # (E, N, dim)
        return torch.einsum("end,ne->nd", y, weights)

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
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank sees the global load, so the biases stay identical
        if self.bias_rate > 0:  # with no tokens seen, sign(0) = 0 leaves the bias alone
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
