"""``lasp2.hf.sequence_parallel`` inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

Exactness: a Trainer run on W = 2 gloo ranks (sp = 2, one data-parallel replica) logs the losses and
ends with the weights of a single-process Trainer run of the unmodified model with
``per_device_train_batch_size x dp`` and otherwise the same arguments (same seed, same data order),
in fp64, with gradient accumulation 1 and 2, both ``average_tokens_across_devices`` settings and
gradient clipping active. Packed batches (``DataCollatorWithFlattening``): each example run on its
own is the reference (transformers' PyTorch fallback ignores the example boundaries). The single-
process references run in this (the test) process; the SP runs share one spawn.

fp64 everywhere (test only, identical for the reference and the SP runs): transformers computes the
RMSNorms and the loss (``logits.float()``) in fp32 even for fp64 weights; ``_fp64`` swaps in the same
formulas in the input dtype (a model-class ``loss_function`` property and the two norm classes'
forward) and pins the reference's Gated DeltaNet scan to fp64 (``tests/hf_reference.hf_kernels``).
TRL's SFTTrainer installs a fused LM head (``trl.trainer.utils.add_fused_lm_head``: the model's
instance ``forward``) whose chunked log-softmax, entropy and top-1 run in fp32 whatever the model's
dtype; ``_fp64_fused_lm_head`` replaces that instance forward with the same contract
(``FusedCausalLMOutput``) in the model's dtype. lasp2's own arithmetic (``shard_batch``'s shifted
labels and counts, the SP layers, the Trainer glue) is not patched.
The per-micro-batch losses are taken from ``training_step`` (the Trainer's logged-loss accumulator is
fp32: the logged losses are compared to fp32 precision).
"""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter
import os
import re
import sys
import tempfile
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

import lasp2.hf  # noqa: E402
from lasp2.parallel import comm  # noqa: E402
from tests.dist import Spawns, run_cases, run_distributed  # noqa: E402
from tests.hf_reference import MODULES, hf_kernels, make_model  # noqa: E402

FAMILY = "qwen3_5"
T = 32
N_EXAMPLES = 4
FP64_TOL = 1e-10   # relative; fp64 with every computation in fp64: ~1e-14 expected
LOGGED_TOL = 1e-6  # the Trainer accumulates the logged loss in fp32
# transformers' Gated DeltaNet gate, ``g = -A_log.float().exp() * softplus(a.float() + dt_bias)`` (lasp2's
# adapter computes it the same way), rounds A_log, a = in_proj_a(x) and their gradients to fp32; the
# reference and the SP run sum those gradients in different orders, so these two parameters' updates
# agree to fp32 precision only (observed 1e-8 and 4e-10; every other parameter ~1e-14).
FP32_GRADS = re.compile(r"(A_log|in_proj_a\.weight)$")
FP32_TOL = 1e-6


