"""What ``lasp2 bench`` measures: one suite per family of layers, each a set of configurations
run side by side on the same inputs, with the single-device ideal as the baseline.

A suite is any object with (the ``model`` suite plugs in through this protocol):

    configs()                           names, the baseline "ideal" included
    skip_reason(config, spec, W)        None, or why the configuration cannot run at W
    inputs(spec, T_local, W, rank, device, group) -> dict of this rank's tensors ("leaves" need
                                           grads, "do" is the output gradient)
    forward(config, x, group, spec)     this rank's output (the harness runs backward on it)

The ideal is what a rank would take if sequence parallelism cost nothing: the one-device op
doing exactly 1/W of the whole sequence's work, run on every rank at once (so that ranks
sharing a CPU or a node contend as they do in the SP run) and never communicating.
"""
from __future__ import annotations


import torch

from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, softmax

IDEAL = "ideal"
LAYOUTS = ("contiguous", "zigzag")


def split_layout(config: str, spec):
    """(strategy, layout) of a configuration: ``allgather@zigzag`` under ``--layout both``."""
    name, _, layout = config.partition("@")
    return name, layout or spec.layout


def _dtype(spec) -> torch.dtype:
    return getattr(torch, spec.dtype)


def _randn(gen, *shape, spec, device):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=_dtype(spec)).requires_grad_()


class LinearSuite:
    """Causal linear attention, by default with a scalar decay gate (Lightning/Mamba2-style;
    ``--variants`` picks another: basic, channel, deltanet, gated_deltanet): every linear
    strategy of the registry (``lasp2.parallel.strategies``) and the ideal, ``linear_attention``
    on the local shard. ``--world-sizes 1`` adds the single process (the SP local path and the
    one-device op on a group of one rank)."""

    name = "linear"
    strategies = LINEAR_STRATEGIES

    def configs(self):
        return list(self.strategies) + [IDEAL]

    def skip_reason(self, config, spec, W):
        return None

    def inputs(self, spec, T, W, rank, device, group):
        from .inputs import make_inputs

        leaves, do = make_inputs(spec.variant, T, spec.heads, spec.dim, _dtype(spec), device, seed=1000 + rank,
                                 batch=spec.batch)
        return {"args": leaves, "leaves": [t for t in leaves if t is not None], "do": do}

    def forward(self, config, x, group, spec):
        import lasp2

        q, k, v, g, beta = x["args"]
        if config == IDEAL:
            return lasp2.linear_attention(q, k, v, g, beta, backend=spec.backend)[0]
        strategy, layout = split_layout(config, spec)
        return lasp2.sp_linear_attention(q, k, v, g, beta, group=group, strategy=strategy, layout=layout,
                                         backend=spec.backend)


