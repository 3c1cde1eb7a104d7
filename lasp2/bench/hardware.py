"""Hardware for ``lasp2 plan``: presets as data (each with its source), ``--hardware FILE.json``
for a user's own cluster, and the calibration knobs the planner's predictions depend on.

A :class:`Hardware` holds datasheet numbers only (peaks); a :class:`Calibration` holds what a
real training stack achieves on them (fractions of peak, latencies, fixed costs). Peaks come
from vendors; calibrations come from fits: ``published.paper_calibration()`` is fitted to the LASP-2 paper's
Table 6 (:mod:`lasp2.bench.published`, which says which numbers were fitted and which held out),
and ``lasp2 plan --validate ... --save-calibration FILE.json`` writes one fitted on this machine.

``--hardware FILE.json`` takes a preset's fields (any missing one is an error naming it), or
``{"preset": "h100", ...overrides}``; an optional ``"calibration": {...}`` object overrides knobs.
Lengths: :func:`parse_length` accepts ``2097152``, ``2048K``, ``2M`` (K = 1024, M = 1024^2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .network import Link, Network

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU and its cluster. FLOP/s: dense bf16 peak; bytes and bytes/s as the vendor states
    them; link bandwidths per GPU and direction (NVLink: the per-direction half of the quoted
    bidirectional figure; inter-node: one NIC per GPU at its line rate)."""

    name: str
    peak_flops: float
    memory_bytes: float
    hbm_bandwidth: float
    nvlink_bandwidth: float
    inter_bandwidth: float
    gpus_per_node: int
    source: str


@dataclass(frozen=True)
class Calibration:
    """What a training stack achieves on the hardware; every field is a knob a fit may set.

    mfu                 achieved fraction of peak FLOP/s (matmuls and attention kernels alike)
    bandwidth_efficiency achieved fraction of a link's peak bandwidth in collectives and sends
    nvlink_alpha_s, inter_alpha_s   latency of one step of a ring collective, per link level
    nvlink_hop_s, inter_hop_s       latency of one *dependent* point-to-point hop (launch, sync,
                        the fold kernel on the critical path), per link level
    step_overhead_s     fixed time per optimizer step (framework, data loading, launches)
    grad_overlap        fraction of the backward pass the gradient synchronisation hides behind
                        (1: fully overlapped buckets, PyTorch DDP/FSDP2; 0: after backward)
    reserved_bytes      memory per GPU beyond model states and activations (CUDA context, NCCL
                        buffers, allocator fragmentation)
    """

    mfu: float = 0.40
    bandwidth_efficiency: float = 0.80
    nvlink_alpha_s: float = 5e-6
    inter_alpha_s: float = 10e-6
    nvlink_hop_s: float = 20e-6
    inter_hop_s: float = 25e-6
    step_overhead_s: float = 0.0
    grad_overlap: float = 1.0
    reserved_bytes: float = 3e9

    def __post_init__(self):
        for f in ("mfu", "bandwidth_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"calibration {f} must be in (0, 1], got {getattr(self, f)}")
        if not 0 <= self.grad_overlap <= 1:
            raise ValueError(f"calibration grad_overlap must be in [0, 1], got {self.grad_overlap}")
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"calibration {f.name} must be >= 0, got {getattr(self, f.name)}")


