"""The fla backend's local work of one segment for the delta rule (DeltaNet, Gated DeltaNet: the
``matrix`` kind; KDA: ``channel_matrix``) on fla's kernels at the segment's own shapes (the
contract of ``ops/backends/__init__.py``).

fla-core is pinned (==0.6.0), so this module calls the module-level kernel functions that fla's
public ops compose (fla's own context parallelism, ``fla.ops.cp``, does the same), in the same
order and with the same arguments as ``chunk_gated_delta_rule`` / ``chunk_kda``:

    g2 = chunk_local_cumsum(g, scale=1/ln 2)      log2 cumulative gates within 64-token chunks
    WY form of each chunk: w, u (+ A)             chunk_gated_delta_rule_fwd_intra (KDA: chunk_kda_fwd_intra,
                                                  which also gives the gated qg, kg and Aqk, Akk)
    h, v_new, h_T = chunk_gated_delta_rule_fwd_h(k (KDA: kg), w, u, g2, h0)   chunk-entry and final states
    o = chunk_fwd_o(q, k, v_new, h, g2)           (KDA: chunk_gla_fwd_o_gk(q, v_new, g2, Aqk, h))

With S_{n+1} = M_n S_n + U_n per 64-token chunk (M_n = Γ_n - k̃_nᵀ w_n), one segment's work is

- constructor (before any communication; values, no graph): the WY form once; Ŝ = the final
  state of the state scan from zero (V columns); Â = the final state of the same scan over K
  columns with u = 0 from the identity (the product of the M_n, by the kernel and arithmetic of
  fla's own scan; no PyTorch K x K loop), or 0 when a document starts inside the segment;
- ``add_incoming(P)``: ``_DeltaFromState`` runs the state scan from P (the continuing document's
  initial state; later documents start from 0) and the output kernel, reusing the constructor's
  WY form: the outputs and the final state Â P + Ŝ, with graph. Its backward is fla's
  ``chunk_gated_delta_rule_bwd`` / ``chunk_kda_bwd`` exactly as fla's autograd Functions call
  them, with dht = D (``grad_targets``) on the last document's final state;
- ``inter_backward(dO)``: G = dL/dP from the segment's own outputs = dh0 of fla's
  state-gradient scan (``chunk_gated_delta_rule_bwd_dhu``, dht = 0) over the tokens P reaches
  (those before the first document start), with its local dv (``chunk_bwd_dv_local``; KDA:
  Aqkᵀ dO per chunk, one batched matmul in PyTorch, the dv half of ``chunk_kda_bwd_dAv``).

Every kernel runs on V columns (the Â scan on K), never V + K. Cost for Gated DeltaNet against
one ``chunk_gated_delta_rule`` call on the same tokens (multiply-adds counted per 64-token chunk
at K = V = 64, not timed): forward 12⅓ / 8⅓ = 1.48× in 7 kernel calls (10⅓, 1.24×, when a
document starts inside the segment), backward 29 / 24 = 1.21× in 9; the widened call it replaces
([v | 0], [0 | I]): 1.72× in 5 and 1.63× in 7. Per-kernel table: docs/algorithm.md ("Backends").
The sequence's ends skip the scans nothing reads (the contract's ``incoming`` / ``outgoing``):
segment 0 without an initial state (P = 0) runs no Â scan and no G pass, and its one scan from
zero gives both Ŝ and the outputs (1.0×: the one-device call's work); the
last segment without a final state runs neither summary scan (1.15×); a middle segment 1.28×.

Dtypes: q, k, v, beta in q's dtype (fp32/bf16/fp16); g fp32 natural-log, [B, T, H] (zeros for
DeltaNet) or [B, T, H, K] (KDA); Ŝ, Â, P, G and the final state fp32, as fla's kernels keep them.
"""
from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import HeldSummary, TokenOutputs

CHUNK = 64  # fla's chunk size for both ops (their default, the size their kernels are tuned for)