class SoftmaxSuite:
    """Causal softmax attention (GQA with ``kv_heads``): all-gather (LASP-2H), ring, Ulysses.

    The ideal gives every rank T_local queries against W T_local / 2 keys with no mask: the same
    number of query-key pairs as 1/W of the causal triangle of the whole sequence.
    """

    name = "softmax"
    strategies = SOFTMAX_STRATEGIES

    def configs(self):
        return list(self.strategies) + [IDEAL]

    def shards_queries(self, strategy):
        """Whether a rank's work follows its query positions (its visible causal pairs), which
        --layout decides; Ulysses attends the whole sequence on a share of the heads instead."""
        return not softmax(strategy).heads_divisible

    def skip_reason(self, config, spec, W):
        config = split_layout(config, spec)[0]
        if config != IDEAL and softmax(config).heads_divisible and spec.heads % W:
            return f"{config} needs heads % W == 0 (heads={spec.heads}, W={W})"
        return None

    def inputs(self, spec, T, W, rank, device, group):
        gen = torch.Generator().manual_seed(2000 + rank)
        B, H, Hkv, D = spec.batch, spec.heads, spec.kv_heads or spec.heads, spec.dim
        q = _randn(gen, B, T, H, D, spec=spec, device=device)
        k, v = (_randn(gen, B, T, Hkv, D, spec=spec, device=device) for _ in range(2))
        n_keys = max(1, W * T // 2)
        k_ideal, v_ideal = (_randn(gen, B, n_keys, Hkv, D, spec=spec, device=device) for _ in range(2))
        do = torch.randn(B, T, H, D, generator=gen).to(device=device, dtype=_dtype(spec))
        return {"leaves": (q, k, v, k_ideal, v_ideal), "do": do}

    def forward(self, config, x, group, spec):
        import lasp2
        from lasp2.ops.softmax import attention_blockwise

        q, k, v, k_ideal, v_ideal = x["leaves"]
        if config == IDEAL:
            return attention_blockwise(q, k_ideal, v_ideal, causal=False)
        strategy, layout = split_layout(config, spec)
        return lasp2.sp_softmax_attention(q, k, v, group=group, strategy=strategy, layout=layout)


class ModelSuite:
    """A whole Linear-Llama3 forward and backward (``lasp2.models``): 4 blocks "LLLN" (one
    softmax layer in four, the paper's hybrid), hidden = heads x dim, SwiGLU 4 x hidden, basic
    linear attention, vocabulary 256, loss gradient on the logits. Configurations are
    (linear, softmax) strategy pairs, attached as each attention module's ``SPContext`` (what
    ``lasp2.parallelize`` does, without its DDP wrapper: gradient all-reduce is the same for
    every strategy and is not what is compared). The ideal is the same model on the local
    tokens with no SP; its softmax layer does 1/W of the causal work of the whole sequence only
    approximately (T_local^2 / 2 pairs instead of W T_local^2 / 2), which slightly flatters it.
    """

    name = "model"
    strategies = ("lasp2+allgather", "lasp2+ring", "lasp1+ring")

    def configs(self):
        return list(self.strategies) + [IDEAL]

    def skip_reason(self, config, spec, W):
        return None

    def inputs(self, spec, T, W, rank, device, group):
        from lasp2.models import LinearLlama, LinearLlamaConfig
        from lasp2.nn import LinearAttention, SoftmaxAttention, SPContext

        hidden = spec.heads * spec.dim
        cfg = LinearLlamaConfig(vocab_size=256, hidden=hidden, layers=4, heads=spec.heads,
                                kv_heads=spec.kv_heads or spec.heads, mlp_hidden=4 * hidden, layer_pattern="LLLN")
        models = {}
        for c in self.configs():
            m = LinearLlama(cfg, seed=0, device=device).to(_dtype(spec))
            for mod in m.modules():
                if isinstance(mod, LinearAttention):
                    mod.backend = spec.backend
            if c != IDEAL:
                lin, soft = c.split("+")
                for mod in m.modules():
                    if isinstance(mod, (LinearAttention, SoftmaxAttention)):
                        mod.sp = SPContext(group, lin if isinstance(mod, LinearAttention) else soft, spec.layout)
            models[c] = m
        gen = torch.Generator().manual_seed(3000 + rank)
        ids = torch.randint(0, 256, (spec.batch, T), generator=gen).to(device)
        do = torch.randn(spec.batch, T, 256, generator=gen).to(device=device, dtype=_dtype(spec))
        return {"leaves": [p for m in models.values() for p in m.parameters()], "do": do, "ids": ids,
                "models": models}

    def forward(self, config, x, group, spec):
        return x["models"][config](x["ids"])


class HFSuite:
    """A transformers hybrid model (``--hf-config``, e.g. qwen3-next-tiny) forward and backward:
    ``lasp2.hf.parallelize``-d (LASP-2 + LASP-2H over the SP group, halo convs) against the ideal,
    the unmodified model on this rank's shard with no SP (weak scaling: same tokens per rank). On
    CPU the unmodified model runs transformers' own PyTorch kernels (fla's Triton kernels, which
    transformers picks when fla is installed, need a GPU). Loss gradient on the logits; ``--heads``
    and ``--dim`` do not apply (the config fixes the shapes)."""

    name = "hf"
    strategies = ("lasp2+allgather",)

    def configs(self):
        return list(self.strategies) + [IDEAL]

    def skip_reason(self, config, spec, W):
        return None

    def inputs(self, spec, T, W, rank, device, group):
        from lasp2 import hf
        from lasp2.hf.loading import build_model, load_config, use_torch_kernels

        config = load_config(spec.hf_config)
        torch.manual_seed(0)
        plain = build_model(config, dtype=_dtype(spec), device=device)
        if device.type == "cpu":
            use_torch_kernels(plain)
        sp = build_model(load_config(spec.hf_config), dtype=_dtype(spec), device=device)
        sp.load_state_dict(plain.state_dict())
        lin, soft = self.strategies[0].split("+")
        hf.parallelize(sp, group, layout=spec.layout, strategy=lin, softmax_strategy=soft)
        whole = torch.randint(0, config.vocab_size, (spec.batch, T * W), generator=torch.Generator().manual_seed(3000))
        batch = hf.shard_batch(whole.to(device), group=group, layout=spec.layout)  # the same batch on every rank
        gen = torch.Generator().manual_seed(3000 + rank)
        do = torch.randn(spec.batch, T, config.vocab_size, generator=gen).to(device=device, dtype=_dtype(spec))
        models = {self.strategies[0]: sp, IDEAL: plain}
        return {"leaves": [p for m in models.values() for p in m.parameters()], "do": do, "batch": batch,
                "models": models}

    def forward(self, config, x, group, spec):
        if config == IDEAL:  # the unmodified model on this rank's tokens
            return x["models"][config](input_ids=x["batch"]["input_ids"], use_cache=False).logits
        return x["models"][config](**x["batch"], use_cache=False).logits  # tokens + the batch's SP context


SUITES = {"linear": LinearSuite, "softmax": SoftmaxSuite, "model": ModelSuite, "hf": HFSuite}
SUITE_NAMES = ("linear", "softmax", "model", "hf")


def get_suite(name: str):
    """The suite called ``name`` (``linear``, ``softmax``, ``model`` or ``hf``)."""
    if name in SUITES:
        return SUITES[name]()
    raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITE_NAMES)}")
