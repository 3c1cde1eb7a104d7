"""The one place ``lasp2.hf.sequence_parallel`` reaches into accelerate (verified: accelerate 1.16).

accelerate shards a Trainer's data loaders over every process of the world
(``Accelerator.prepare_data_loader`` passes its own ``num_processes`` / ``process_index``). Under
sequence parallelism the ranks of one SP group must draw the same batches, so the trainer's
accelerator gets an instance-level ``prepare_data_loader`` that calls accelerate's public
``accelerate.data_loader.prepare_data_loader`` with the data-parallel size and rank instead, and
with everything else as the accelerator would pass it. The private detail: the prepared loader is
also registered in the accelerator's ``_dataloaders`` list (used by ``save_state`` /
``load_state`` and ``skip_first_batches``), as accelerate does itself.
"""
from __future__ import annotations

import warnings

VERIFIED = ((1, 16),)


def _version() -> tuple:
    import accelerate

    parts = accelerate.__version__.split(".")
    return int(parts[0]), int(parts[1])


def dp_prepare_data_loader(accelerator, dp_size: int, dp_rank: int):
    """A ``prepare_data_loader`` for ``accelerator`` that shards over ``dp_size`` replicas."""
    from accelerate.data_loader import prepare_data_loader

    if _version() not in VERIFIED:
        warnings.warn(f"lasp2.hf.sequence_parallel was verified with accelerate "
                      f"{', '.join('.'.join(map(str, v)) for v in VERIFIED)}; found {'.'.join(map(str, _version()))}",
                      stacklevel=3)
    original = accelerator.prepare_data_loader

    def prepare(data_loader, device_placement=None, slice_fn_for_dispatch=None):
        if getattr(data_loader, "_is_accelerate_prepared", False):
            return original(data_loader, device_placement=device_placement,
                            slice_fn_for_dispatch=slice_fn_for_dispatch)
        if device_placement is None:
            device_placement = accelerator.device_placement
        prepared = prepare_data_loader(
            data_loader, accelerator.device, num_processes=dp_size, process_index=dp_rank,
            split_batches=accelerator.split_batches, put_on_device=device_placement,
            rng_types=accelerator.rng_types.copy(), dispatch_batches=False, even_batches=accelerator.even_batches,
            slice_fn_for_dispatch=slice_fn_for_dispatch, use_seedable_sampler=accelerator.use_seedable_sampler,
            data_seed=accelerator.dataloader_config.data_seed, non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader)
        registry = getattr(accelerator, "_dataloaders", None)
        if isinstance(registry, list):
            registry.append(prepared)
        return prepared

    return prepare