@functools.lru_cache(maxsize=None)
def kernels() -> SimpleNamespace:
    """fla 0.6.0's kernel functions (imported on first use; ``TRITON_INTERPRET`` must already be set
    for CPU tensors). Every fla call of this module goes through this table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Triton is not supported on current platform.*")
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dv_local, chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.gla.chunk import chunk_gla_fwd_o_gk
        from fla.ops.kda.chunk_bwd import chunk_kda_bwd
        from fla.ops.kda.chunk_intra import chunk_kda_fwd_intra
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.index import prepare_chunk_indices
    return SimpleNamespace(chunk_local_cumsum=chunk_local_cumsum, prepare_chunk_indices=prepare_chunk_indices,
                           RCP_LN2=RCP_LN2, fwd_intra=chunk_gated_delta_rule_fwd_intra,
                           fwd_h=chunk_gated_delta_rule_fwd_h, fwd_o=chunk_fwd_o, bwd=chunk_gated_delta_rule_bwd,
                           bwd_dv_local=chunk_bwd_dv_local, bwd_dhu=chunk_gated_delta_rule_bwd_dhu,
                           kda_fwd_intra=chunk_kda_fwd_intra, kda_fwd_o=chunk_gla_fwd_o_gk, kda_bwd=chunk_kda_bwd)


class FlaDeltaSegment(HeldSummary, TokenOutputs):
    """One segment's local work for the delta-rule kinds with fla's kernels at the segment's shapes.

    q, k [B, T, H, K], v [B, T, H, V], g None (DeltaNet), [B, T, H] or (KDA) [B, T, H, K]
    natural-log gates, beta [B, T, H]; ``starts`` host ints (``backends/__init__.py``). reach: the
    number of leading tokens the incoming state reaches (those before the first document start).
    Held until backward: the prefix [B, reach, H, K] of w (and, for KDA, of qg and kg) for G, and
    inside ``_DeltaFromState`` what fla's own autograd Function keeps (q, k, v, g2, beta, the
    chunk matrices A [B, T, H, 64] (KDA: Aqk, Akk), the initial state).
    """

    def __init__(self, q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
        ops = kernels()
        B, T, H, K = q.shape
        positions = list(starts or ())  # host positions: no device read
        inner = [p for p in positions if p > 0]
        # incoming=False: P is the constant 0 (the sequence's first segment, no initial state): it
        # reaches no token, so Â and G are 0 without their scans (the contract's flags)
        self.reach = (positions[0] if positions else T) if incoming else 0
        self.cu = self.chunk_indices = None
        if inner:  # the chunk table from the host bounds: no device-to-host copy of cu_seqlens
            bounds = torch.tensor([0, *inner, T], dtype=torch.long)
            self.cu = bounds.to(q.device)
            self.chunk_indices = ops.prepare_chunk_indices(self.cu, CHUNK, cu_seqlens_cpu=bounds)
        self.kind, self.scale, self.channel = kind, scale, kind.name == "channel_matrix"
        # fla's kernels index contiguous [B, T, H, ...] memory (zigzag segments are strided slices)
        self.q, self.k, self.v = q.contiguous(), k.contiguous(), v.to(q.dtype).contiguous()
        self.beta = beta.to(q.dtype).contiguous()
        self.g = q.new_zeros(q.shape[:3], dtype=torch.float32) if g is None else g.float().contiguous()
        with torch.no_grad():
            qd, kd, vd, bd = (t.detach() for t in (self.q, self.k, self.v, self.beta))
            self.g2 = ops.chunk_local_cumsum(self.g.detach(), chunk_size=CHUNK, scale=ops.RCP_LN2,
                                             cu_seqlens=self.cu, chunk_indices=self.chunk_indices)
            docs = dict(cu_seqlens=self.cu, chunk_indices=self.chunk_indices, chunk_size=CHUNK)
            if self.channel:  # disable_recompute=True: fla also returns qg (G's scan needs it)
                self.w, self.u, self.qg, self.kg, Aqk, Akk = ops.kda_fwd_intra(
                    q=qd, k=kd, v=vd, gk=self.g2, beta=bd, scale=scale, disable_recompute=True, **docs)
                self.mats = (Aqk, Akk)
            else:
                self.w, self.u, A = ops.fwd_intra(k=kd, v=vd, g=self.g2, beta=bd, **docs)
                self.qg = self.kg = None  # the scans take q and k themselves
                self.mats = (A,)
            if not incoming or not outgoing:  # Ŝ below (P = 0), or nothing reads the summary: no scans
                self._S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
                self._A = q.new_zeros(B, H, K, K, dtype=torch.float32)
            else:
                _, _, ht = self.states(self.u, None, save_new_value=False)
                self._S = ht[-1:] if self.cu is not None else ht  # the last document's final state
                if self.reach < T:  # a document starts inside the segment: the incoming state stops there
                    self._A = q.new_zeros(B, H, K, K, dtype=torch.float32)
                else:  # the product of the chunk transitions: the state scan over K columns from I, u = 0
                    eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(B, H, K, K).contiguous()
                    self._A = self.states(torch.zeros_like(self.w), eye, save_new_value=False)[2]
        self.outputs = self.final = None
        if not incoming:  # P = 0: the scan from zero is the forward itself, run once, and Ŝ its final state
            self._outputs_from(None)
            self._S = self.final.detach()

    def states(self, u, h0, save_new_value: bool = True):
        """fla's state scan over this segment's chunks (documents as ``cu_seqlens``) with values u
        [B, T, H, n] and initial state(s) h0 [N, H, K, n] fp32 or None: (h, v_new, final states)."""
        gates = dict(gk=self.g2) if self.channel else dict(g=self.g2)
        k = self.kg if self.channel else self.k.detach()
        return kernels().fwd_h(k=k, w=self.w, u=u, initial_state=h0, output_final_state=True,
                               chunk_size=CHUNK, save_new_value=save_new_value, cu_seqlens=self.cu,
                               chunk_indices=self.chunk_indices, **gates)

    def intra_outputs(self) -> None:
        """Nothing before P is known: the outputs come from one state scan from P (``add_incoming``)."""

    def initial_states(self, P: torch.Tensor) -> Optional[torch.Tensor]:
        """fla's ``initial_state`` for P [B, H, K, V]: P for the continuing document, zeros for
        the later ones ([n_documents, H, K, V] with ``cu_seqlens``), None when P reaches nothing."""
        if self.reach == 0:
            return None
        P = P.float().contiguous()
        if self.cu is None:
            return P
        h0 = P.new_zeros(len(self.cu) - 1, *P.shape[1:])
        h0[:1] = P
        return h0

    def add_incoming(self, P: torch.Tensor) -> None:
        """The outputs and the final state Â P + Ŝ from the incoming state P [B, H, K, V] (a constant);
        already there for segment 0 without an initial state (its constructor ran them from zero)."""
        if self.outputs is None:
            self._outputs_from(self.initial_states(P))

    def _outputs_from(self, h0: Optional[torch.Tensor]) -> None:
        """``_DeltaFromState`` from fla's initial state(s) h0 (``initial_states``): outputs and final state."""
        self.outputs, self.final = _DeltaFromState.apply(self.q, self.k, self.v, self.g, self.beta, self, h0)
        # fla's backward recomputes the WY form from the chunk matrices, as its own Function does;
        # G needs only the prefix P reaches (the first document's chunks are the segment's first)
        r, T = self.reach, self.q.shape[1]
        prefix = (lambda t: t if t is None or r == T else t[:, :r].clone())  # a copy frees the rest
        self.u, self.w, self.qg, self.kg = None, prefix(self.w), prefix(self.qg), prefix(self.kg)

    def inter_backward(self, do: torch.Tensor):
        """(G = dL/dP [B, H, K, V] fp32 from the segment's own outputs, None): dh0 of fla's
        state-gradient scan with no final-state gradient, over the tokens P reaches."""
        B, T, H, K = self.q.shape
        r = self.reach
        G = torch.zeros(B, H, K, do.shape[-1], dtype=torch.float32, device=do.device)
        if r > 0:
            ops = kernels()
            q, k = (self.qg, self.kg) if self.channel else (self.q.detach()[:, :r], self.k.detach()[:, :r])
            q, k, w, g2 = (t.contiguous() for t in (q, k, self.w, self.g2[:, :r]))
            do = do[:, :r].to(q.dtype).contiguous()
            if self.channel:
                dv = _dv_local(self.mats[0][:, :r], do)
                gates = dict(gk=g2)
            else:
                dv = ops.bwd_dv_local(q=q, k=k, g=g2, do=do, scale=self.scale, chunk_size=CHUNK)
                gates = dict(g=g2)
            _, G, _ = ops.bwd_dhu(q=q, k=k, w=w, do=do, dv=dv, h0=G, dht=None, scale=self.scale,
                                  chunk_size=CHUNK, **gates)
        self.w = self.qg = self.kg = None
        return G, None

    def grad_targets(self, _unused, final_grad: torch.Tensor):
        """The final state Â P + Ŝ (``_DeltaFromState``'s second output) gets D: fla's backward
        then takes it as dht. Ŝ and Â are values and need nothing."""
        return [self.final], [final_grad.to(self.final.dtype)]


