"""References for the lasp2.hf tests: the unmodified transformers models on one process.

transformers' PyTorch fallbacks run the Gated DeltaNet scan (``torch_chunk_gated_delta_rule``)
and the Mamba2 scan (``mamba2_chunk_scan``) in fp32 whatever the model's dtype, and route them
to fla / mamba_ssm when those are installed (fla is, here, and needs a GPU). So the reference
model runs with these two module-level kernels pinned, inside ``hf_kernels``:
- fp32: transformers' own PyTorch fallbacks (``lasp2.hf.loading.use_torch_kernels``, which selects
  them where transformers does not do so for CPU tensors itself), nothing else changed;
- fp64: the same computation in fp64 (``gdn_fp64`` / ``mamba2_fp64``: transformers' own l2norm,
  head repetition, gate and skip handling around lasp2's per-token oracle ``ops/naive.py``),
  shown equal to transformers' fallbacks to fp32 precision by ``test_fp64_kernels_match``.
Softmax attention runs with transformers' ``sdpa`` (its ``eager`` path takes the softmax in
fp32) and MoE experts with the ``eager`` loop (``grouped_mm`` has no fp64 kernel).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from lasp2.hf.loading import build_model, load_config, use_torch_kernels
from lasp2.ops.naive import naive_linear_attention

# Tiny test configs: the shipped ones, cut to 3 layers with both layer kinds.
CONFIGS = {
    "qwen3_next": ("qwen3-next-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                             "linear_attention"])),
    "qwen3_5": ("qwen3.5-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                       "linear_attention"])),
    "qwen3_5_moe": ("qwen3.5-moe-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                               "linear_attention"])),
    "minimax": ("minimax-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                       "linear_attention"], block_size=8)),
    "bamba": ("bamba-tiny", dict(num_hidden_layers=3, attn_layer_indices=[1], mamba_chunk_size=8)),
    "mamba2": ("mamba2-tiny", dict(num_hidden_layers=2, chunk_size=8)),
    "nemotron_h": ("nemotron-h-tiny", dict(layers_block_type=["linear_attention", "full_attention", "moe"],
                                           chunk_size=8)),
    "granitemoehybrid": ("granite-4.0-h-tiny", dict(num_hidden_layers=3, mamba_chunk_size=8,
                                                    layer_types=["mamba", "attention", "mamba"])),
    "falcon_h1": ("falcon-h1-tiny", dict(num_hidden_layers=2, mamba_chunk_size=8)),
    "zamba2": ("zamba2-tiny", dict(num_hidden_layers=3, layers_block_type=["hybrid", "mamba", "hybrid"],
                                   chunk_size=8)),
    "mamba": ("mamba-tiny", dict(num_hidden_layers=2)),
    "falcon_mamba": ("falcon-mamba-tiny", dict(num_hidden_layers=2)),
    "jamba": ("jamba-tiny", dict(num_hidden_layers=3, attn_layer_period=3)),
    "olmo_hybrid": ("olmo-hybrid-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                               "linear_attention"])),
    "lfm2": ("lfm2-tiny", dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"])),
    "kimi_linear": ("kimi-linear-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                               "linear_attention"],
                                             mlp_layer_types=["dense", "sparse", "sparse"])),
    "bailing_hybrid": ("ling-hybrid-tiny", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                                  "linear_attention"],
                                                mlp_layer_types=["dense", "sparse", "sparse"])),
}
MODULES = {"qwen3_next": "transformers.models.qwen3_next.modeling_qwen3_next",
           "qwen3_5": "transformers.models.qwen3_5.modeling_qwen3_5",
           "qwen3_5_moe": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
           "minimax": "transformers.models.minimax.modeling_minimax",
           "bamba": "transformers.models.bamba.modeling_bamba",
           "mamba2": "transformers.models.mamba2.modeling_mamba2",
           "nemotron_h": "transformers.models.nemotron_h.modeling_nemotron_h",
           "granitemoehybrid": "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
           "falcon_h1": "transformers.models.falcon_h1.modeling_falcon_h1",
           "zamba2": "transformers.models.zamba2.modeling_zamba2",
           "mamba": "transformers.models.mamba.modeling_mamba",
           "falcon_mamba": "transformers.models.falcon_mamba.modeling_falcon_mamba",
           "jamba": "transformers.models.jamba.modeling_jamba",
           "olmo_hybrid": "transformers.models.olmo_hybrid.modeling_olmo_hybrid",
           "lfm2": "transformers.models.lfm2.modeling_lfm2",
           "kimi_linear": "transformers.models.kimi_linear.modeling_kimi_linear",
           "bailing_hybrid": "transformers.models.bailing_hybrid.modeling_bailing_hybrid"}


def make_model(family: str, dtype: torch.dtype, seed: int = 0):
    name, overrides = CONFIGS[family]
    torch.manual_seed(seed)
    model = build_model(load_config(name, **overrides), dtype=dtype)
    with torch.no_grad():  # transformers zero-initialises some norm weights: make every path visible
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def gdn_fp64(modeling):
    """``torch_chunk_gated_delta_rule`` in fp64; with g [B, T, H, K] also Kimi Linear's
    ``chunk_kimi_delta_attention`` (KDA: the same signature, l2norm and scale)."""
    def kernel(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, **kwargs):
        assert initial_state is None and not output_final_state
        rep = value.shape[2] // key.shape[2]
        query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
        query, key, value, g, beta = (x.double() for x in (query, key, value, g, beta))
        if use_qk_l2norm_in_kernel:
            query, key = modeling.l2norm(query, dim=-1, eps=1e-6), modeling.l2norm(key, dim=-1, eps=1e-6)
        o, _ = naive_linear_attention(query, key, value, g, beta, scale=query.shape[-1] ** -0.5)
        return o, None
    return kernel


def mamba2_fp64(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    assert initial_states is None and not return_final_states
    H, G = hidden_states.shape[2], B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).double()
    x = hidden_states.double()
    B, C = (t.double().repeat_interleave(H // G, dim=2) for t in (B, C))
    y, _ = naive_linear_attention(C, B, x * dt[..., None], A.double() * dt, scale=1.0)
    return y if D is None else y + D[..., None] * x


def mamba1_fp64(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, **kwargs):
    """transformers' ``mamba_selective_scan`` (its per-token recurrence, written out) in fp64:
    hidden_states/dt/z [b, I, T], A [I, N], B/C [b, N, T]."""
    assert not return_last_state
    dt = dt.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double()[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    x, A, B, C = hidden_states.double(), A.double(), B.double(), C.double()
    state = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])           # [b, I, N]
    ys = []
    for t in range(x.shape[2]):
        state = torch.exp(A * dt[:, :, t, None]) * state + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + x * D.double()[None, :, None]
    return y if z is None else y * F.silu(z.double())


@contextlib.contextmanager
def hf_kernels(family: str, dtype: torch.dtype, model):
    """Pin the reference model's scan kernels (see the module docstring)."""
    use_torch_kernels(model)
    modeling = importlib.import_module(MODULES[family])
    pins = {"torch_chunk_gated_delta_rule": gdn_fp64(modeling), "mamba2_chunk_scan": mamba2_fp64,
            "mamba_selective_scan": mamba1_fp64, "chunk_kimi_delta_attention": gdn_fp64(modeling)}
    saved: Dict[str, object] = {}
    if dtype == torch.float64:
        for name, fp64 in pins.items():
            if getattr(modeling, name, None) is not None:
                saved[name] = getattr(modeling, name)
                setattr(modeling, name, fp64)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)


