"""Which transformers releases ``lasp2.hf`` supports, and the one place it reaches into them.

Verified: transformers 5.23 - 5.25 (the test suite's ``hf`` tests pass on each; CI runs the
pinned one in ``constraints.txt``; ``.ci/newest`` runs them against the newest releases).
Older releases are refused at import (they lack model classes and the ``AttentionInterface`` we
register); newer ones run with a warning until verified.

The one private detail lasp2 reads: before transformers 5.25, a model family's sequence-mixing
kernels (``torch_chunk_gated_delta_rule``, ``mamba2_chunk_scan``, ``causal_conv1d_fn``) were plain
functions wrapped with ``functools.wraps`` that call fla / mamba_ssm / causal-conv1d when those
are installed, even for CPU tensors, where they fail. ``torch_fallbacks`` unwraps them to
transformers' own PyTorch code (``__wrapped__``). From 5.25 on, transformers routes inputs on a
device the package does not support (CPU) to its PyTorch code itself, and nothing is touched.
Only CPU baselines of an *unmodified* model need this; parallelized layers never call these
kernels. Listed under Known Limitations in the README.
"""
from __future__ import annotations

import warnings
from typing import Tuple

OLDEST = (5, 23)         # oldest verified release
NEWEST = (5, 25)         # newest verified release
FALLS_BACK_ON_CPU = (5, 25)  # from here on, transformers picks its PyTorch kernels for CPU tensors itself

KERNELS = ("causal_conv1d_fn", "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
           "mamba2_chunk_scan")


def version_tuple(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as "5.25.0" or "5.26.0.dev0"."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ImportError(f"lasp2.hf cannot read the transformers version {version!r}") from None


def check_transformers(version: str) -> None:
    """ImportError for releases older than the verified range; a warning for newer ones."""
    found = version_tuple(version)
    supported = f"{OLDEST[0]}.{OLDEST[1]} - {NEWEST[0]}.{NEWEST[1]}"
    if found < OLDEST:
        raise ImportError(f"lasp2.hf needs transformers >= {OLDEST[0]}.{OLDEST[1]} (verified: {supported}); "
                          f"found {version}, which lacks model classes and attention hooks lasp2.hf uses. "
                          f"Upgrade: pip install -c constraints.txt 'transformers>={OLDEST[0]}.{OLDEST[1]}'")
    if found > NEWEST:
        warnings.warn(f"transformers {version} is newer than the releases lasp2.hf was verified with ({supported}); "
                      f"run .ci/newest to check it", stacklevel=3)


def check_family_release(family) -> None:
    """ValueError when the installed transformers is older than the release this family's parity
    tests pass on (its modeling code differs there: e.g. Mamba2's gated norm class, Mamba1's
    kernels)."""
    import transformers

    if version_tuple(transformers.__version__) < family.since:
        raise ValueError(f"lasp2.hf supports {family.name} from transformers {family.since[0]}.{family.since[1]} on "
                         f"(its parity tests fail on older modeling code); found {transformers.__version__}: "
                         f"pip install -c constraints.txt 'transformers>={family.since[0]}.{family.since[1]}'")


def torch_fallbacks(modeling, version: str) -> None:
    """Make the transformers modeling module ``modeling`` run its own PyTorch kernels on CPU
    tensors (see the module docstring); a no-op from transformers 5.25 on."""
    if version_tuple(version) >= FALLS_BACK_ON_CPU:
        return
    for name in KERNELS:
        inner = getattr(getattr(modeling, name, None), "__wrapped__", None)
        if inner is not None:  # a dispatching wrapper: select the PyTorch function it wraps
            setattr(modeling, name, inner)
