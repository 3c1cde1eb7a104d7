"""Generation for Linear-Llama: prefill the prompt under sequence parallelism, then decode.

    tokens = lasp2.generate(model, input_ids, group=group, max_new_tokens=64)   # [B, T + n], every rank

Prefill. The prompt's longest prefix that splits over the SP group (a multiple of W, 2W under
zigzag) that leaves at least one token over runs sharded across the group: every linear layer
calls ``sp_linear_attention(..., output_final_state=True)`` — LASP-2's one all-gather already
gives every rank every segment's summary, so the state after the prefix is one more fold step
and is bitwise identical on every rank — and every softmax layer calls
``sp_softmax_attention(..., return_kv=True)`` (K/V of the whole prefix in sequence order, from
the gather LASP-2H already does). No layer needs the prefix's logits, so the LM head (and the
last block's MLP) never runs on it.

Decode. The rest of the prompt (1 to J tokens, J the number of segments) and every new token
then run on every rank on the same states (``extend``): linear layers continue from their state
(the chunked op with ``initial_state`` for several tokens, ``lasp2.linear_attention_step`` for
one), softmax layers attend over the cached K/V. Every rank computes the same logits and, with
the same seed, samples the same tokens: no communication per token. A cache holds one
[B, H, K, V] state per linear layer (constant in the context length) and the K/V of every
softmax layer (linear in it).

Communication: one all-gather of an 8-byte digest (all ranks hold the same prompt and
settings), then the prefill's forward collectives (LASP-2: one all-gather per linear layer,
LASP-2H: one per softmax layer); none while decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..functional import linear_attention, softmax_attention
from ..ops.softmax import attention_reference
from ..ops.step import linear_attention_step
from ..parallel import comm
from ..parallel.api import shard, sp_linear_attention, sp_softmax_attention
from ..parallel.batch import batch_digest
from ..parallel.layout import LAYOUTS, Layout
from ..validation import check_choice, check_group
from ..nn import LinearAttention, SoftmaxAttention
from .linear_llama import LinearLlama


@dataclass
class LinearLlamaCache:
    """What decoding continues from: per layer, a linear layer's state [B, H, K, V] (fp32, fp64
    for fp64 models) or a softmax layer's keys and values [B, L, Hkv, D] (after RoPE); ``length``
    L, the tokens consumed so far (the position of the next token)."""

    states: List[Optional[torch.Tensor]]
    keys: List[Optional[torch.Tensor]]
    values: List[Optional[torch.Tensor]]
    length: int = 0

    @classmethod
    def empty(cls, layers: int) -> "LinearLlamaCache":
        return cls([None] * layers, [None] * layers, [None] * layers, 0)

    def nbytes(self) -> int:
        """Bytes held: the linear states (constant in the length) and the softmax K/V (linear in it)."""
        return sum(t.numel() * t.element_size() for t in self.states + self.keys + self.values if t is not None)


@dataclass(frozen=True)
class SPPlan:
    """How a prompt is prefilled: ``group`` (None: one process), its size, ``layout`` and the
    strategies of the two kinds of layer."""

    group: object = None
    world: int = 1
    layout: str = "contiguous"
    strategy: str = "lasp2"
    softmax_strategy: str = "allgather"

    @property
    def multiple(self) -> int:
        """The prefix length the SP prefill runs must be a multiple of (the number of segments)."""
        return self.world * (2 if self.layout == "zigzag" and self.world > 1 else 1)

    def prefix_len(self, prompt_len: int) -> int:
        """Tokens prefilled under SP: the largest multiple of ``multiple`` below ``prompt_len`` (at
        least one token is left, so every rank computes the next token's logits itself)."""
        return 0 if self.world == 1 else (prompt_len - 1) // self.multiple * self.multiple


def unwrap(model) -> LinearLlama:
    """The LinearLlama inside ``model`` (itself, or the module of a DDP wrapper); ValueError for
    anything else and for FSDP2-sharded parameters."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, LinearLlama):
        raise ValueError(f"lasp2.generate takes a lasp2.models.LinearLlama (or its DDP wrapper), got "
                         f"{type(model).__name__}; for transformers models use lasp2.hf.sp_prefill and the model's "
                         f"own generate")
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in inner.parameters()):
        raise ValueError("the model's parameters are sharded (FSDP2): generation needs whole parameters on every "
                         "rank; load the checkpoint into a plain LinearLlama (as `lasp2 generate` does)")
    return inner


def plan_for(model: LinearLlama, group, layout: Optional[str]) -> SPPlan:
    """The SP plan: the group, layout and strategies of a model ``lasp2.parallelize`` prepared, or
    ``group`` / ``layout`` (default contiguous) with LASP-2 / LASP-2H for a plain model."""
    contexts = {m.sp for m in model.modules() if getattr(m, "sp", None) is not None}
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if not contexts:
        if group is None:
            return SPPlan(layout=layout or "contiguous")
        check_group(group)
        return SPPlan(group, comm.rank_and_size(group)[1], layout or "contiguous")
    groups, layouts = {id(c.group) for c in contexts}, {c.layout for c in contexts}
    sp_group = next(iter(contexts)).group
    if group is not None and group is not sp_group:
        raise ValueError("group is not the sequence-parallel group the model was parallelized over; pass that "
                         "group (or none)")
    if layout is not None and layouts != {layout}:
        raise ValueError(f"layout={layout!r} but the model was parallelized with layout={sorted(layouts)[0]!r}; "
                         f"pass that layout (or none)")
    assert len(groups) == 1 and len(layouts) == 1, "parallelize gives every module one group and layout"
    linear = {m.sp.strategy for m in model.modules() if isinstance(m, LinearAttention) and m.sp is not None}
    softmax = {m.sp.strategy for m in model.modules() if isinstance(m, SoftmaxAttention) and m.sp is not None}
    return SPPlan(sp_group, comm.rank_and_size(sp_group)[1], layouts.pop(), next(iter(linear), "lasp2"),
                  next(iter(softmax), "allgather"))


# ---- one process: continue from a cache ------------------------------------------------------------

def _linear_extend(attn, h: torch.Tensor, state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v, g, beta = attn.project(h)
    if state is not None and h.shape[1] == 1:  # one token: the recurrent form
        o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                                         None if beta is None else beta[:, 0], state=state, scale=attn.scale)
        return attn.output(o[:, None], h), state
    o, state = linear_attention(q, k, v, g, beta, scale=attn.scale, initial_state=state,
                                output_final_state=True, backend=attn.backend)
    return attn.output(o, h), state


def _softmax_extend(attn, h: torch.Tensor, cache: LinearLlamaCache, i: int) -> torch.Tensor:
    start, t = cache.length, h.shape[1]
    positions = torch.arange(start, start + t, device=h.device)
    q, k, v = attn.project(h, positions)
    if cache.keys[i] is None:  # nothing cached: the whole (causal) sequence so far
        cache.keys[i], cache.values[i] = k, v
        return attn.output(softmax_attention(q, k, v))
    cache.keys[i] = torch.cat([cache.keys[i], k], dim=1)
    cache.values[i] = torch.cat([cache.values[i], v], dim=1)
    o = attention_reference(q, cache.keys[i], cache.values[i], q_pos=positions,
                            k_pos=torch.arange(start + t, device=h.device))
    return attn.output(o)


@torch.no_grad()
def extend(model: LinearLlama, input_ids: torch.Tensor, cache: LinearLlamaCache) -> torch.Tensor:
    """Run ``input_ids`` [B, t] (t >= 1, the tokens after the cache's) on this process from
    ``cache``, which is updated in place; returns the logits of the last token [B, vocab].
    Communication: none."""
    x = model.tok_embeddings(input_ids)
    for i, block in enumerate(model.layers):
        h = block.attn_norm(x)
        if block.layer_type == "L":
            a, cache.states[i] = _linear_extend(block.attn, h, cache.states[i])
        else:
            a = _softmax_extend(block.attn, h, cache, i)
        x = x + a
        x = x + block.mlp(block.mlp_norm(x))
    cache.length += input_ids.shape[1]
    return model.output(model.norm(x[:, -1]))


# ---- the group: prefill under SP ------------------------------------------------------------------

@torch.no_grad()
def sp_prefill(model: LinearLlama, input_ids: torch.Tensor, plan: SPPlan) -> LinearLlamaCache:
    """The cache after ``input_ids`` [B, P] (the whole prefix, identical on every rank; P a
    multiple of ``plan.multiple``), computed sharded over ``plan.group``; identical on every rank.

    Communication: per linear layer the strategy's forward collectives (LASP-2: 1 all-gather of
    the segment summaries), per softmax layer the softmax strategy's (LASP-2H: 1 all-gather of K/V).
    """
    group, layout = plan.group, plan.layout
    rank, world = comm.rank_and_size(group)
    P = input_ids.shape[1]
    local = shard(input_ids, group=group, layout=layout)
    positions = Layout(layout, world, P // world).global_positions(rank, device=input_ids.device)
    cache = LinearLlamaCache.empty(len(model.layers))
    x = model.tok_embeddings(local)
    for i, block in enumerate(model.layers):
        h, attn = block.attn_norm(x), block.attn
        if block.layer_type == "L":
            q, k, v, g, beta = attn.project(h)
            o, cache.states[i] = sp_linear_attention(q, k, v, g, beta, group=group, layout=layout, scale=attn.scale,
                                                     strategy=plan.strategy, backend=attn.backend,
                                                     output_final_state=True)
            x = x + attn.output(o, h)
        else:
            q, k, v = attn.project(h, positions)
            o, (cache.keys[i], cache.values[i]) = sp_softmax_attention(q, k, v, group=group, layout=layout,
                                                                       strategy=plan.softmax_strategy, return_kv=True,
                                                                       backend=attn.backend)
            x = x + attn.output(o)
        if i < len(model.layers) - 1:  # the last block's MLP only feeds the LM head
            x = x + block.mlp(block.mlp_norm(x))
    cache.length = P
    return cache


def prefill(model: LinearLlama, input_ids: torch.Tensor, plan: SPPlan) -> Tuple[LinearLlamaCache, torch.Tensor]:
    """(cache after the whole prompt, logits of its last token [B, vocab]), on every rank: the SP
    prefix (``plan.prefix_len``) under SP, the rest from its cache on every rank."""
    P = plan.prefix_len(input_ids.shape[1])
    cache = sp_prefill(model, input_ids[:, :P], plan) if P else LinearLlamaCache.empty(len(model.layers))
    return cache, extend(model, input_ids[:, P:], cache)


# ---- sampling ---------------------------------------------------------------------------------------

def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """Next token per row [B] int64: argmax for temperature 0, else a sample of softmax(logits /
    temperature) restricted to the top_k largest (all when None) drawn from ``generator``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]