# Presets: datasheet peaks. Links per GPU and direction. Sources in the comments.
PRESETS = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): bf16 dense 312 TFLOP/s, SXM4 40 GB HBM2 at
    # 1,555 GB/s; NVLink 3 600 GB/s bidirectional. DGX A100 user guide: 8 GPUs per node, eight
    # ConnectX-6 HDR 200 Gb/s compute NICs, one per GPU (25 GB/s).
    "a100-40gb": Hardware("A100 SXM4 40GB", 312e12, 40 * GB, 1555e9, 300e9, 25e9, 8,
                          "NVIDIA A100 datasheet; DGX A100 user guide"),
    # Same datasheet: SXM4 80 GB HBM2e at 2,039 GB/s. The LASP-2 paper's cluster (16 DGX-A100).
    "a100-80gb": Hardware("A100 SXM4 80GB", 312e12, 80 * GB, 2039e9, 300e9, 25e9, 8,
                          "NVIDIA A100 datasheet; DGX A100 user guide"),
    # NVIDIA H100 datasheet: SXM5 bf16 dense 989 TFLOP/s, 80 GB HBM3 at 3.35 TB/s, NVLink 4
    # 900 GB/s bidirectional. DGX H100: eight ConnectX-7 400 Gb/s NICs, one per GPU (50 GB/s).
    "h100": Hardware("H100 SXM5 80GB", 989e12, 80 * GB, 3350e9, 450e9, 50e9, 8,
                     "NVIDIA H100 datasheet; DGX H100 user guide"),
    # NVIDIA H200 datasheet: SXM bf16 dense 989 TFLOP/s, 141 GB HBM3e at 4.8 TB/s, NVLink 4
    # 900 GB/s; HGX H200 with 400 Gb/s per GPU.
    "h200": Hardware("H200 SXM 141GB", 989e12, 141 * GB, 4800e9, 450e9, 50e9, 8,
                     "NVIDIA H200 datasheet"),
    # NVIDIA DGX B200 datasheet: 8 B200, 1,440 GB HBM3e in all (180 GB each) at 64 TB/s in all
    # (8 TB/s each), 72 PFLOP/s FP8 training -> 2.25 PFLOP/s dense bf16 per GPU; NVLink 5
    # 1.8 TB/s bidirectional; eight ConnectX-7 400 Gb/s.
    "b200": Hardware("B200 180GB", 2250e12, 180 * GB, 8000e9, 900e9, 50e9, 8,
                     "NVIDIA DGX B200 datasheet"),
}


def links(hw: Hardware, cal: Calibration) -> Network:
    """The cost model's two-level network: achieved bandwidth = peak x efficiency."""
    eff = cal.bandwidth_efficiency
    intra = Link(f"NVLink ({hw.nvlink_bandwidth * eff / GB:.0f} GB/s achieved per GPU and direction)",
                 cal.nvlink_alpha_s, hw.nvlink_bandwidth * eff, cal.nvlink_hop_s)
    inter = Link(f"inter-node ({hw.inter_bandwidth * eff / GB:.0f} GB/s achieved per GPU and direction)",
                 cal.inter_alpha_s, hw.inter_bandwidth * eff, cal.inter_hop_s)
    return Network(intra, inter, hw.gpus_per_node)


def _from_dict(data: dict, where: str) -> tuple:
    data = dict(data)
    cal = data.pop("calibration", {})
    if "preset" in data:
        preset = data.pop("preset")
        if preset not in PRESETS:
            raise ValueError(f"--hardware {where}: preset {preset!r}: choose one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
        hw = replace(base, **_checked(data, Hardware, where))
    else:
        names = [f.name for f in fields(Hardware) if f.name != "source"]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"--hardware {where}: missing field(s) {missing}; give every one of {names} (plus "
                             f"an optional 'source'), or start from a preset: {{\"preset\": \"h100\", ...}}")
        hw = Hardware(source=data.pop("source", where), **_checked(data, Hardware, where))
    return hw, Calibration(**_checked(cal, Calibration, where + " calibration"))


def _checked(values: dict, cls, where: str) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--hardware {where}: unknown field(s) {unknown}; valid: {sorted(known)}")
    return values


def load_hardware(spec: str, default: Calibration = Calibration()) -> tuple:
    """(Hardware, Calibration) of a preset name or a JSON file; the calibration is ``default``
    (``lasp2 plan`` passes ``published.paper_calibration()``) unless the file gives its own."""
    if spec in PRESETS:
        return PRESETS[spec], default
    path = Path(spec)
    if not path.suffix == ".json":
        raise ValueError(f"--hardware {spec!r}: choose a preset ({', '.join(PRESETS)}) or give a FILE.json")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--hardware {spec}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--hardware {spec}: not valid JSON ({e})") from None
    hw, cal = _from_dict(data, spec)
    return hw, (cal if "calibration" in data else default)


def parse_length(text: str) -> int:
    """'2097152' | '2048K' | '2M' -> tokens (K = 1024, M = 1024^2); ValueError otherwise."""
    t = str(text).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"sequence length {text!r}: write a positive integer, optionally with K or M "
                         "(2097152, 2048K, 2M)")
    return int(digits) * scale
