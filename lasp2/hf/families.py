"""The supported transformers architectures: which classes are models, which modules mix tokens,
and the lasp2 forward that replaces each linear-attention / SSM mixer's.

Softmax attention modules keep their forward (projections, norms, RoPE, gates) and run through
the ``"lasp2"`` attention interface; every other module is token-wise and runs unchanged.
Adding a family whose mixer lasp2 has: one adapter module, one shipped config, one row here (its
``doc`` is the row of ``docs/hf.md``'s generated table, ``markdown_table()``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from . import bailing_hybrid, bamba, falcon_h1, kimi_linear, lfm2, mamba, minimax, olmo_hybrid, qwen3_next


@dataclass(frozen=True)
class Family:
    name: str
    module: str                       # transformers modeling module
    models: Tuple[str, ...]           # model classes (first: the causal LM, its base model at ``base``)
    linear: Dict[str, Callable]       # linear mixer class -> replacement forward(layer, modeling, ...)
    softmax: Tuple[str, ...]          # softmax attention classes
    layer_types: object               # config attribute listing the layer kinds the model builds masks for,
                                      # or a tuple of those kinds (None: one attention_mask, passed as None)
    unsupported_config: Optional[Callable] = None   # config -> problem description or None
    base: Optional[str] = "model"     # attribute of the causal LM holding the base model, which passes
                                      # **kwargs to its layers (None: the causal LM drops them; hook it)
    tokenwise: Tuple[str, ...] = ()   # classes named like mixers (``Mamba2RMSNorm``...) that mix no tokens
    doc: Tuple[str, str, str, str] = ()  # (name, sequence mixers -> lasp2, short conv, softmax layers): the docs
    config: str = ""                  # the shipped tiny config (``lasp2/hf/configs``)
    prepare: Optional[Callable] = None  # (model, W) -> None: loss terms made exact shares (Bamba's z-loss)
    router_aux: bool = False          # the causal LM adds transformers' router aux loss: made exact shares
    slot: bool = False                # the decoder layers drop **kwargs on the way to the mixers (Mamba,
                                      # Jamba): the batch's SP context reaches them through a ``BatchSlot``
    since: Tuple[int, int] = (5, 23)  # oldest transformers release its parity tests pass on (older: refused)

    def modeling(self):
        return importlib.import_module(self.module)


def _gdn(fn):
    return lambda layer, modeling: (lambda *a, **k: fn(layer, modeling.l2norm, *a, **k))


def _plain(fn):
    return lambda layer, modeling: (lambda *a, **k: fn(layer, *a, **k))


def _olmo_hybrid_config(config) -> Optional[str]:
    if getattr(config, "linear_allow_neg_eigval", False):
        return ("config.linear_allow_neg_eigval = True: its Gated DeltaNet layers take beta in [0, 2], and lasp2's "
                "delta rule takes beta in [0, 1] (beta is never clamped); set linear_allow_neg_eigval = False")
    return _no_sliding_window(config)


def _no_sliding_window(config) -> Optional[str]:
    if getattr(config, "sliding_window", None) is not None:
        return (f"config.sliding_window = {config.sliding_window}: sliding-window softmax attention is not "
                f"supported under sequence parallelism; set it to None")
    return None


FAMILIES = (
    Family("qwen3_next", "transformers.models.qwen3_next.modeling_qwen3_next",
           ("Qwen3NextForCausalLM", "Qwen3NextModel"),
           {"Qwen3NextGatedDeltaNet": _gdn(qwen3_next.qwen3_next_gdn_forward)}, ("Qwen3NextAttention",),
           "layer_types",
           doc=('Qwen3-Next',
                'Gated DeltaNet (q/k L2-norm, GQA value heads) → `sp_linear_attention(q, k, v, g, beta)`',
                'kernel 4', 'gated, partial RoPE'), config='qwen3-next-tiny', router_aux=True),
    Family("qwen3_5", "transformers.models.qwen3_5.modeling_qwen3_5",
           ("Qwen3_5ForCausalLM", "Qwen3_5TextModel"),
           {"Qwen3_5GatedDeltaNet": _gdn(qwen3_next.qwen3_5_gdn_forward)}, ("Qwen3_5Attention",),
           "layer_types",
           doc=('Qwen3.5 (text)', 'Gated DeltaNet, as Qwen3-Next (separate projections)',
                'kernel 4', 'gated, partial RoPE'), config='qwen3.5-tiny'),
    Family("qwen3_5_moe", "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
           ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextModel"),
           {"Qwen3_5MoeGatedDeltaNet": _gdn(qwen3_next.qwen3_5_gdn_forward)}, ("Qwen3_5MoeAttention",),
           "layer_types",
           doc=('Qwen3.5-MoE (text)', 'Gated DeltaNet, as Qwen3.5; MoE MLPs',
                'kernel 4', 'gated, partial RoPE'), config='qwen3.5-moe-tiny', router_aux=True),
    Family("minimax", "transformers.models.minimax.modeling_minimax",
           ("MiniMaxForCausalLM", "MiniMaxModel"),
           {"MiniMaxLightningAttention": _plain(minimax.lightning_forward)}, ("MiniMaxAttention",),
           "layer_types", _no_sliding_window,
           doc=('MiniMax',
                'Lightning (constant decay −slope, no 1/√d, SiLU q/k/v, output gate) → `sp_linear_attention(q, k,'
                ' v, g)`',
                '—', 'no sliding window'), config='minimax-tiny', router_aux=True),
    Family("bamba", "transformers.models.bamba.modeling_bamba",
           ("BambaForCausalLM", "BambaModel"),
           {"BambaMixer": _plain(bamba.mamba2_forward)}, ("BambaAttention",),
           "layers_block_type", prepare=bamba.share_z_loss,
           doc=('Bamba', 'Mamba2 SSD: q = C, k = B (grouped), v = x·dt, g = A·dt, + D·x → `sp_linear_attention`',
                'kernel 4', 'RoPE'), config='bamba-tiny'),
    Family("mamba2", "transformers.models.mamba2.modeling_mamba2",
           ("Mamba2ForCausalLM", "Mamba2Model"),
           {"Mamba2Mixer": _plain(bamba.mamba2_forward)}, (), None, base="backbone",
           tokenwise=("Mamba2Block", "Mamba2RMSNorm", "Mamba2RMSNormGated"),
           doc=('Mamba2', 'Mamba2 SSD, as Bamba (no softmax layers)',
                'kernel 4', '—'), config='mamba2-tiny', since=(5, 25)),
    Family("nemotron_h", "transformers.models.nemotron_h.modeling_nemotron_h",
           ("NemotronHForCausalLM", "NemotronHModel"),
           {"NemotronHMamba2Mixer": _plain(bamba.mamba2_forward)}, ("NemotronHAttention",),
           "layer_types", _no_sliding_window,
           doc=('Nemotron-H', 'Mamba2 SSD, as Bamba; MLP and MoE blocks',
                'kernel 4', 'no RoPE, no sliding window'), config='nemotron-h-tiny', since=(5, 25)),
    Family("granitemoehybrid", "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
           ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridModel"),
           {"GraniteMoeHybridMambaLayer": _plain(bamba.mamba2_forward)}, ("GraniteMoeHybridAttention",),
           "layers_block_type", _no_sliding_window,
           doc=('Granite-4.0 hybrid',
                'Mamba2 SSD, as Bamba; MoE + shared MLP; embedding / residual / attention / logits multipliers '
                'kept',
                'kernel 4', 'RoPE or none'), config='granite-4.0-h-tiny', router_aux=True, since=(5, 25)),
    Family("falcon_h1", "transformers.models.falcon_h1.modeling_falcon_h1",
           ("FalconH1ForCausalLM", "FalconH1Model"),
           {"FalconH1Mixer": _plain(falcon_h1.falcon_h1_mixer_forward)}, ("FalconH1Attention",),
           ("full_attention", "linear_attention"), _no_sliding_window,
           doc=('Falcon-H1',
                'Mamba2 SSD **in parallel with** attention in every layer, outputs summed; µP multipliers '
                '(`mup_vector`, ssm/attention in/out, key, embedding, LM head) kept',
                'kernel 4', 'RoPE, key multiplier'), config='falcon-h1-tiny', since=(5, 25)),
    Family("zamba2", "transformers.models.zamba2.modeling_zamba2",
           ("Zamba2ForCausalLM", "Zamba2Model"),
           {"Zamba2MambaMixer": _plain(bamba.mamba2_forward)}, ("Zamba2Attention",),
           ("full_attention", "linear_attention"), _no_sliding_window, tokenwise=("Zamba2MambaDecoderLayer",),
           doc=('Zamba2',
                'Mamba2 SSD, as Bamba; a **shared** attention + MLP block (LoRA adapters) at several depths, its '
                'gradients summed over the applications',
                'kernel 4', 'shared block, RoPE'), config='zamba2-tiny', since=(5, 25)),
    Family("mamba", "transformers.models.mamba.modeling_mamba",
           ("MambaForCausalLM", "MambaModel"),
           {"MambaMixer": _plain(mamba.mamba_forward)}, (), None, base=None,
           tokenwise=("MambaBlock", "MambaRMSNorm"), slot=True,
           doc=('Mamba',
                'Mamba1 selective scan = per-channel gate, one head per channel: q = C, k = B, v = dt·x, g = dt ⊗'
                ' A [B, T, I, N] (K = N, V = 1), + D·x → `sp_linear_attention`',
                'kernel 4', '—'), config='mamba-tiny', since=(5, 25)),
    Family("falcon_mamba", "transformers.models.falcon_mamba.modeling_falcon_mamba",
           ("FalconMambaForCausalLM", "FalconMambaModel"),
           {"FalconMambaMixer": _plain(mamba.mamba_forward)}, (), None, base=None,
           tokenwise=("FalconMambaBlock", "FalconMambaRMSNorm", "FalconMambaWeightlessRMSNorm"), slot=True,
           doc=('Falcon-Mamba', 'Mamba1 selective scan, as Mamba, after RMSNorms on dt, B, C',
                'kernel 4', '—'), config='falcon-mamba-tiny', since=(5, 25)),
    Family("jamba", "transformers.models.jamba.modeling_jamba",
           ("JambaForCausalLM", "JambaModel"),
           {"JambaMambaMixer": _plain(mamba.mamba_forward)}, ("JambaAttention",), "layer_types", _no_sliding_window,
           tokenwise=("JambaMambaDecoderLayer",), slot=True,
           doc=('Jamba', 'Mamba1 selective scan, as Falcon-Mamba; MoE MLPs',
                'kernel 4', 'no RoPE'), config='jamba-tiny', router_aux=True, since=(5, 25)),
    Family("olmo_hybrid", "transformers.models.olmo_hybrid.modeling_olmo_hybrid",
           ("OlmoHybridForCausalLM", "OlmoHybridModel"),
           {"OlmoHybridGatedDeltaNet": _gdn(olmo_hybrid.olmo_hybrid_gdn_forward)}, ("OlmoHybridAttention",),
           "layer_types", _olmo_hybrid_config,
           doc=('OLMo hybrid',
                'Gated DeltaNet, as Qwen3-Next, with `linear_allow_neg_eigval=False` (β ∈ [0, 2] is refused)',
                'kernel 4', 'q/k norm, RoPE'), config='olmo-hybrid-tiny', since=(5, 25)),
    Family("lfm2", "transformers.models.lfm2.modeling_lfm2",
           ("Lfm2ForCausalLM", "Lfm2Model"),
           {"Lfm2ShortConv": _plain(lfm2.lfm2_conv_forward)}, ("Lfm2Attention",), "layer_types", _no_sliding_window,
           doc=('LFM2', 'gated short conv only (y = C · conv(B · x)), no scan',
                'kernel 3', 'GQA, q/k norm, RoPE'), config='lfm2-tiny', since=(5, 25)),
    Family("kimi_linear", "transformers.models.kimi_linear.modeling_kimi_linear",
           ("KimiLinearForCausalLM", "KimiLinearModel"),
           {"KimiLinearDeltaAttention": _gdn(kimi_linear.kda_forward),
            "KimiLinearAttention": _plain(kimi_linear.mla_forward)}, (), "layer_types",
           doc=('Kimi Linear',
                'KDA (per-channel gated delta rule, q/k L2-norm, g [B, T, H, K]) → `sp_linear_attention(q, k, v, g, '
                'beta)`; MLA → `sp_mla_attention` (all-gathers the latent, not K/V)',
                'kernel 4', 'MLA, no RoPE; MoE MLPs'), config='kimi-linear-tiny', since=(5, 25)),
    Family("bailing_hybrid", "transformers.models.bailing_hybrid.modeling_bailing_hybrid",
           ("BailingHybridForCausalLM", "BailingHybridModel"),
           {"BailingHybridDeltaAttention": _gdn(kimi_linear.kda_forward),
            "BailingHybridAttention": lambda layer, modeling: (
                lambda *a, **k: bailing_hybrid.bailing_mla_forward(layer, modeling, *a, **k))}, (), "layer_types",
           doc=('Ling hybrid (bailing_hybrid)', 'KDA, as Kimi Linear (one output-gate projection, safe gate); MLA '
                'with RoPE → `sp_mla_attention`, head-wise output gate',
                'kernel 4', 'MLA, RoPE on the shared key; MoE MLPs'), config='ling-hybrid-tiny', since=(5, 25)),
)


def loss_problem(config, family: "Family") -> Optional[str]:
    """A loss term the model would add that is not exact under SP (each rank would take a mean over
    its own tokens as if they were the whole sequence) and that the family does not make exact
    (``prepare``; the router aux loss: ``router_aux``, every family whose causal LM adds it), or
    None. Refused rather than approximated."""
    z = getattr(config, "z_loss_coefficient", 0) or 0
    if z > 0 and family.prepare is None:
        return (f"config.z_loss_coefficient = {z}: the z-loss is a mean of logsumexp(logits)^2 over the whole "
                f"sequence, which each rank would take over its own tokens; set it to 0 (and add the z-loss to "
                f"your loss share yourself: sum over your tokens / the batch's number of tokens)")
    return None


TABLE_HEADER = ("| family (transformers classes) | sequence mixers → lasp2 | short conv → `sp_causal_conv1d` | "
                "softmax layers → `sp_softmax_attention` | tiny config |\n|---|---|---|---|---|")


def markdown_table() -> str:
    """The families table of ``docs/hf.md`` (checked against this table by ``tests/hf/test_hf_families.py``)."""
    rows = [f"| {f.doc[0]} ({', '.join(f'`{m}`' for m in f.models)}) | {f.doc[1]} | {f.doc[2]} | {f.doc[3]} | "
            f"`{f.config}` |" for f in FAMILIES]
    return "\n".join([TABLE_HEADER] + rows)


def supported() -> str:
    return ", ".join(m for f in FAMILIES for m in f.models)


def _names(cls):
    return [c.__name__ for c in cls.__mro__]


def model_class(model, family: "Family") -> str:
    """The supported class ``model`` is (or subclasses): one of ``family.models``."""
    return next(n for n in _names(type(model)) if n in family.models)


def family_of(model) -> Family:
    """The family of ``model``: its class or a base class of it is a supported model class
    (a user subclass keeps the supported layers, which are checked one by one); ValueError
    listing what is supported otherwise."""
    names = _names(type(model))
    for f in FAMILIES:
        if any(n in f.models for n in names):
            return f
    raise ValueError(f"lasp2.hf does not support {type(model).__name__}; supported models: {supported()} "
                     f"({', '.join(f.doc[0] for f in FAMILIES)}) and their subclasses")


def mixer_class(module, known) -> Optional[str]:
    """The supported mixer class (a name in ``known``) whose forward ``module`` runs: its own
    class, or a base class when the subclass keeps that forward; None otherwise. A subclass that
    overrides ``forward`` is not a supported mixer (lasp2 would replace the code it adds)."""
    for cls in type(module).__mro__:
        if cls.__name__ in known:
            return cls.__name__ if type(module).forward is cls.forward else None
    return None