@contextlib.contextmanager
def head_output(model):
    """The LM head's own output, before the casts some causal LMs apply (Mamba, Mamba2, Nemotron-H
    return ``lm_head(h).float()``: fp32 logits from an fp64 model). ``logits(out)`` picks it when
    ``out.logits`` is not in the model's dtype, and ``out.logits`` otherwise."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
    dtype = next(model.parameters()).dtype

    def logits(out):
        return out.logits if out.logits.dtype == dtype else seen[-1]

    try:
        yield logits
    finally:
        handle.remove()


def shift(labels: torch.Tensor, cu: Optional[list]) -> torch.Tensor:
    """Next-token targets of the whole sequence; -100 at the end of each document."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    for end in (cu or [])[1:]:
        out[:, end - 1] = -100
    return out


def reference(family: str, dtype: torch.dtype, ids: torch.Tensor, cu: Optional[list] = None,
              autocast: bool = False) -> dict:
    """Logits, mean next-token loss and every parameter gradient of the unmodified model on the
    whole sequence (documents: each document fed alone, as packing means). ``autocast``: the
    forward runs inside ``torch.autocast("cpu", torch.bfloat16)`` (transformers' own kernels)."""
    model = make_model(family, dtype)
    spans = [(0, ids.shape[1])] if cu is None else list(zip(cu[:-1], cu[1:]))
    targets = shift(ids, cu)
    n = int((targets != -100).sum())
    with hf_kernels(family, dtype, model), torch.autocast("cpu", torch.bfloat16, enabled=autocast), \
            head_output(model) as head:
        logits, hf_loss = [], 0.0
        for a, b in spans:
            out = model(input_ids=ids[:, a:b], labels=ids[:, a:b], use_cache=False)
            logits.append(head(out))
            hf_loss = hf_loss + out.loss * int((targets[:, a:b] != -100).sum())
        logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / n
    names = [k for k, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "logits": logits.detach(),
            "loss": loss.detach(), "hf_loss": (hf_loss / n).detach(),
            "grads": {k: (torch.zeros_like(p) if g is None else g)
                      for (k, p), g in zip(model.named_parameters(), grads)},
            "names": names, "n": n}
