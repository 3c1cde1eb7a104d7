"""``lasp2.hf.sequence_parallel``: LASP-2 sequence parallelism inside transformers' ``Trainer`` and
TRL's ``SFTTrainer``.

    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds)   # or transformers.Trainer
    lasp2.hf.sequence_parallel(trainer, sp=2, layout="zigzag")           # in place
    trainer.train()                                                      # torchrun --nproc-per-node W

What it changes, on this trainer instance only (the classes are untouched):
- ``trainer.model`` is parallelized (``lasp2.hf.parallelize``) over the "sp" dimension of a
  ("dp", "sp") ``DeviceMesh`` of the world: ranks ``[d * sp, (d + 1) * sp)`` form SP group d.
- ``trainer.accelerator.prepare_data_loader`` shards the data over the dp dimension (accelerate's
  public ``prepare_data_loader`` with the dp rank and size): the ranks of an SP group draw the same
  batches, one data-parallel replica per group.
- ``trainer.get_batch_samples`` hands each rank its shard of every batch (``shard_batch``: global
  positions, labels shifted on the whole sequence, documents of packed batches from
  ``position_ids``) and counts ``num_items_in_batch`` on the shards, so the Trainer's own
  arithmetic (loss x num_processes, DDP's mean over the world) gives the single-device loss and
  gradients; ``trainer.prediction_step`` shards evaluation batches the same way (loss only).

The model stays wrapped by the Trainer's usual DDP over the whole world: every rank's gradient of
its share of the loss, averaged over dp x sp ranks and scaled by the Trainer, is the gradient of the
whole global batch, identical on every rank; gradient clipping then sees the whole model's norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.backends import BACKENDS
from ..parallel.api import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from ..parallel.layout import LAYOUTS
from ..validation import check_choice
from .api import parallelize, shard_batch
from .common import SP_KEY
from .families import family_of

# Batch fields that describe documents for flash-attention kernels; the documents are derived from
# position_ids instead (and carried by the batch's SP context), so these are dropped.
_FLASH_FIELDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
HINT = "call lasp2.hf.sequence_parallel(trainer, sp=...) once, after building the trainer and before train()"


@dataclass(frozen=True)
class SPTrainerState:
    """What ``sequence_parallel`` set up on one trainer: the mesh, the SP group and the layout."""

    mesh: object
    group: object
    layout: str
    sp: int
    dp: int
    dp_rank: int
    pad_to_multiple: bool
    pad_token_id: int


def _fail(msg: str):
    raise ValueError(msg)


def _check_trainer(trainer, sp, layout, strategy="lasp2", softmax_strategy="allgather", backend="auto") -> None:
    """Every refusal that needs no communication (the same on every rank)."""
    import torch.distributed as dist
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        _fail(f"trainer must be a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
              f"{type(trainer).__name__}")
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        _fail(f"sp must be a positive int (the ranks per sequence-parallel group), got {sp!r}")
    check_choice("layout", layout, LAYOUTS)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("backend", backend, BACKENDS)
    if getattr(trainer, "_lasp2_sp", None) is not None:
        _fail("this trainer was already wrapped by lasp2.hf.sequence_parallel; call it once per trainer")
    if trainer.model_wrapped is not trainer.model:
        _fail("the trainer's model is already wrapped (DDP/FSDP/DeepSpeed: train() or evaluate() ran); " + HINT)
    model = trainer.model
    if getattr(model, "_lasp2", None) is not None:
        _fail("trainer.model was already parallelized by lasp2.hf.parallelize; hand the Trainer the unmodified "
              "model and let lasp2.hf.sequence_parallel parallelize it")
    family_of(model)  # ValueError naming the supported models
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        _fail("DeepSpeed is enabled (TrainingArguments.deepspeed); lasp2.hf.sequence_parallel runs on the "
              "Trainer's DDP: remove the deepspeed config")
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None):
        _fail("FSDP is enabled (TrainingArguments.fsdp); lasp2.hf.sequence_parallel runs on the Trainer's DDP: "
              "remove the fsdp setting")
    pc = getattr(trainer.accelerator, "parallelism_config", None) or getattr(args, "parallelism_config", None)
    if pc is not None and any(getattr(pc, f, False) for f in ("cp_enabled", "sp_enabled", "tp_enabled")):
        _fail("accelerate's own context/sequence/tensor parallelism is enabled (parallelism_config); it cannot be "
              "combined with lasp2.hf.sequence_parallel: remove parallelism_config (or set cp_size=sp_size=1)")
    if args.label_smoothing_factor:
        _fail(f"label_smoothing_factor={args.label_smoothing_factor} is not supported under sequence parallelism "
              f"(the label smoother shifts labels on each rank's shard): set it to 0")
    if getattr(trainer, "compute_loss_func", None) is not None:
        _fail("compute_loss_func is not supported under sequence parallelism (it would see this rank's shard of "
              "the logits with already shifted labels): remove it, the model's own loss is used")
    if getattr(trainer, "compute_metrics", None) is not None:
        _fail("compute_metrics is not supported under sequence parallelism (predictions are per-rank shards of "
              "the logits): remove it; evaluation reports the exact loss")
    if not getattr(trainer, "model_accepts_loss_kwargs", False):
        _fail(f"{type(model).__name__}'s forward does not take num_items_in_batch (model_accepts_loss_kwargs is "
              f"False), which sequence parallelism needs to normalize each rank's share of the loss")
    if getattr(trainer.accelerator, "dispatch_batches", None):
        _fail("accelerate's dispatch_batches=True is not supported with lasp2.hf.sequence_parallel "
              "(accelerator_config={'dispatch_batches': False})")
    if not dist.is_available() or not dist.is_initialized():
        _fail("torch.distributed is not initialized: launch with torchrun --nproc-per-node W (or accelerate "
              "launch) so that TrainingArguments joins the process group, then call sequence_parallel")
    world = dist.get_world_size()
    if world % sp:
        _fail(f"sp={sp} does not divide the world size {world}: choose sp among the divisors of {world} "
              f"(the world is dp x sp)")


def sequence_parallel(trainer, sp: int, *, layout: str = "zigzag", strategy: str = "lasp2",
                      softmax_strategy: str = "allgather", backend: str = "auto", pad_to_multiple: bool = False,
                      pad_token_id: int = 0):
    """Train ``trainer.model`` with LASP-2 sequence parallelism over groups of ``sp`` ranks, in place.

    Args:
        trainer: a ``transformers.Trainer`` or a subclass (``trl.SFTTrainer``), built but not yet
            trained, whose model is a supported hybrid model (``lasp2.hf.supported()``), launched
            with torchrun / accelerate launch over W = dp x sp ranks.
        sp: ranks per sequence-parallel group; must divide W. Each group is one data-parallel
            replica: global batch = per_device_train_batch_size x dp x gradient_accumulation_steps.
        layout, strategy, softmax_strategy, backend: as for ``lasp2.hf.parallelize``.
        pad_to_multiple: sequence lengths must split into sp equal parts (2 sp under zigzag).
            False: a batch that does not raises ValueError naming the multiple. True: each row is
            right-padded with ``pad_token_id`` tokens whose labels are ignored (exact for causal
            models: no earlier token sees them; in a packed row they form their own document).

    Returns:
        ``trainer``. Losses (logged, evaluated) and gradients equal those of a single-device run
        with per_device_train_batch_size x dp, including gradient accumulation,
        ``average_tokens_across_devices`` (both settings), gradient clipping, gradient
        checkpointing (its recompute re-runs the layers' SP collectives) and iterable datasets
        (accelerate splits them over the dp replicas only). Batches with padding
        (attention_mask zeros) raise ValueError: pack instead (``DataCollatorWithFlattening``, TRL's
        ``padding_free=True``); packed examples are separate documents (from ``position_ids``).
        Checkpoints hold the unmodified model's parameters.

    Raises ValueError before any rank computes, on every rank: sp not dividing the world, an
    unsupported model, a trainer already wrapped or already training, DeepSpeed / FSDP /
    accelerate's parallelism_config, label smoothing, compute_loss_func, compute_metrics.

    Communication: once, building the mesh and parallelize's agreement check; per batch, the 8-byte
    same-batch check of ``shard_batch`` over the SP group; otherwise that of the model's layers and
    the Trainer's DDP.
    """
    _check_trainer(trainer, sp, layout, strategy, softmax_strategy, backend)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // sp
    device_type = trainer.args.device.type
    mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    group = mesh["sp"].get_group()
    parallelize(trainer.model, group, layout=layout, strategy=strategy, softmax_strategy=softmax_strategy,
                backend=backend)
    state = SPTrainerState(mesh, group, layout, sp, dp, rank // sp, bool(pad_to_multiple), int(pad_token_id))
    trainer._lasp2_sp = state
    _shard_data_over_dp(trainer, state)
    _shard_batches(trainer, state)
    return trainer


# ------------------------------------------------------------------------------------------------
# Data: one replica per SP group.


def _shard_data_over_dp(trainer, state: SPTrainerState) -> None:
    from .trainer_compat import dp_prepare_data_loader

    trainer.accelerator.prepare_data_loader = dp_prepare_data_loader(trainer.accelerator, state.dp, state.dp_rank)


def documents_from_positions(position_ids: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """Global document boundaries (int64 [N + 1]) of a packed batch from its ``position_ids``
    [B, T] (restarting at 0 at every example, as ``DataCollatorWithFlattening`` and TRL's
    ``padding_free`` make them); None when every row holds 0 .. T - 1 (one sequence per row).
    ValueError for packed batches of more than one row or positions that do not count up by 1."""
    if position_ids is None:
        return None
    pos = position_ids.detach().to("cpu", torch.long)
    if pos.dim() != 2 or pos.shape[1] != T:
        _fail(f"position_ids must be [B, {T}] like input_ids, got {tuple(pos.shape)}")
    if bool((pos == torch.arange(T)).all()):
        return None
    if pos.shape[0] != 1:
        _fail("position_ids restart inside rows of a batch with several rows; packed batches must be one row "
              "(DataCollatorWithFlattening / TRL padding_free=True make them so)")
    p = pos[0]
    starts = (p == 0).nonzero().flatten()
    if p[0] != 0 or not bool((p[1:] == torch.where(p[1:] == 0, 0, p[:-1] + 1)).all()):
        _fail("position_ids of a packed batch must count 0, 1, 2, ... within each example and restart at 0 "
              "at the next one")
    return torch.cat([starts, torch.tensor([T])])


def _parts(state: SPTrainerState) -> int:
    return state.sp if state.layout == "contiguous" or state.sp == 1 else 2 * state.sp


def shard_inputs(state: SPTrainerState, inputs: dict) -> dict:
    """This rank's part of one collated batch (identical on the ranks of the SP group):
    ``shard_batch``'s output without ``num_items_in_batch`` (the Trainer counts it), plus the
    batch's fields that are not per-token."""
    if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
        _fail(f"lasp2.hf.sequence_parallel needs dict batches (input_ids, labels, ...), got {type(inputs).__name__}")
    if SP_KEY in inputs:
        return inputs  # already sharded
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        _fail("every batch needs input_ids [B, T] under lasp2.hf.sequence_parallel (inputs_embeds are not "
              "supported)")
    if "shift_labels" in inputs:
        _fail("the batch carries shift_labels; under lasp2.hf.sequence_parallel give unshifted labels "
              "(the shift happens on the whole sequence before sharding)")
    B, T = ids.shape
    T0 = T
    labels, mask = inputs.get("labels"), inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool((mask != 0).all()):
        _fail("the batch has padding (attention_mask zeros), which sequence parallelism does not support: pack "
              "the examples into one row instead (transformers' DataCollatorWithFlattening, or TRL's "
              "SFTConfig(padding_free=True))")
    cu = documents_from_positions(inputs.get("position_ids"), T)
    parts = _parts(state)
    if T % parts:
        if not state.pad_to_multiple:
            _fail(f"the batch's sequence length {T} is not a multiple of {parts} (sp={state.sp}, "
                  f"layout={state.layout!r}): make every batch's length a multiple of {parts} (e.g. the "
                  f"collator's pad_to_multiple_of={parts} with packing), or pass "
                  f"lasp2.hf.sequence_parallel(..., pad_to_multiple=True) to right-pad with ignored labels")
        extra = parts - T % parts
        ids = torch.cat([ids, ids.new_full((B, extra), state.pad_token_id)], dim=1)
        if labels is not None:
            labels = torch.cat([labels, labels.new_full((B, extra), -100)], dim=1)
        if cu is not None:  # the padding is a document of its own
            cu = torch.cat([cu, torch.tensor([T + extra])])
        T += extra
    out = shard_batch(ids, labels, group=state.group, layout=state.layout, cu_seqlens=cu)
    out.pop("num_items_in_batch", None)
    known = {"input_ids", "labels", "attention_mask", "position_ids", *_FLASH_FIELDS}
    for k, v in inputs.items():
        if k in known:
            continue
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, T0):
            _fail(f"the batch field {k!r} is per token and lasp2.hf.sequence_parallel does not know how to shard "
                  f"it; remove it from the batch (remove_unused_columns / the collator)")
        out[k] = v
    return out


