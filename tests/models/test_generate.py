"""``lasp2.generate`` (Linear-Llama): SP prefill then decoding, against a no-cache recompute.

The reference is the model's own full forward on the growing sequence (argmax of the last
logits, one token at a time): no cache, no states. Every case first shows that the tokens
depend on the carried state (a positive control: the same continuation with the linear states
zeroed after the prompt differs), so a lost or wrong state cannot pass. fp64 models: the SP
prefill's states equal the one-process ones to 1e-10.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lasp2.models import LinearLlama, LinearLlamaConfig
from lasp2.models.generate import SPPlan, extend, generate, prefill, sp_prefill
from tests.dist import Spawns, run_sections
from tests.helpers import FP64_TOL, max_rel_err

# (name, layer pattern, linear variant): pure linear and hybrid; scalar-gate, delta rule and no gate.
MODELS = (("pure-bla", "L", "bla"), ("hybrid-gdn", "LLLN", "gated_deltanet"), ("hybrid-mamba2", "LN", "mamba2"))
PROMPT_LEN = 13  # splits over no W > 1 (nor 2W): the tail runs in decode mode
NEW = 6


def tiny(pattern: str, variant: str) -> LinearLlama:
    cfg = LinearLlamaConfig.preset("debug", layer_pattern=pattern, linear_variant=variant, layers=3)
    return LinearLlama(cfg, seed=3).double()


def prompt(B: int = 2, T: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def recompute(model: LinearLlama, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by the full forward on the growing sequence (no cache)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def zeroed_state_continuation(model: LinearLlama, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation after the prompt with every linear state set to zero (the control)."""
    cache, logits = prefill(model, ids, SPPlan())
    cache.states = [None if s is None else torch.zeros_like(s) for s in cache.states]
    new = []
    for _ in range(n):
        new.append(logits.argmax(-1))
        logits = extend(model, new[-1][:, None], cache)
    return torch.cat([ids, torch.stack(new, 1)], 1)


@pytest.mark.parametrize("name,pattern,variant", MODELS)
def test_generate_one_process_equals_recompute(name, pattern, variant):
    model, ids = tiny(pattern, variant), prompt()
    want = recompute(model, ids, NEW)
    assert not torch.equal(zeroed_state_continuation(model, ids, NEW), want), "control: tokens ignore the state"
    assert torch.equal(generate(model, ids, max_new_tokens=NEW), want)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model, ids = tiny("LN", "mamba2"), prompt()
    a = generate(model, ids, max_new_tokens=NEW, temperature=1.5, seed=5)
    assert torch.equal(a, generate(model, ids, max_new_tokens=NEW, temperature=1.5, seed=5))
    assert not torch.equal(a, generate(model, ids, max_new_tokens=NEW, temperature=1.5, seed=6))
    assert torch.equal(generate(model, ids, max_new_tokens=NEW, temperature=0.7, top_k=1),
                       generate(model, ids, max_new_tokens=NEW))


def test_eos_stops_and_pads_finished_rows():
    model, ids = tiny("LN", "mamba2"), prompt()
    greedy = generate(model, ids, max_new_tokens=NEW)
    eos = int(greedy[0, PROMPT_LEN + 1])  # row 0 emits it as its second new token
    out = generate(model, ids, max_new_tokens=NEW, eos_id=eos)
    row0 = out[0, PROMPT_LEN:]
    assert int(row0[1]) == eos and bool((row0[2:] == eos).all())
    hit = (greedy[1, PROMPT_LEN:] == eos).nonzero()
    if not len(hit):  # row 1 never emits it: generation runs to max_new_tokens, row 1 unchanged
        assert torch.equal(out[1], greedy[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=0), "top_k"), (dict(max_new_tokens=2, eos_id=256), "eos_id"),
    (dict(max_new_tokens=2, layout="diagonal"), "layout")])
def test_generate_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny("L", "bla"), prompt(), **kwargs)


def test_generate_refuses_bad_inputs():
    model = tiny("L", "bla")
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, prompt().double(), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, prompt(T=0), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, prompt() + 300, max_new_tokens=2)
    with pytest.raises(ValueError, match="LinearLlama"):
        generate(torch.nn.Linear(2, 2), prompt(), max_new_tokens=2)


# ---- under SP --------------------------------------------------------------------------------------

