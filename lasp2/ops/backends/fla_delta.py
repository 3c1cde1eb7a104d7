"""The fla backend's local work of one segment for DeltaNet and Gated DeltaNet (the ``matrix`` kind),
on fla's kernels at the segment's own shapes (the contract of ``ops/backends/__init__.py``).

fla-core is pinned (==0.6.0), so this module calls the module-level kernel functions that
``fla.ops.gated_delta_rule.chunk`` composes into ``chunk_gated_delta_rule`` (fla's own
``fla.ops.cp`` does the same), in the same order and with the same arguments:

    g2 = chunk_local_cumsum(g, scale=1/ln 2)            log2 cumulative gates within 64-token chunks
    w, u, A = chunk_gated_delta_rule_fwd_intra(k, v, g2, beta)     WY form of each chunk
    h, v_new, h_T = chunk_gated_delta_rule_fwd_h(k, w, u, g2, h0)  chunk-entry states, final state
    o = chunk_fwd_o(q, k, v_new, h, g2, scale)                     outputs

One segment's local work, with S_{n+1} = M_n S_n + U_n per chunk (M_n = γ_n I - k̃_nᵀ w_n):

- constructor (before any communication; values, no graph): the WY form (w, u, A) once; Ŝ = the
  final state of ``fwd_h`` from zero (V columns); Â = the final state of ``fwd_h`` over K columns
  with u = 0 from the identity (the product of the chunk transitions M_n, the same kernel and
  arithmetic as fla's state scan), or 0 when a document starts in the segment;
- ``add_incoming(P)``: ``_DeltaFromState`` runs ``fwd_h`` from P (the continuing document's initial
  state; later documents start from 0) and ``chunk_fwd_o``, reusing the constructor's WY form:
  the outputs and the segment's final state Â P + Ŝ, with graph; its backward is fla's
  ``chunk_gated_delta_rule_bwd`` exactly as fla's autograd Function calls it, with dht = D
  (``grad_targets``) on the last document's final state;
- ``inter_backward(dO)``: G = dL/dP from the segment's own outputs = dh0 of fla's state-gradient
  scan (``chunk_bwd_dv_local`` + ``chunk_gated_delta_rule_bwd_dhu``, dht = 0) over the tokens P
  reaches (those before the first document start), V columns.

Every kernel runs on V (or, for Â, K) columns, never V + K. Kernel calls and multiply-adds against
one ``chunk_gated_delta_rule`` call: docs/algorithm.md ("Backends"). KDA (``chunk_kda``) stays on
the widened call of ``fla.FlaSegment`` for now.

Dtypes: q, k, v, beta in q's dtype (fp32/bf16/fp16), g fp32 natural-log [B, T, H] (zeros for
DeltaNet), Ŝ, Â, P, G and the final state fp32, as fla's kernels keep them.
"""
from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

CHUNK = 64  # fla's chunk size for the gated delta rule (its default; the kernels are tuned for it)


