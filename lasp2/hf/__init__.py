"""Hugging Face ``transformers`` hybrid models trained under LASP-2 (optional: ``pip install -e ".[hf]"``
from the lasp2 checkout; ``import lasp2.hf``, which ``import lasp2`` does not do).

    import lasp2.hf
    model = AutoModelForCausalLM.from_config(cfg)            # or from_pretrained(local_dir)
    lasp2.hf.parallelize(model, group, layout="zigzag", strategy="lasp2", softmax_strategy="allgather")
    batch = lasp2.hf.shard_batch(input_ids, labels, group=group, layout="zigzag")  # the whole batch
    out = model(**batch)     # out.logits: this rank's shard of the single-device logits

``shard_batch`` checks that every rank holds the same batch (one 8-byte all-gather) and returns the
batch's sequence-parallel context with the tokens; the model refuses forwards without it, and
``generate``. ``lasp2 export`` writes trained checkpoints back as transformers directories.
Under transformers' ``Trainer`` or TRL's ``SFTTrainer`` (extra ``[trainer]``), hand the trainer
the unmodified model and call ``lasp2.hf.sequence_parallel(trainer, sp=2)`` instead (``trainer.py``).

Supported: the families of ``FAMILIES`` (``families.py``, the table ``docs/hf.md`` is generated
from): Qwen3-Next, Qwen3.5, Qwen3.5-MoE, MiniMax, Bamba, Mamba2, Nemotron-H, Granite-4.0 hybrid,
Falcon-H1, Zamba2, Mamba, Falcon-Mamba, Jamba, OLMo hybrid, LFM2, and subclasses of their model
classes. Each model's own layers (parameters, projections, norms, gates, multipliers, MoE MLPs) run
unchanged; only the sequence-mixing cores and the short convolutions become lasp2 SP ops, one
adapter module per family.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('lasp2.hf needs transformers (5.23 - 5.25 verified): pip install -e ".[hf]" '
                      'from the lasp2 checkout') from e

from .compat import check_transformers

check_transformers(transformers.__version__)

from .api import parallelize, shard_batch
from .trainer import sequence_parallel
from .families import FAMILIES, supported
from .prefill import sp_prefill

__all__ = ["parallelize", "shard_batch", "sequence_parallel", "sp_prefill", "FAMILIES", "supported"]