def _fp64_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw):
    """transformers' ForCausalLMLoss without the fp32 cast."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction="sum" if num_items_in_batch is not None else "mean")
    return loss if num_items_in_batch is None else loss / torch.as_tensor(num_items_in_batch).to(loss.device)


def _norm_forward(self, x):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return out * (1.0 + self.weight.to(x.dtype))


def _gated_norm_forward(self, hidden_states, gate):
    h = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h * F.silu(gate.to(h.dtype))


@contextlib.contextmanager
def _fp64():
    """Test-only: the Qwen3.5 norms in the input dtype (same formulas as transformers')."""
    modeling = importlib.import_module(MODULES[FAMILY])
    saved = {c: getattr(modeling, c).forward for c in ("Qwen3_5RMSNorm", "Qwen3_5RMSNormGated")}
    modeling.Qwen3_5RMSNorm.forward = _norm_forward
    modeling.Qwen3_5RMSNormGated.forward = _gated_norm_forward
    try:
        yield
    finally:
        for c, f in saved.items():
            setattr(getattr(modeling, c), "forward", f)


def _fp64_fused_lm_head(model) -> None:
    """Test-only, the one patch of TRL: SFTTrainer gives its model a fused LM head
    (``trl.trainer.utils.add_fused_lm_head`` sets the model's *instance* ``forward``) whose chunked
    log-softmax, entropy and top-1 accumulate in fp32 whatever the model's dtype. Replace that instance
    forward by the same documented contract computed in the model's dtype: for ``fused_lm_head=True``
    the backbone's last hidden states through the LM head, per-token ``log_probs`` / ``entropy`` /
    ``is_top1`` of the next-token labels (``shift_labels`` as given, else ``labels`` shifted here), zero
    where the label is -100, and ``loss = -sum(log_probs) / num_items_in_batch``; otherwise the model
    class's own forward. Applied identically to the reference and the SP runs."""
    from trl.trainer.utils import FusedCausalLMOutput

    class_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        given = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        if not fused_lm_head:
            return class_forward(self, *args, **kw, **{k: v for k, v in given.items() if v is not None})
        kw["use_cache"] = False
        hidden = self.base_model(*args, **kw).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        logp = torch.log_softmax(self.get_output_embeddings()(hidden), dim=-1)
        log_probs = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0)
        is_top1 = (logp.argmax(-1) == shift_labels) & mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def _model():
    model = make_model(FAMILY, torch.float64)
    base = type(model)
    model.__class__ = type(f"Fp64Loss{base.__name__}", (base,), {"loss_function": property(lambda self: _fp64_loss)})
    return model


