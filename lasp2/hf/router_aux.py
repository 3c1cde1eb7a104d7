"""The MoE router auxiliary (load-balancing) loss, exact under sequence parallelism.

transformers' ``load_balancing_loss_func(router_logits, E, k)`` (Qwen3-Next, Qwen3.5-MoE, MiniMax,
Granite-4.0 hybrid, Jamba) takes, over every token of the sequence and every MoE layer, the
fraction of top-k picks per expert (``f``, [E], not differentiable) and the mean router
probability per expert (``P``, [E]), and returns aux = E * sum(f * P). Both are means over the
whole sequence; a rank that used its own tokens would get another number. Exact shares: every
rank holds the same number n of (token, layer) rows, so f = sum_r(count_r) / (W n) and
P = sum_r(psum_r) / (W n). With f gathered (one all-gather of E floats per forward, all layers
at once), rank r's share E * sum(f * psum_r / (W n)) is linear in its own probabilities: the
shares sum over the SP group to aux, value and gradient. ``out.aux_loss`` becomes this share and
``out.loss`` carries coef * share in place of the per-rank term transformers added.
"""
from __future__ import annotations

import torch

from ..parallel import comm


def _stats(router_logits, num_experts: int, top_k: int):
    """Per-expert top-k counts (fp32, no gradient), router-probability sums (fp32) and row count of
    this rank's (token, layer) rows, as ``load_balancing_loss_func`` computes them (no mask)."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    psum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for gate in router_logits:
        weights = torch.nn.functional.softmax(gate.to(counts.device), dim=-1)
        _, selected = torch.topk(weights, top_k, dim=-1)
        counts = counts + torch.bincount(selected.reshape(-1), minlength=num_experts).float()
        psum = psum + weights.float().sum(dim=0)
        rows += weights.shape[0]
    return counts, psum, rows


def exact_router_aux_loss(model, group) -> None:
    """Wrap this causal LM instance's forward so that its router auxiliary loss (when the model
    computes one: ``output_router_logits=True``) is this rank's exact share (module docstring).

    Communication: 1 all-gather of E fp32 per forward that computes the auxiliary loss."""
    forward = model.forward
    num_experts, top_k, coef = model.num_experts, model.num_experts_per_tok, model.router_aux_loss_coef

    def sp_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        aux = getattr(out, "aux_loss", None)
        if aux is None or not isinstance(getattr(out, "router_logits", None), tuple):
            return out
        counts, psum, rows = _stats(out.router_logits, num_experts, top_k)
        world = comm.rank_and_size(group)[1]
        total = world * rows
        f = comm.all_gather(counts.detach(), group).sum(dim=0) / total
        share = (f * psum / total).sum() * num_experts
        if out.loss is not None:
            out.loss = out.loss + coef * (share - aux).to(out.loss.device)
        out.aux_loss = share
        return out

    model.forward = sp_forward
