"""lasp2: LASP-2 sequence parallelism for linear-attention and hybrid language models.

Shape legend (fla layout, used everywhere in lasp2):

    B  batch            T  tokens (the *local* shard length in sequence-parallel functions)
    H  query heads      Hkv key/value heads (softmax attention, GQA: H % Hkv == 0)
    K  key/query dim    V  value dim           N  documents (packed sequences, B == 1)
    W  ranks in the sequence-parallel group

    q, k  [B, T, H, K]     v  [B, T, H, V]
    g     [B, T, H] (scalar gate / constant decay) or [B, T, H, K] (per-channel), log space, <= 0
    beta  [B, T, H] in [0, 2] (delta rule; > 1: negative eigenvalues)
    state [B, H, K, V] fp32, or [N, H, K, V] with cu_seqlens
    cu_seqlens [N + 1] int, global cumulative document lengths

Single-device functions: ``linear_attention``, ``softmax_attention``; one decode step of linear
attention: ``linear_attention_step`` (q, k [B, H, K], v [B, H, V], state [B, H, K, V]).
Sequence-parallel functions: ``sp_linear_attention``, ``sp_softmax_attention``,
``sp_mla_attention`` (multi-head latent attention: all-gathers the latent), plus ``shard`` /
``unshard``; ``SPBatch`` is one batch's sequence-parallel context (group, layout, positions,
documents; checked once when built: ``SPBatch.build``), which every SP function and parallelized
layer takes in place of group / layout / cu_seqlens. Short causal conv (Gated DeltaNet / Mamba2): ``causal_conv1d``, ``sp_causal_conv1d``
(x [B, T, C], weight [C, k]). Generation (Linear-Llama): ``generate`` (SP prefill of the prompt, then
decoding on every rank; docs/inference.md). Hugging Face models: ``lasp2.hf`` (optional, needs
transformers; ``lasp2.hf.sp_prefill`` for generation).
"""
from .functional import causal_conv1d, linear_attention, softmax_attention
from .ops.step import linear_attention_step
from .parallel.halo import sp_causal_conv1d
from .parallel.api import shard, sp_linear_attention, sp_softmax_attention, unshard
from .parallel.mla import sp_mla_attention
from .parallel.batch import SPBatch
from .models.parallelize import parallelize
from .models.generate import generate
from .parallel.mesh import dp_sp_group, global_token_mean

__all__ = ["linear_attention", "softmax_attention", "sp_linear_attention", "sp_softmax_attention", "shard",
           "unshard", "parallelize", "global_token_mean", "dp_sp_group", "causal_conv1d", "sp_causal_conv1d",
           "SPBatch", "linear_attention_step", "generate", "sp_mla_attention"]
__version__ = "0.1.0"