def _shard_batches(trainer, state: SPTrainerState) -> None:
    """Instance-level ``get_batch_samples`` and ``prediction_step``: shard, then what the Trainer does."""
    import torch.distributed as dist

    def get_batch_samples(epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        batches = [shard_inputs(state, b) for b in batches]
        num_items = None
        if batches and "shift_labels" in batches[0]:
            # this rank's counted targets; their sum over the world is the global batch's count
            num_items = sum(b["shift_labels"].ne(-100).sum() for b in batches).to(device)
            if trainer.args.average_tokens_across_devices:
                if trainer.args.world_size > 1:
                    num_items = trainer.accelerator.gather(num_items).sum()
            else:
                # the SP group's count, shared by its sp ranks: the Trainer leaves this loss unscaled and
                # DDP averages over dp x sp, so each group contributes its own mean, as one DP replica would
                dist.all_reduce(num_items, group=state.group)
                num_items = num_items / state.sp
        return batches, num_items

    original_prediction_step = trainer.prediction_step

    def prediction_step(model, inputs, prediction_loss_only, ignore_keys=None):
        loss, _, _ = original_prediction_step(model, shard_inputs(state, inputs), True, ignore_keys=ignore_keys)
        if loss is not None:
            # every rank of the group reports its replica's loss, as one data-parallel rank would (the
            # evaluation loop repeats it per example and drops the examples accelerate padded in)
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=state.group)
            loss = loss / state.sp
        return loss, None, None

    trainer.get_batch_samples = get_batch_samples
    trainer.prediction_step = prediction_step
