"""sp_mla_attention (the latent all-gather) vs softmax attention on the whole sequence with the
up-projected K/V, shard by shard: output, dq, the latent's gradient and the up-projection's
parameter gradients (summed over the ranks), fp64 to 1e-10; one collective per direction and the
bytes the docs report."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.parallel import comm
from lasp2.parallel.mla import kv_bytes_per_rank, latent_bytes_per_rank, sp_mla_attention
from tests.dist import Spawns, run_cases, run_sections
from tests.helpers import assert_close

H, DN, DR, DV, RANK = 3, 4, 2, 5, 6  # heads, nope / rope key dims, value dim, kv latent rank


class Expand(torch.nn.Module):
    """Kimi Linear / DeepSeek MLA's up-projection: latent [.., RANK + DR] = [c | k_rot] ->
    k = [W_k c per head | k_rot shared by the heads], v = W_v c."""

    def __init__(self, dtype):
        super().__init__()
        self.kv_b = torch.nn.Linear(RANK, H * (DN + DV), bias=False, dtype=dtype)

    def forward(self, latent):
        c, k_rot = latent.split([RANK, DR], dim=-1)
        kv = self.kv_b(c).view(*c.shape[:-1], H, DN + DV)
        k_nope, v = kv.split([DN, DV], dim=-1)
        return torch.cat([k_nope, k_rot.unsqueeze(-2).expand(*k_rot.shape[:-1], H, DR)], dim=-1), v


def _case(group, layout, T_local, B=1, cu=None, seed=0, dtype=torch.float64):
    W = dist.get_world_size(group)
    T = W * T_local
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, DN + DR, generator=gen, dtype=torch.float64).to(dtype)
    latent = torch.randn(B, T, RANK + DR, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(B, T, H, DV, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    expand = Expand(dtype)
    cu_t = None if cu is None else torch.tensor(cu)

    # the reference: up-projected K/V on the whole sequence, one device
    q_ref, lat_ref = q.clone().requires_grad_(), latent.clone().requires_grad_()
    k, v = expand(lat_ref)
    o_ref = lasp2.softmax_attention(q_ref, k, v, cu_seqlens=cu_t)
    ref = torch.autograd.grad((o_ref.double() * weight).sum(), [q_ref, lat_ref, *expand.parameters()])

    local = lambda x: lasp2.shard(x, group=group, layout=layout)  # noqa: E731
    q_l, lat_l = local(q).requires_grad_(), local(latent).requires_grad_()
    call = dict(group=group, layout=layout, cu_seqlens=cu_t)
    with torch.no_grad():  # the first call with new shapes adds the one-off shape agreement
        sp_mla_attention(q_l, lat_l, expand, **call)
    with comm.track() as fwd:
        o = sp_mla_attention(q_l, lat_l, expand, **call)
    with comm.track() as bwd:
        got = torch.autograd.grad((o.double() * local(weight)).sum(), [q_l, lat_l, *expand.parameters()])
    dw = got[2].clone()
    dist.all_reduce(dw, group=group)  # parameter gradients are partial sums over each rank's tokens

    assert_close("o", o, local(o_ref), dtype, whole=o_ref)
    assert_close("dq", got[0], local(ref[0]), dtype, whole=ref[0])
    assert_close("dlatent", got[1], local(ref[1]), dtype, whole=ref[1])
    assert_close("dkv_b", dw, ref[2], dtype)
    if W > 1:
        assert [r.op for r in fwd.records] == ["all_gather"], fwd.records
        assert [r.op for r in bwd.records] == ["reduce_scatter"], bwd.records
        elem = torch.empty(0, dtype=dtype).element_size()
        assert fwd.bytes_received == latent_bytes_per_rank(W, B, T_local, RANK + DR, elem) + (W - 1) * 8
        assert bwd.bytes_received == latent_bytes_per_rank(W, B, T_local, RANK + DR, 8 if dtype == torch.float64 else 4)
        assert kv_bytes_per_rank(W, B, T_local, H, DN + DR, DV, elem) > fwd.bytes_received


def _worker(group, full: bool):
    """The MLA section of the shared SP spawns (pool "sp": W = 2 by default; "sp-full": W = 4)."""
    W = dist.get_world_size(group)
    if W != (4 if full else 2):  # the pools also spawn other world sizes for the other modules
        return run_sections(group, [])
    return run_sections(group, [("mla", lambda g: run_cases(_cases(W, full), lambda **p: _case(g, **p)))])


def _cases(W, full):
    T_local = 8
    cases = [("contiguous", dict(layout="contiguous", T_local=T_local, B=2)),
             ("zigzag-docs", dict(layout="zigzag", T_local=T_local, cu=[0, 3, T_local + 1, W * T_local])),
             ("fp32-zigzag", dict(layout="zigzag", T_local=T_local, dtype=torch.float32))]
    if full:
        cases += [("zigzag", dict(layout="zigzag", T_local=T_local, B=2)),
                  ("contiguous-docs", dict(layout="contiguous", T_local=T_local,
                                           cu=[0, 1, 2, T_local, T_local + 5, W * T_local]))]
    return cases


# One spawn serves this module with test_sp_linear, test_sp_contract and test_sp_softmax (pool "sp").
SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


def test_sp_mla_w2():
    SPAWNS.results(2, "mla")


@pytest.mark.slow
def test_sp_mla_w4():
    SPAWNS_FULL.results(4, "mla")