def _dv_local(Aqk: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """dv_s = Σ_{t >= s in s's chunk} Aqk[t, s] dO_t: the dv half of fla's ``chunk_kda_bwd_dAv``
    (its dA half, dO v_newᵀ, is not needed for G). Aqk [B, r, H, C] (row t: query t's scaled,
    gated scores against its chunk's keys; the upper triangle is not written by fla), do
    [B, r, H, V]; returns [B, r, H, V] in do's dtype (fp32 accumulation)."""
    B, r, H, V = do.shape
    C = Aqk.shape[-1]
    n = -(-r // C)
    pad = n * C - r  # the last chunk's missing rows are zero
    A = F.pad(Aqk.float(), (0, 0, 0, 0, 0, pad)).view(B, n, C, H, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=do.device).tril()  # [t, s]: t >= s
    A = A.masked_fill(~causal[:, None, :], 0.0)
    dO = F.pad(do.float(), (0, 0, 0, 0, 0, pad)).view(B, n, C, H, V)
    dv = torch.einsum("bnths,bnthv->bnshv", A, dO).reshape(B, n * C, H, V)[:, :r]
    return dv.to(do.dtype).contiguous()  # einsum may return permuted strides; fla reads dense memory


class _DeltaFromState(torch.autograd.Function):
    """(o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32) of the delta rule from fla's
    initial state(s) h0 (a constant), reusing the segment's WY form; backward is fla's
    ``chunk_gated_delta_rule_bwd`` / ``chunk_kda_bwd``, called as fla's autograd Functions call
    them. One gradient per input: dq, dk, dv, dg (natural-log g, fp32), dbeta, None, None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, seg: FlaDeltaSegment, h0):
        ops = kernels()
        h, v_new, ht = seg.states(seg.u, h0)
        docs = dict(cu_seqlens=seg.cu, chunk_indices=seg.chunk_indices, chunk_size=CHUNK)
        if seg.channel:
            o = ops.kda_fwd_o(q=q, v=v_new, g=seg.g2, A=seg.mats[0], h=h, scale=seg.scale, **docs)
        else:
            o = ops.fwd_o(q=q, k=k, v=v_new, h=h, g=seg.g2, scale=seg.scale, **docs)
        ctx.save_for_backward(q, k, v, seg.g2, beta, h0, *seg.mats)
        ctx.info = (seg.scale, seg.channel, seg.cu, seg.chunk_indices, ht.shape[0])
        return o.to(q.dtype), ht[-1:] if seg.cu is not None else ht

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g2, beta, h0, *mats = ctx.saved_tensors
        scale, channel, cu, chunk_indices, n_states = ctx.info
        dht = None
        if d_final is not None:  # the earlier documents' final states are not outputs: zero gradient
            dht = d_final.float().contiguous()
            if cu is not None:
                dht = torch.cat([dht.new_zeros(n_states - 1, *dht.shape[1:]), dht])
        do = (torch.zeros_like(v) if do is None else do).to(v.dtype).contiguous()
        common = dict(q=q, k=k, v=v, beta=beta, scale=scale, initial_state=h0, do=do, dht=dht, cu_seqlens=cu,
                      chunk_indices=chunk_indices, chunk_size=CHUNK)
        if channel:
            dq, dk, dv, db, dg, _, _, _ = kernels().kda_bwd(g=g2, Aqk=mats[0], Akk=mats[1], **common)
        else:
            dq, dk, dv, db, dg, _, _, _ = kernels().bwd(g=g2, A=mats[0], **common)
        return dq.to(q), dk.to(k), dv.to(v), dg.float(), db.to(beta), None, None


segment_work = FlaDeltaSegment
"""The contract's constructor for the delta-rule kinds (``fla.segment_work`` dispatches here)."""
