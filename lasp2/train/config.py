"""TrainConfig: the typed, validated description of a ``lasp2 train`` run.

Every field is a command-line flag (``--seq-len`` for ``seq_len``; see ``lasp2.train.cli``), and
the model can be reshaped with the fields of :class:`lasp2.models.LinearLlamaConfig` as flags
(``--hidden 128 --heads 8``), collected in ``TrainConfig.model``. Validation happens in
``__post_init__`` (ValueError naming the flag and the fix); what needs the world size (``--sp``
dividing it) is checked by :meth:`TrainConfig.resolve_world`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..models import PRESETS, LinearLlamaConfig
from ..models.parallelize import DATA_PARALLEL
from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from ..ops.backends import BACKENDS
from ..ops.softmax_backends import SOFTMAX_BACKENDS
from ..parallel.layout import LAYOUTS

TASKS = ("mqar", "text", "tokens")
DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
DOC_SEPS = ("blank-line", "line", "none")

# What ``lasp2 train`` changes in a preset unless --linear / --layer-pattern say otherwise. On the
# default MQAR run (250 steps) the debug preset's own bla/LLLN reaches a query accuracy of ~0.14,
# mamba2/NLLL ~0.30 (chance 0.06): recall needs a previous-token lookup, which a first softmax
# layer (RoPE) and input-dependent gates learn, while basic linear attention has no notion of position.
TRAIN_DEFAULTS: Dict[str, Dict[str, Any]] = {"debug": {"linear_variant": "mamba2", "layer_pattern": "NLLL"}}

# Fields that may change when a run is resumed (they do not change what the model computes up
# to the checkpoint). ``steps`` may grow; the learning-rate schedule stays the checkpoint run's
# (``schedule_steps``): steps past it train at lr * min_lr_ratio.
RESUMABLE_CHANGES = ("steps", "out", "resume", "save_every", "log_every", "timeout_s", "plot", "device",
                     "tuned_allocator", "export_hf")


def train_default(preset: str, name: str) -> Any:
    """The LinearLlamaConfig field ``name`` that ``lasp2 train`` uses for ``preset`` when no flag
    sets it (TRAIN_DEFAULTS over the preset): what ``--help`` shows."""
    return {**PRESETS[preset], **TRAIN_DEFAULTS.get(preset, {})}[name]


def _train_defaults_text(name: str) -> str:
    changed = [f"{train_default(p, name)} for the {p} preset" for p in PRESETS if name in TRAIN_DEFAULTS.get(p, {})]
    return "the preset's" + (", but " + " and ".join(changed) if changed else "")


def _help(text: str, **extra) -> Dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """One training run. Field metadata holds the ``--help`` text of its flag."""

    # ---- model ---------------------------------------------------------------------------------
    preset: str = field(default="debug", metadata=_help(f"model preset: {', '.join(PRESETS)}"))
    linear: Optional[str] = field(default=None, metadata=_help(
        "linear-attention variant of the 'L' layers (lasp2.nn.LINEAR_VARIANTS); default: "
        f"{_train_defaults_text('linear_variant')} (see TRAIN_DEFAULTS)"))
    layer_pattern: Optional[str] = field(default=None, metadata=_help(
        "one letter per layer, cycled: L linear, N softmax attention (e.g. LLLN); default: "
        f"{_train_defaults_text('layer_pattern')}"))
    model: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        "LinearLlamaConfig overrides (set by the model flags, e.g. --hidden)", flag=False))
    dtype: str = field(default="float32", metadata=_help(
        "float32; bfloat16 = autocast mixed precision with fp32 weights; float64"))
    activation_checkpointing: bool = field(default=False, metadata=_help(
        "recompute every block's activations in backward: memory for long sequences (each block's SP "
        "forward collectives then run once more, during backward)"))
    hf_config: Optional[str] = field(default=None, metadata=_help(
        "train a Hugging Face transformers model instead of LinearLlama: a shipped tiny config "
        "(qwen3-next-tiny, qwen3.5-tiny, qwen3.5-moe-tiny, minimax-tiny, bamba-tiny), a config JSON or a "
        "directory with config.json (lasp2.hf; the model flags above do not apply)"))
    hf_weights: Optional[str] = field(default=None, metadata=_help(
        "with or instead of --hf-config: a local directory of safetensors weights (and config.json) to fine-tune"))
    export_hf: Optional[str] = field(default=None, metadata=_help(
        "with --hf-config / --hf-weights: at the end, write the final checkpoint to this new directory as a "
        "transformers model (config.json + safetensors, as lasp2 export does) for from_pretrained"))
    # ---- parallelism ---------------------------------------------------------------------------
    sp: int = field(default=2, metadata=_help("sequence-parallel ranks per sequence"))
    dp: Optional[int] = field(default=None, metadata=_help(
        "data-parallel replicas (default: 1 when self-launched, WORLD_SIZE / sp under torchrun)"))
    strategy: str = field(default="lasp2", metadata=_help(f"linear SP strategy: {', '.join(LINEAR_STRATEGIES)}"))
    softmax_strategy: str = field(default="allgather", metadata=_help(
        f"softmax SP strategy: {', '.join(SOFTMAX_STRATEGIES)}"))
    layout: str = field(default="contiguous", metadata=_help(f"token layout over SP ranks: {', '.join(LAYOUTS)}"))
    data_parallel: str = field(default="ddp", metadata=_help(
        "how parameters are held across the dp x sp ranks: ddp (full replicas, single-file checkpoints) or "
        "fsdp2 (fully_shard over the flattened dp x sp ranks: parameters, gradients and optimizer state "
        "sharded; sharded DCP checkpoints that resume at another --dp/--sp)"))
    backend: str = field(default="auto", metadata=_help(
        f"linear-attention kernels: {', '.join(BACKENDS)} (auto: fla's Triton kernels on CUDA when installed)"))
    softmax_backend: str = field(default="auto", metadata=_help(
        f"softmax-attention kernel: {', '.join(SOFTMAX_BACKENDS)} (auto: FlexAttention on CUDA, the blockwise "
        f"PyTorch loop on CPU; flex on CPU has no backward)"))
    no_state_passing: bool = field(default=False, metadata=_help(
        "ablation: no attention state or keys cross a rank boundary; every contiguous run of tokens a "
        "rank holds is an independent sequence (see lasp2/train/loop.py)"))
    device: str = field(default="auto", metadata=_help("auto (cuda under torchrun when available), cpu, cuda"))
    timeout_s: float = field(default=1800.0, metadata=_help(
        "seconds a collective may wait for the other ranks before the run fails (torchrun)"))
    tuned_allocator: bool = field(default=False, metadata=_help(
        "CPU: keep large tensors on glibc's heap instead of a fresh mmap per allocation (about 2x faster "
        "fwd+bwd at long sequences, but up to ~1.7x the peak resident memory: leave off for the longest "
        "sequences; see lasp2/cpu_allocator.py)"))
    # ---- data ----------------------------------------------------------------------------------
    task: str = field(default="mqar", metadata=_help(
        "mqar: synthetic multi-query associative recall; text: byte-level LM on the text file --data; tokens: "
        "LM on the memory-mapped token file --data (.bin/.npy, e.g. from lasp2 prepare)"))
    data: Optional[str] = field(default=None, metadata=_help("text file (--task text) or token file (--task tokens)"))
    doc_sep: str = field(default="blank-line", metadata=_help(
        "--task text: documents are separated by blank lines, are single lines, or none (one document)"))
    seq_len: int = field(default=2048, metadata=_help("GLOBAL tokens per sequence (split over --sp ranks)"))
    batch_size: int = field(default=4, metadata=_help("GLOBAL sequences per step (split over --dp replicas)"))
    mqar_pairs: int = field(default=4, metadata=_help("MQAR: key-value pairs per sequence (shown in the context)"))
    mqar_queries: Optional[int] = field(default=None, metadata=_help(
        "MQAR: query tokens at the end of each sequence (default: half of --seq-len); answers never shown there"))
    mqar_keys: int = field(default=16, metadata=_help("MQAR: size of the key vocabulary"))
    mqar_values: int = field(default=16, metadata=_help("MQAR: size of the value vocabulary (chance = 1 / values)"))
    mqar_context_labels: bool = field(default=True, metadata=_help(
        "MQAR: also train on the repeated pairs of the context (accuracy is measured on the queries only)"))
    # ---- optimisation --------------------------------------------------------------------------
    steps: int = field(default=250, metadata=_help("optimizer steps"))
    schedule_steps: Optional[int] = field(default=None, metadata=_help(
        "length of the warm-up + cosine learning-rate schedule (default: --steps); a resumed run keeps its "
        "checkpoint's, so steps added with a larger --steps train at lr * min-lr-ratio"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate (AdamW)"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine decay ends at lr * min_lr_ratio"))
    warmup: int = field(default=20, metadata=_help("linear warm-up steps"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the global gradient norm (0: off)"))
    seed: int = field(default=0, metadata=_help("model init and data seed"))
    # ---- output --------------------------------------------------------------------------------
    out: str = field(default="lasp2_train", metadata=_help("output directory"))
    save_every: int = field(default=100, metadata=_help("checkpoint every N steps and at the end (0: never)"))
    resume: Optional[str] = field(default=None, metadata=_help(
        "continue from the latest checkpoint of this output directory (or a checkpoint directory)"))
    log_every: int = field(default=1, metadata=_help("progress-bar update every N steps (metrics: every step)"))
    plot: bool = field(default=True, metadata=_help("write loss.png at the end (needs matplotlib)"))

    def __post_init__(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"--{flag(name)} must be an integer >= {minimum}, got {value!r}")

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"--{flag(name)} {getattr(self, name)!r} is not one of {', '.join(options)}")

        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        for name in ("sp", "seq_len", "batch_size", "steps", "mqar_pairs", "mqar_keys", "mqar_values", "log_every"):
            positive_int(name)
        if self.mqar_queries is not None:
            positive_int("mqar_queries")
        if self.schedule_steps is not None:
            positive_int("schedule_steps")
        for name in ("warmup", "seed", "save_every"):
            positive_int(name, 0)
        if self.dp is not None:
            positive_int("dp")
        for name, options in (("task", TASKS), ("dtype", DTYPES), ("device", DEVICES), ("layout", LAYOUTS),
                              ("strategy", LINEAR_STRATEGIES), ("softmax_strategy", SOFTMAX_STRATEGIES),
                              ("doc_sep", DOC_SEPS), ("data_parallel", DATA_PARALLEL), ("backend", BACKENDS),
                              ("softmax_backend", SOFTMAX_BACKENDS)):
            choice(name, options)
        for name in ("lr", "timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"--{flag(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"--{flag(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.task == "text":
            if not self.data:
                raise ValueError("--task text needs --data FILE (a UTF-8 or any byte text file)")
            if not os.path.isfile(self.data):
                raise ValueError(f"--data {self.data!r} is not a readable file")
        elif self.task == "tokens":
            if not self.data:
                raise ValueError("--task tokens needs --data FILE.bin or FILE.npy (a token file: see lasp2 prepare)")
            self._check_tokens()
        elif self.data:
            raise ValueError("--data is only read by --task text and --task tokens; add one or drop --data")
        parts = self.sp * (2 if self.layout == "zigzag" and self.sp > 1 else 1)
        if self.seq_len % parts:
            what = f"2 x sp = {parts} (the zigzag layout cuts it into 2 segments per rank)" \
                if parts != self.sp else f"--sp {self.sp}"
            raise ValueError(f"--seq-len {self.seq_len} does not split over {what}; use a multiple of {parts}, "
                             f"e.g. {max(parts, self.seq_len // parts * parts)}")
        if self.task == "mqar":
            self._check_mqar()
        self.model_config()  # validates the model flags (heads / kv_heads, layer pattern, ...)
        if self.hf:
            from .hf_model import check_hf_config

            check_hf_config(self)
        if self.export_hf is not None:
            if not self.hf:
                raise ValueError("--export-hf writes a transformers model: it needs --hf-config or --hf-weights")
            if not self.save_every:
                raise ValueError("--export-hf exports the final checkpoint: use --save-every > 0 (checkpoints are "
                                 "also written at the last step)")

    def _check_tokens(self) -> None:
        """The token file's header and sidecar only (no tokens are read): format, length, vocabulary."""
        from .tokens import inspect, too_little

        info = inspect(self.data)
        if info.n_tokens < self.seq_len + 1:
            raise ValueError(too_little(info, self.seq_len))
        if "vocab_size" not in self.model and info.vocab_size is None:
            raise ValueError(f"--data {self.data!r} has no sidecar {self.data}.json giving its vocabulary: pass "
                             f"--vocab-size N (more than its largest token id), or write the file with lasp2 prepare")

    def check_data(self) -> None:
        """What needs a pass over the data, before any rank starts: a --task text file must hold at
        least one sequence of text (packing would otherwise train on padding)."""
        if self.task == "text":
            from .data import split_documents, too_little_text

            with open(self.data, "rb") as f:
                n = sum(len(doc) + 1 for doc in split_documents(f.read(), self.doc_sep))  # + end-of-document
            if n < self.seq_len:
                raise ValueError(too_little_text(self.data, n, self.seq_len))

    def _check_mqar(self) -> None:
        need = 1 + self.mqar_keys + self.mqar_values
        vocab = self.vocab_size()
        if need > vocab:
            raise ValueError(f"MQAR needs {need} token ids (filler + --mqar-keys {self.mqar_keys} + --mqar-values "
                             f"{self.mqar_values}) but the model's vocabulary has {vocab}; use fewer keys/values "
                             f"or a larger --vocab-size")
        if self.mqar_pairs > self.mqar_keys:
            raise ValueError(f"--mqar-pairs {self.mqar_pairs} exceeds --mqar-keys {self.mqar_keys}: the keys of "
                             f"one sequence are distinct")
        queries = self.seq_len // 2 if self.mqar_queries is None else self.mqar_queries
        if self.seq_len - queries < 2 * self.mqar_pairs:
            raise ValueError(f"MQAR: the context (--seq-len {self.seq_len} minus {queries} queries) must hold every "
                             f"pair once ({2 * self.mqar_pairs} tokens); lower --mqar-queries or --mqar-pairs")

    # ---- derived -------------------------------------------------------------------------------

    @property
    def hf(self) -> bool:
        """Whether this run trains a transformers model (--hf-config / --hf-weights)."""
        return bool(self.hf_config or self.hf_weights)

    def vocab_size(self) -> int:
        if self.hf:
            from ..hf.loading import load_config

            return load_config(self.hf_config or self.hf_weights).vocab_size
        return self.model_overrides().get("vocab_size", PRESETS[self.preset]["vocab_size"])

    def model_overrides(self) -> Dict[str, Any]:
        """The LinearLlamaConfig fields this run sets on top of the preset."""
        from .data import TEXT_VOCAB

        over = {**TRAIN_DEFAULTS.get(self.preset, {}), **self.model}
        if self.linear is not None:
            over["linear_variant"] = self.linear
        if self.layer_pattern is not None:
            over["layer_pattern"] = self.layer_pattern
        if self.task == "text":
            vocab = over.get("vocab_size", PRESETS[self.preset]["vocab_size"])
            if "vocab_size" in self.model and vocab < TEXT_VOCAB:
                raise ValueError(f"--task text uses {TEXT_VOCAB} token ids (256 bytes + pad + end-of-document); "
                                 f"--vocab-size {vocab} is too small")
            over["vocab_size"] = max(vocab, TEXT_VOCAB)
        if self.task == "tokens" and "vocab_size" not in self.model:
            from .tokens import inspect

            over["vocab_size"] = inspect(self.data).vocab_size  # the sidecar's (checked in __post_init__)
        return over

    def model_config(self) -> LinearLlamaConfig:
        try:
            return LinearLlamaConfig.preset(self.preset, **self.model_overrides())
        except ValueError as e:
            raise ValueError(f"model: {e}") from None

    def resolve_world(self, world: int) -> "TrainConfig":
        """Check the run against ``world`` ranks and fill in ``dp``; returns self."""
        if world % self.sp:
            raise ValueError(f"--sp {self.sp} does not divide the {world} ranks of this run; use an --sp that "
                             f"divides {world}")
        dp = world // self.sp if self.dp is None else self.dp
        if dp * self.sp != world:
            raise ValueError(f"--dp {dp} x --sp {self.sp} = {dp * self.sp} ranks, but this run has {world}; "
                             f"drop --dp (it defaults to WORLD_SIZE / sp) or launch dp x sp ranks")
        self.dp = dp
        if self.batch_size % dp:
            raise ValueError(f"--batch-size {self.batch_size} (global) does not split over --dp {dp}; "
                             f"use a multiple of {dp}")
        return self

    @property
    def world(self) -> int:
        return (self.dp or 1) * self.sp

    def check_device(self) -> None:
        """ValueError when --device cuda cannot work here (before any rank starts)."""
        import torch

        if self.device != "cuda" or torch.cuda.is_available():
            return
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device cuda: CUDA is not available in this torch build (torch {torch.__version__} "
                             f"was built without CUDA); install a CUDA build of torch (see pytorch.org) or use "
                             f"--device cpu")
        raise ValueError("--device cuda: this torch build has CUDA but sees no GPU (check the driver and "
                         "CUDA_VISIBLE_DEVICES), or use --device cpu")

    def resolved(self) -> Dict[str, Any]:
        """The values this run trains with: ``to_dict()`` with the defaults resolved (the model
        fields as the LinearLlamaConfig they build, the number of MQAR queries, the schedule
        length), so that restating a default is no change."""
        values = self.to_dict()
        for name in ("linear", "layer_pattern", "model"):
            del values[name]
        model = self.model_config()
        values["model_config"] = {**model.to_dict(), "layer_pattern": "".join(model.layer_types)}
        values["mqar_queries"] = self.seq_len // 2 if self.mqar_queries is None else self.mqar_queries
        values["schedule_steps"] = self.schedule_steps or self.steps
        return values

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (dict(getattr(self, f.name)) if f.name == "model" else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**values)

    def trajectory_diff(self, other: Dict[str, Any]) -> Dict[str, tuple]:
        """Fields (other than ``RESUMABLE_CHANGES``) whose *resolved* value differs between this
        run and ``other`` (a ``to_dict`` of the checkpoint's run): {name: (theirs, ours)}, model
        differences under their flag's name (``heads``, ``linear`` for linear_variant)."""
        theirs = TrainConfig.from_dict(other).resolved()
        mine = self.resolved()
        diff = {k: (theirs.get(k), mine[k]) for k in mine
                if k not in RESUMABLE_CHANGES and k != "model_config" and theirs.get(k) != mine[k]}
        for k, v in mine["model_config"].items():
            if theirs["model_config"].get(k) != v:
                diff["linear" if k == "linear_variant" else k] = (theirs["model_config"].get(k), v)
        return diff


def flag(name: str) -> str:
    return name.replace("_", "-")
