"""Training: data, packing, loop, checkpoints, CLI."""