def _sp_case(group, name, pattern, variant, layout):
    """Tokens and prefill states under SP vs one process and vs the recompute (every rank)."""
    model, ids = tiny(pattern, variant), prompt()
    plan = SPPlan(group, dist.get_world_size(group), layout)
    P = plan.prefix_len(PROMPT_LEN)
    sp_cache = sp_prefill(model, ids[:, :P], plan)
    one, _ = prefill(model, ids[:, :P], SPPlan())
    got = generate(model, ids, group=group, layout=layout, max_new_tokens=NEW)
    want = recompute(model, ids, NEW)
    gathered = [None] * plan.world
    dist.all_gather_object(gathered, got, group=group)
    assert P > 0 and sp_cache.length == P
    for i, (a, b) in enumerate(zip(sp_cache.states + sp_cache.keys + sp_cache.values,
                                   one.states + one.keys + one.values)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.shape == b.shape and max_rel_err(a, b) < FP64_TOL, (i, max_rel_err(a, b))
    assert all(torch.equal(g, got) for g in gathered), "ranks generated different tokens"
    assert not torch.equal(zeroed_state_continuation(model, ids, NEW), want), "control: tokens ignore the state"
    assert torch.equal(got, want)


def _mismatched_prompts(group):
    ids = prompt()
    if dist.get_rank(group) == 1:
        ids = ids.flip(1)
    with pytest.raises(ValueError, match="different prompts"):
        generate(tiny("L", "bla"), ids, group=group, max_new_tokens=2)


def _cli_rank(group):
    """The CLI's rank function at this W on a checkpoint written here: the recompute's tokens."""
    import tempfile

    from lasp2.train.generate_cli import generate_rank

    with tempfile.TemporaryDirectory() as tmp:
        box = [write_checkpoint(tmp) if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        ids = prompt(B=1)
        got = generate_rank({"checkpoint": box[0], "prompt": ids[0].tolist(), "layout": "zigzag",
                             "settings": dict(max_new_tokens=NEW)})
        dist.barrier(group)  # nobody removes the directory while another rank reads it
    return got == recompute(checkpoint_model(), ids, NEW)[0, PROMPT_LEN:].tolist()


def checkpoint_config():
    from lasp2.train.config import TrainConfig

    return TrainConfig(dtype="float64", model={"layers": 3}, seed=3, sp=1)


def checkpoint_model() -> LinearLlama:
    return LinearLlama(checkpoint_config().model_config(), seed=3).double()


def write_checkpoint(out: str) -> str:
    """A single-file ``lasp2 train`` checkpoint of ``checkpoint_model()``; returns its run directory."""
    from lasp2.train import checkpoint

    cfg, model = checkpoint_config(), None
    cfg.out = out
    model = checkpoint_model()
    checkpoint.save(out, 1, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                    rng={"cpu": torch.zeros(1, 1, dtype=torch.uint8)}, config=cfg.to_dict(), world={"dp": 1, "sp": 1})
    return out


def test_cli_one_process_equals_recompute(tmp_path, capsys):
    from lasp2.cli import main

    ids = prompt(B=1)
    run = write_checkpoint(str(tmp_path))
    assert main(["generate", "--checkpoint", run, "--prompt", " ".join(map(str, ids[0].tolist())),
                 "--max-new-tokens", str(NEW), "--print-ids"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "ids: " + " ".join(map(str, recompute(checkpoint_model(), ids, NEW)[0, PROMPT_LEN:].tolist()))


def test_cli_refuses_bad_prompts(tmp_path, capsys):
    from lasp2.cli import main

    run = write_checkpoint(str(tmp_path))
    assert main(["generate", "--checkpoint", run, "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert "token ids separated by spaces" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--prompt", "999", "--max-new-tokens", "2"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def _worker(group):
    W = dist.get_world_size(group)
    sections = []
    if W > 1:
        for name, pattern, variant in MODELS:
            for layout in ("contiguous", "zigzag"):
                sections.append((f"{name}-{layout}",
                                 lambda g, a=(name, pattern, variant, layout): _sp_case(g, *a)))
        sections += [("mismatch", _mismatched_prompts), ("cli", _cli_rank)]
    return run_sections(group, sections)


SPAWNS = Spawns(_worker, pool="sp")
SP_CASES = [f"{n}-{layout}" for n, _, _ in MODELS for layout in ("contiguous", "zigzag")]


@pytest.mark.parametrize("case", SP_CASES)
def test_sp_generate_equals_recompute(case):
    SPAWNS.results(2, case)


def test_sp_generate_refuses_different_prompts():
    SPAWNS.results(2, "mismatch")


def test_cli_rank_sp2_equals_recompute():
    assert all(SPAWNS.results(2, "cli"))


@pytest.mark.slow
@pytest.mark.parametrize("case", SP_CASES)
def test_sp_generate_w4(case):
    SPAWNS.results(4, case)


@pytest.mark.slow
def test_cli_self_launched_sp2_equals_sp1(tmp_path):
    """``lasp2 generate --sp 2`` (two processes it starts itself) prints the ids of ``--sp 1``."""
    import os
    import subprocess
    import sys

    run = write_checkpoint(str(tmp_path))
    text = " ".join(map(str, prompt(B=1)[0].tolist()))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    outs = [subprocess.run([sys.executable, "-m", "lasp2", "generate", "--checkpoint", run, "--prompt", text,
                            "--max-new-tokens", str(NEW), "--print-ids", "--sp", str(sp), "--layout", "zigzag"],
                           capture_output=True, text=True, env=env, timeout=600) for sp in (1, 2)]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    ids = [o.stdout.strip().splitlines()[-1] for o in outs]
    assert ids[0].startswith("ids: ") and ids[0] == ids[1]