@dataclass(frozen=True)
class Sampling:
    """The generation settings, checked (ValueError naming the argument)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    seed: int = 0
    eos_id: Optional[int] = None
    vocab_size: int = field(default=0, repr=False)

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {self.top_k!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.eos_id is not None and (not is_int(self.eos_id) or not 0 <= self.eos_id < self.vocab_size):
            raise ValueError(f"eos_id must be None or a token id in [0, {self.vocab_size}), got {self.eos_id!r}")


def _check_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an int tensor [B, T] with T >= 1 (the whole prompt, identical on every "
                         f"rank), got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < vocab_size):
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, group=None, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, eos_id: Optional[int] = None,
             layout: Optional[str] = None) -> torch.Tensor:
    """Continue ``input_ids`` with a :class:`LinearLlama` (pure or hybrid), the prompt prefilled
    across a sequence-parallel group.

    Args:
        model: a ``LinearLlama`` (or its DDP wrapper), identical on every rank; plain, or prepared
            by ``lasp2.parallelize`` (its SP group, layout and strategies are then used).
        input_ids: [B, T] int64/int32, the whole prompt, identical on every rank (checked); any T >= 1
            (the longest prefix that splits over the group and leaves one token runs under SP,
            the rest in decode mode).
        group: the SP group (None: the model's, or one process). layout: "contiguous" or
            "zigzag" (None: the model's, or contiguous).
        max_new_tokens: tokens to add (fewer when every row has produced ``eos_id``).
        temperature: 0 is greedy (argmax); > 0 samples softmax(logits / temperature), from the
            ``top_k`` most likely tokens when given, with a generator seeded by ``seed``: the
            same tokens on every rank and for every group size.
        eos_id: rows that produced it continue with it; generation stops when every row has.

    Returns:
        [B, T + n] int64 on input_ids' device (the prompt, then n <= max_new_tokens new tokens),
        the same on every rank.

    Communication: 1 all-gather of an 8-byte digest, then the prefill's forward collectives
    (LASP-2: 1 all-gather per linear layer; LASP-2H: 1 per softmax layer); none per new token.
    """
    model = unwrap(model)
    settings = Sampling(max_new_tokens, temperature, top_k, seed, eos_id, model.config.vocab_size)
    _check_ids(input_ids, model.config.vocab_size)
    plan = plan_for(model, group, layout)
    if plan.world > 1:
        digest = batch_digest("lasp2.generate", input_ids, repr(settings), plan.layout)
        comm.check_same_digest(plan.group, digest, "prompts or generation settings")
    input_ids = input_ids.long()
    cache, logits = prefill(model, input_ids, plan)
    generator = torch.Generator(device=logits.device).manual_seed(settings.seed)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    for step in range(settings.max_new_tokens):
        token = pick(logits, settings.temperature, settings.top_k, generator)
        if settings.eos_id is not None:
            token = torch.where(done, torch.full_like(token, settings.eos_id), token)
            done |= token == settings.eos_id
        new.append(token)
        if step + 1 == settings.max_new_tokens or bool(done.all()):
            break
        logits = extend(model, token[:, None], cache)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