@functools.lru_cache(maxsize=None)
def kernels() -> SimpleNamespace:
    """fla 0.6.0's gated-delta-rule kernel functions (imported on first use; ``TRITON_INTERPRET``
    must already be set for CPU tensors). Every call this module makes goes through this table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Triton is not supported on current platform.*")
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dv_local, chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.index import prepare_chunk_indices
    return SimpleNamespace(chunk_local_cumsum=chunk_local_cumsum, prepare_chunk_indices=prepare_chunk_indices,
                           RCP_LN2=RCP_LN2, fwd_intra=chunk_gated_delta_rule_fwd_intra,
                           fwd_h=chunk_gated_delta_rule_fwd_h, fwd_o=chunk_fwd_o, bwd=chunk_gated_delta_rule_bwd,
                           bwd_dv_local=chunk_bwd_dv_local, bwd_dhu=chunk_gated_delta_rule_bwd_dhu)


class FlaDeltaSegment:
    """One segment's local work for the ``matrix`` kind with fla's kernels at the segment's shapes.

    q, k [B, T, H, K], v [B, T, H, V], g None (DeltaNet) or [B, T, H] natural-log gates, beta
    [B, T, H]; ``starts`` host ints (``backends/__init__.py``). reach: the number of leading tokens
    the incoming state reaches (those before the first document start). Holds, until backward:
    the WY form's w [B, reach, H, K] (for G) and, inside ``_DeltaFromState``, what fla's own
    autograd Function keeps (q, k, v, g2, beta, A [B, T, H, 64], the initial state).
    """

    def __init__(self, q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]]):
        ops = kernels()
        B, T, H, K = q.shape
        positions = list(starts or ())  # host positions: no device read
        inner = [p for p in positions if p > 0]
        self.reach = positions[0] if positions else T
        self.cu = None if not inner else torch.tensor([0, *inner, T], dtype=torch.long, device=q.device)
        self.chunk_indices = None if self.cu is None else ops.prepare_chunk_indices(self.cu, CHUNK)
        self.kind, self.scale = kind, scale
        # fla's kernels index contiguous [B, T, H, ...] memory (zigzag segments are strided slices)
        self.q, self.k, self.v = q.contiguous(), k.contiguous(), v.to(q.dtype).contiguous()
        self.beta = beta.to(q.dtype).contiguous()
        self.g = q.new_zeros(q.shape[:3], dtype=torch.float32) if g is None else g.float().contiguous()
        with torch.no_grad():
            self.g2 = ops.chunk_local_cumsum(self.g.detach(), chunk_size=CHUNK, scale=ops.RCP_LN2,
                                             cu_seqlens=self.cu, chunk_indices=self.chunk_indices)
            self.w, self.u, self.A = ops.fwd_intra(k=self.k.detach(), v=self.v.detach(), g=self.g2,
                                                   beta=self.beta.detach(), cu_seqlens=self.cu,
                                                   chunk_indices=self.chunk_indices, chunk_size=CHUNK)
            _, _, ht = self._states(self.u, None, save_new_value=False)
            self._S = ht[-1:] if self.cu is not None else ht  # the last document's final state
            if self.reach < T:  # a document starts inside the segment: the incoming state stops there
                self._A = q.new_zeros(B, H, K, K, dtype=torch.float32)
            else:  # the product of the chunk transitions: the state scan over K columns from I, u = 0
                eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(B, H, K, K).contiguous()
                self._A = self._states(torch.zeros_like(self.w), eye, save_new_value=False)[2]
        self.P = self.outputs = self.final = None

    def _states(self, u, h0, save_new_value: bool = True):
        """fla's state scan over this segment's chunks (documents as ``cu_seqlens``): (h, v_new, ht)."""
        return kernels().fwd_h(k=self.k.detach(), w=self.w, u=u, g=self.g2, initial_state=h0,
                               output_final_state=True, chunk_size=CHUNK, save_new_value=save_new_value,
                               cu_seqlens=self.cu, chunk_indices=self.chunk_indices)

    @property
    def summary_state(self) -> torch.Tensor:
        """Ŝ [B, H, K, V] fp32 (no graph): the state leaving the segment for a zero incoming state."""
        return self._S

    @property
    def transition(self) -> torch.Tensor:
        """Â [B, H, K, K] fp32 (no graph); 0 when the segment holds a document start."""
        return self._A

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
        """The outputs and the final state Â P + Ŝ from the incoming state P [B, H, K, V] (a constant)."""
        self.P = P
        self.outputs, self.final = _DeltaFromState.apply(self.q, self.k, self.v, self.g, self.beta, self,
                                                         self.initial_states(P))
        self.u = None  # fla's backward recomputes w, u from A (as its own Function does)

    def take_outputs(self, length: int) -> torch.Tensor:
        o, self.outputs = self.outputs, None
        return o

    def output_grad(self, do: torch.Tensor) -> torch.Tensor:
        return do

    def inter_backward(self, do: torch.Tensor):
        """(G = dL/dP [B, H, K, V] fp32 from the segment's own outputs, None): dh0 of fla's
        state-gradient scan with no final-state gradient, over the tokens P reaches (the first
        document's chunks are the segment's first chunks, so its WY form and gates are a prefix)."""
        B, T, H, K = self.q.shape
        r = self.reach
        G = torch.zeros(B, H, K, do.shape[-1], dtype=torch.float32, device=do.device)
        if r > 0:
            ops = kernels()
            q, k, g2, w = (t[:, :r].contiguous() for t in (self.q.detach(), self.k.detach(), self.g2, self.w))
            do = do[:, :r].to(q.dtype).contiguous()
            dv = ops.bwd_dv_local(q=q, k=k, g=g2, do=do, scale=self.scale, chunk_size=CHUNK)
            _, G, _ = ops.bwd_dhu(q=q, k=k, w=w, do=do, dv=dv, g=g2, h0=G, dht=None, scale=self.scale,
                                  chunk_size=CHUNK)
        self.w = None
        return G, None

    def grad_targets(self, _unused, final_grad: torch.Tensor):
        """The final state Â P + Ŝ (``_DeltaFromState``'s second output) gets D: fla's backward
        then takes it as dht. Ŝ and Â are values and need nothing."""
        return [self.final], [final_grad.to(self.final.dtype)]


class _DeltaFromState(torch.autograd.Function):
    """(o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32) of the gated delta rule from
    fla's initial state(s) h0 (a constant), reusing the segment's WY form; backward is fla's
    ``chunk_gated_delta_rule_bwd``, called as fla's ``ChunkGatedDeltaRuleFunction.backward`` does.
    Returns one gradient per input: dq, dk, dv, dg (natural-log g, fp32), dbeta, None, None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, seg: FlaDeltaSegment, h0):
        h, v_new, ht = seg._states(seg.u, h0)
        o = kernels().fwd_o(q=q, k=k, v=v_new, h=h, g=seg.g2, scale=seg.scale, cu_seqlens=seg.cu,
                            chunk_size=CHUNK, chunk_indices=seg.chunk_indices)
        ctx.save_for_backward(q, k, v, seg.g2, beta, seg.A, h0)
        ctx.seg_info = (seg.scale, seg.cu, seg.chunk_indices, ht.shape[0])
        return o.to(q.dtype), ht[-1:] if seg.cu is not None else ht

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g2, beta, A, h0 = ctx.saved_tensors
        scale, cu, chunk_indices, n_states = ctx.seg_info
        dht = None
        if d_final is not None:  # the earlier documents' final states are not outputs: zero gradient
            dht = d_final.float().contiguous()
            if cu is not None:
                dht = torch.cat([dht.new_zeros(n_states - 1, *dht.shape[1:]), dht])
        do = (torch.zeros_like(v) if do is None else do).to(v.dtype).contiguous()
        dq, dk, dv, db, dg, _, _, _ = kernels().bwd(q=q, k=k, v=v, g=g2, beta=beta, A=A, scale=scale,
                                                    initial_state=h0, do=do, dht=dht, cu_seqlens=cu,
                                                    chunk_indices=chunk_indices, chunk_size=CHUNK)
        return dq.to(q), dk.to(k), dv.to(v), dg.float(), db.to(beta), None, None


segment_work = FlaDeltaSegment
"""The contract's constructor for the ``matrix`` kind (``fla.FlaSegment`` dispatches here)."""