def _dataset(packed: bool, iterable=None):
    g = torch.Generator().manual_seed(1)
    if packed:  # examples of different lengths; the collator packs a batch into one row
        lengths = [5, 9, 6, 12]
        ids = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
        return datasets.Dataset.from_dict({"input_ids": ids})
    ids = torch.randint(0, 256, (N_EXAMPLES, T), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    if iterable == "datasets":  # a streaming datasets.IterableDataset (one shard: accelerate splits batches)
        return ds.to_iterable_dataset()
    if iterable == "torch":
        return _TorchStream(ids)
    return ds


class _TorchStream(torch.utils.data.IterableDataset):
    """A plain torch IterableDataset of pre-tokenized examples (no __len__)."""

    def __init__(self, ids):
        self.ids = ids

    def __iter__(self):
        for x in self.ids:
            yield {"input_ids": torch.tensor(x), "labels": torch.tensor(x)}


def _pad_collator(examples):
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), n, dtype=torch.long)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros(len(examples), n, dtype=torch.long)
    for i, e in enumerate(examples):
        x = torch.tensor(e["input_ids"])
        ids[i, :len(x)], labels[i, :len(x)], mask[i, :len(x)] = x, x, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _tokenizer():
    """A word-level tokenizer over the 256 test token ids (TRL wants a processing class; no hub)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(257)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t256", eos_token="t256")


def _args(out, batch, ga, average, kind="trainer", **kw):
    common = dict(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                  average_tokens_across_devices=average, num_train_epochs=1, learning_rate=0.05, optim="sgd",
                  lr_scheduler_type="constant", max_grad_norm=0.5, logging_steps=1, save_strategy="no",
                  report_to=[], seed=0, use_cpu=True, disable_tqdm=True, dataloader_drop_last=False, **kw)
    if kind == "sft":
        from trl import SFTConfig

        return SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, **common)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


class _Losses:
    """Records the logged losses (a callback) and every micro-batch loss ``training_step`` returns."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.logged, self.steps, self.collectives, self.log = [], [], [], comm.CommLog()
        rec = self

        class Cb(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    rec.logged.append(logs["loss"])

        trainer.add_callback(Cb())
        step = trainer.training_step
        # lasp2's communication per micro-batch, split at the end of the model's forward: (forward ops,
        # backward ops); under gradient checkpointing the backward recomputes the layers' forwards
        ended = []
        trainer.model.register_forward_hook(lambda *_: ended.append(len(rec.log.records)))

        def training_step(*a, **k):
            ended.clear()
            with comm.track() as rec.log:
                loss = step(*a, **k)
            ops = [r.op for r in rec.log.records]
            rec.steps.append(loss.detach().clone())
            rec.collectives.append((Counter(ops[:ended[-1]]), Counter(ops[ended[-1]:])) if ended else None)
            return loss

        trainer.training_step = training_step


def _train(kind, *, batch, ga, average, packed, sp=None, layout="zigzag", evaluate=False, bf16=False, iterable=None,
           **extra):
    """One Trainer run from the same initial model; returns losses and the trained state. ``extra``:
    more TrainingArguments (gradient_checkpointing, max_steps)."""
    from transformers import DataCollatorWithFlattening, Trainer

    fp64 = not bf16
    with tempfile.TemporaryDirectory() as out, (_fp64() if fp64 else contextlib.nullcontext()):
        model = _model() if fp64 else make_model(FAMILY, torch.float32)
        ds = _dataset(packed, iterable)
        # packed: the SP run packs each batch into one row; the reference pads the examples of a batch
        # to rows of their own (right padding, ignored labels: each example as if run alone)
        collator = None if not packed else DataCollatorWithFlattening() if sp is not None else _pad_collator
        if kind == "sft":
            extra["padding_free"] = packed and sp is not None
        args = _args(out, batch, ga, average, kind, bf16=bf16, **extra)
        if kind == "sft":  # TRL's own collator (padding_free: packed into one row, as the reference is not)
            from trl import SFTTrainer

            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer(),
                                 eval_dataset=ds if evaluate else None)
            if fp64:
                _fp64_fused_lm_head(trainer.model)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                              eval_dataset=ds if evaluate else None)
        if sp is not None:
            # packed rows have any length: right-padded to a multiple of 2 sp with ignored labels
            lasp2.hf.sequence_parallel(trainer, sp=sp, layout=layout, pad_to_multiple=packed)
        rec = _Losses(trainer)
        with hf_kernels(FAMILY, torch.float64 if fp64 else torch.float32, model):
            trainer.train()
            metrics = trainer.evaluate() if evaluate else {}
        return {"logged": rec.logged, "steps": torch.stack(rec.steps), "collectives": rec.collectives,
                "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
                "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "eval_loss": metrics.get("eval_loss")}


# The exactness table: name -> (trainer kind, per-device batch, gradient accumulation,
# average_tokens_across_devices, packed, evaluate, more _train arguments). TRL's SFTConfig turns
# gradient checkpointing on by default: every "sft" case runs with it.
CASES = {
    "trainer-ga1": ("trainer", 1, 1, True, False, False, {}),
    "trainer-ga2-eval": ("trainer", 1, 2, True, False, True, {}),
    "trainer-ga2-noavg-ckpt": ("trainer", 1, 2, False, False, False, {"gradient_checkpointing": True}),
    "trainer-packed": ("trainer", 2, 1, True, True, False, {}),
    "trainer-iterable": ("trainer", 1, 1, True, False, False, {"iterable": "datasets", "max_steps": 2}),
    "trainer-iterable-torch": ("trainer", 1, 2, True, False, False, {"iterable": "torch", "max_steps": 1}),
    "sft": ("sft", 1, 2, True, False, False, {}),
    "sft-ga1": ("sft", 1, 1, True, False, False, {}),
    "sft-padding-free": ("sft", 2, 1, True, True, False, {}),
    "sft-padding-free-ga2": ("sft", 2, 2, True, True, False, {}),
}
FIELDS = ("kind", "batch", "ga", "average", "packed", "evaluate", "extra")


def _initial_state():
    return {k: v.detach().clone() for k, v in _model().state_dict().items()}


def _compare(sp_run, ref, init, tol):
    # the whole update of every parameter (trained minus initial) against the reference's
    bad = []
    for k, r in ref["state"].items():
        d_ref, d_sp = r - init[k], sp_run["state"][k] - init[k]
        err = ((d_sp - d_ref).norm() / d_ref.norm().clamp_min(1e-300)).item()
        limit = max(tol, FP32_TOL) if FP32_GRADS.search(k) else tol
        if not (err <= limit or d_ref.norm() == 0 == d_sp.norm()):
            bad.append(f"{k}: {err:.2e}")
    assert not bad, f"parameter updates off (relative error): {', '.join(bad)}"
    assert len(sp_run["logged"]) == len(ref["logged"]) > 0, (sp_run["logged"], ref["logged"])
    for a, b in zip(sp_run["logged"], ref["logged"]):
        assert abs(a - b) <= max(tol, LOGGED_TOL) * max(1.0, abs(b)), (sp_run["logged"], ref["logged"])


def _setup_env(group):
    """accelerate learns the world from torchrun's variables; the harness joined the group by file."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def _exactness(group, refs, sp, names):
    import torch.distributed as dist

    world = dist.get_world_size(group)
    init = _initial_state()
    n_layers = _model().config.num_hidden_layers

    def case(name, kind, batch, ga, average, packed, evaluate, extra):
        run = _train(kind, batch=batch, ga=ga, average=average, packed=packed, sp=sp, evaluate=evaluate, **extra)
        steps = run["steps"].clone()  # what training_step returned on this rank, per micro-batch
        dist.all_reduce(steps, group=group)
        states = [None] * world
        dist.all_gather_object(states, run["state"], group=group)
        ref = refs[name]
        for other in states[1:]:
            for k, v in other.items():
                assert torch.equal(v, states[0][k]), f"{k} differs between ranks"
        # the loss of a micro-batch is the mean over the ranks (the Trainer's own logging reduction):
        # the dp replicas' micro-batches i together are the reference's micro-batch i
        got = steps / world
        assert got.shape == ref["steps"].shape, (got.shape, ref["steps"].shape)
        assert torch.allclose(got, ref["steps"], rtol=FP64_TOL, atol=0), (got, ref["steps"])
        _compare(run, ref, init, FP64_TOL)
        if evaluate:
            assert abs(run["eval_loss"] - ref["eval_loss"]) <= LOGGED_TOL * abs(ref["eval_loss"]), \
                (run["eval_loss"], ref["eval_loss"])
        # gradient checkpointing: the backward recomputes every layer's forward, its collectives included
        # (each of the forward's, again), and then runs the layers' own backward (>= one collective per
        # layer); without it the backward issues fewer than that. The first micro-batch is left out: its
        # forward also runs one-time agreement checks.
        assert run["checkpointing"] == ref["checkpointing"]
        for fwd, bwd in run["collectives"][1:]:
            recomputed = not (fwd - bwd) and sum((bwd - fwd).values()) >= n_layers
            assert recomputed == run["checkpointing"], (run["checkpointing"], fwd, bwd)

    run_cases([(n, dict(zip(("name", *FIELDS), (n, *CASES[n])))) for n in names], case)


def _references(dp, names):
    refs = {}
    for name in names:
        kind, batch, ga, average, packed, evaluate, extra = CASES[name]
        refs[name] = _train(kind, batch=batch * dp, ga=ga, average=average, packed=packed, evaluate=evaluate, **extra)
    return refs


# ------------------------------------------------------------------------------------------------
# Refusals: ValueErrors on every rank, before any rank computes.


def _plain_trainer(model, batch=1, **kw):
    from transformers import Trainer

    out = tempfile.mkdtemp()
    return Trainer(model=model, args=_args(out, batch, 1, True), train_dataset=_dataset(False), **kw)


def _refusals(group):
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    world = dist.get_world_size(group)

    def refuses(pattern, fn):
        try:
            fn()
        except ValueError as e:
            assert re.search(pattern, str(e)), f"{pattern!r} not in: {e}"
        else:
            raise AssertionError(f"no ValueError matching {pattern!r}")

    def sp_not_dividing():
        refuses(rf"sp=3 does not divide the world size {world}",
                lambda: lasp2.hf.sequence_parallel(_plain_trainer(make_model(FAMILY, torch.float32)), sp=3))

    def unsupported_family():
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
        refuses("lasp2.hf does not support LlamaForCausalLM",
                lambda: lasp2.hf.sequence_parallel(_plain_trainer(llama), sp=2))

    def wrapped_twice():
        trainer = lasp2.hf.sequence_parallel(_plain_trainer(make_model(FAMILY, torch.float32)), sp=2)
        refuses("already wrapped by lasp2.hf.sequence_parallel", lambda: lasp2.hf.sequence_parallel(trainer, sp=2))

    def deepspeed():
        trainer = _plain_trainer(make_model(FAMILY, torch.float32))
        trainer.args.deepspeed = {"train_batch_size": 2}
        refuses("DeepSpeed is enabled.*remove the deepspeed config", lambda: lasp2.hf.sequence_parallel(trainer, sp=2))

    def accelerate_cp():
        from accelerate.parallelism_config import ParallelismConfig

        trainer = _plain_trainer(make_model(FAMILY, torch.float32))
        trainer.args.parallelism_config = ParallelismConfig(cp_size=2)
        refuses("accelerate's own context/sequence/tensor parallelism.*parallelism_config",
                lambda: lasp2.hf.sequence_parallel(trainer, sp=2))

    def plain_trainer_with_parallelized_model():
        # what a user gets without sequence_parallel: every rank raises at the first forward
        model = lasp2.hf.parallelize(make_model(FAMILY, torch.float32), group, layout="zigzag")
        refuses(r"lasp2\.hf\.sequence_parallel\(trainer", _plain_trainer(model).train)

    def padding():
        trainer = _plain_trainer(make_model(FAMILY, torch.float32), batch=2, data_collator=_pad_collator)
        trainer.train_dataset = _dataset(True)
        lasp2.hf.sequence_parallel(trainer, sp=2)
        refuses("has padding.*DataCollatorWithFlattening.*padding_free=True", trainer.train)

    def length_not_divisible():
        from transformers import DataCollatorWithFlattening

        trainer = _plain_trainer(make_model(FAMILY, torch.float32), batch=2, data_collator=DataCollatorWithFlattening())
        trainer.train_dataset = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]})
        lasp2.hf.sequence_parallel(trainer, sp=2)
        refuses(r"length 11 is not a multiple of 4 .*pad_to_multiple=True", trainer.train)

    cases = [sp_not_dividing, unsupported_family, wrapped_twice, deepspeed, accelerate_cp,
             plain_trainer_with_parallelized_model, padding, length_not_divisible]
    run_cases([(f.__name__, {"f": f}) for f in cases], lambda f: f())


# ------------------------------------------------------------------------------------------------
# bf16=True (autocast) under SP against the same single-process run.

# bf16 keeps 8 significant bits; both runs round the matmul inputs to bf16 at different places
# (lasp2 keeps states and scans in fp32), see tests/hf/test_hf_autocast.py. An algorithmic error is O(1e-1).
BF16_TOL = 4 * torch.finfo(torch.bfloat16).eps


def _bf16(group, ref):
    run = _train("trainer", batch=1, ga=1, average=True, packed=False, sp=2, bf16=True)
    init = {k: v.detach().clone() for k, v in make_model(FAMILY, torch.float32).state_dict().items()}
    d_sp = torch.cat([(run["state"][k] - init[k]).flatten().double() for k in init])
    d_ref = torch.cat([(ref["state"][k] - init[k]).flatten().double() for k in init])
    err = ((d_sp - d_ref).norm() / d_ref.norm()).item()
    losses = torch.tensor(run["logged"]), torch.tensor(ref["logged"])
    assert err <= BF16_TOL, f"bf16 update relative RMS error {err:.2e} > {BF16_TOL:.2e}"
    assert torch.allclose(*losses, rtol=BF16_TOL, atol=0), losses
    return err


DEFAULT = ("trainer-ga1", "trainer-ga2-eval", "trainer-ga2-noavg-ckpt", "trainer-packed", "trainer-iterable", "sft",
           "sft-padding-free")
SLOW_W2 = ("sft-ga1", "sft-padding-free-ga2", "trainer-iterable-torch")


def _worker_w2(group, refs, bf16_ref):
    from tests.dist import run_sections

    # this rank also runs the other tests/hf modules' workers ("hf-usage"): torchrun's variables
    # are set for accelerate only while this worker runs
    saved = dict(os.environ)
    _setup_env(group)
    try:
        return run_sections(group, [("exactness", lambda g: _exactness(g, refs, 2, DEFAULT)),
                                    ("refusals", _refusals),
                                    ("bf16", lambda g: _bf16(g, bf16_ref))])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _w2_args():
    """The single-process references, computed here when the spawn starts."""
    return (_references(1, DEFAULT), _train("trainer", batch=1, ga=1, average=True, packed=False, bf16=True))


# One spawn (W = 2, sp = 2) for every section, shared with the other tests/hf modules ("hf-usage": the
# ranks import transformers once); the references run here, single-process.
SPAWNS = Spawns(_worker_w2, pool="hf-usage", timeout=900, more_args=_w2_args)


def _w2(section):
    return SPAWNS.results(2, section)


def test_trainer_sp2_equals_single_process():
    """Trainer and SFTTrainer at W = 2 (sp = 2) vs one process, fp64 to 1e-10: logged losses, every
    micro-batch loss and the trained weights; gradient accumulation 1/2, average_tokens_across_devices
    on/off, clipping, evaluation loss, packed batches (DataCollatorWithFlattening, TRL padding_free),
    gradient checkpointing (its recompute re-runs the layers' collectives: counted), a streaming
    datasets.IterableDataset."""
    _w2("exactness")


def test_refusals():
    _w2("refusals")


def test_bf16_trains_under_sp():
    errors = _w2("bf16")
    assert all(0 < e <= BF16_TOL for e in errors), errors


W4 = ("trainer-ga1", "trainer-ga2-eval", "trainer-ga2-noavg-ckpt", "trainer-packed", "trainer-iterable",
      "trainer-iterable-torch", "sft", "sft-ga1", "sft-padding-free")


def _worker_exactness(group, refs, names):
    _setup_env(group)
    _exactness(group, refs, 2, names)


@pytest.mark.slow
def test_trainer_sp2_more_cases():
    """W = 2 (sp = 2): SFTTrainer with gradient accumulation 1 (pre-tokenized) and 2 (padding_free),
    a torch IterableDataset."""
    run_distributed(_worker_exactness, 2, _references(1, SLOW_W2), SLOW_W2)


@pytest.mark.slow
def test_trainer_dp2_sp2_equals_single_process():
    """W = 4: dp = 2 replicas of sp = 2; the reference runs per_device_train_batch_size x 2 (iterable
    datasets: accelerate splits each global batch over the dp replicas)."""
    run_distributed(_worker_exactness, 4, _references(2, W4), W4)


# ------------------------------------------------------------------------------------------------
# accelerate launch of the example (CPU, gloo).


def _example(launcher, out):
    """examples/hf_trainer_sft.py (2 steps), started by ``launcher`` or by itself; its JSON report."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["examples/hf_trainer_sft.py", "--steps", "2", "--examples", "16", "--max-len", "48", "--out", str(out)]
    cmd = [sys.executable, *args] if launcher is None else [*launcher, *args]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return json.loads((out / "hf_trainer_sft.json").read_text())


@pytest.mark.slow
def test_accelerate_launch_example(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` of examples/hf_trainer_sft.py on CPU (gloo:
    accelerate's --multi_gpu is what makes it start torchrun's agent; on a CPU-only machine without it
    accelerate starts one process): the losses of the example's own 2-rank start, and a saved model
    that reloads unmodified. The port: accelerate has no rendezvous endpoint a test can own on one
    machine (--rdzv_backend c10d takes its endpoint only with --num_machines > 1), so this process holds
    a port (``parent_store``) and names it: accelerate finds it in use and starts torchrun with
    --standalone, whose agent binds a port the OS picks and holds it (no fixed or free-picked port)."""
    from tests.dist import parent_store

    with parent_store() as store:
        launched = _example([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(store.port)], tmp_path / "accelerate")
    spawned = _example(None, tmp_path / "spawn")
    assert launched["world_size"] == spawned["world_size"] == 2 and launched["reloaded_equal"] is True
    assert len(launched["losses"]) == len(spawned["losses"]) == 2
    assert launched["losses"] == pytest.approx(spawned["losses"], rel=1e-6), (launched, spawned)
