"""What a transition is: the recurrence's kinds and the algebra of their segment summaries.

Every variant of DESIGN §1 is S_s = A_s S_{s-1} + k_s^T vbar_s; what differs is A_s, and with it
how a segment's transition Â = A_{b-1} ... A_a is stored and how it acts on a state. The
arguments (g, beta) name the kind once (``classify``); everything below the public functions
(the ops, both backends, the local work and every strategy) dispatches on the kind, never on
argument shapes again.

| kind        | g            | beta | A_s                               | Â stored as            |
|-------------|--------------|------|-----------------------------------|------------------------|
| identity    | None         | no   | I                                 | [B, H, 1]  (1, or 0)   |
| scalar      | [B, T, H]    | no   | exp(g_s) I                        | [B, H, 1]              |
| diagonal    | [B, T, H, K] | no   | diag(exp(g_s))                    | [B, H, K]              |
| matrix      | None | [B,T,H] | yes | exp(g_s) (I - beta_s k_s^T k_s) | [B, H, K, K]           |
| channel_matrix (KDA, Kimi Linear): (I - beta_s k_s^T k_s) diag(exp(g_s)), g [B, T, H, K],   |
|             | [B, T, H, K] | yes  | (gate first, then the delta step)  | [B, H, K, K]           |

Â is 0 for a segment that holds a document start (DESIGN §1, documents). States X are
[B, H, K, V] (or [..., K, V]); everything here is exact algebra in the states' dtype (fp32, fp64
for fp64 inputs).

The algebra each representation provides (``DecayAlgebra`` for decay vectors, ``MatrixAlgebra``
for K x K matrices):

    apply(Â, X, transpose)     Â X (or Â^T X)                         the fold, the chains
    compose(Â2, Â1)            Â2 Â1; with ``compose_summaries`` the pair (Â2 Â1, Â2 X1 + X2)
    transpose(Â)               Â^T (decay vectors: themselves)        the backward scans
    grad(D, P)                 dL/dÂ for Y = Â P given D = dL/dY: D P^T in Â's own form
                               (its diagonal for per-channel decays, its trace for scalar ones)
    entry_states(S, Λ, P)      S_n + Λ_n P over stacked Λ [B, H, M, ...]
    adjoint_sum(Λ, dS)         sum_n Λ_n^T dS_n                        G = dL/dP of a segment
    stacked_grad(Λ, dX, P)     dL/dΛ_n for X_n = Λ_n P                  the gates' share
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class DecayAlgebra:
    """Â a decay vector [..., Kg] acting as diag(Â) on the rows of a state [..., K, V]:
    Kg = 1 (identity and scalar gates, broadcast over K) or Kg = K (per-channel gates)."""

    def __init__(self, per_channel: bool):
        self.per_channel = per_channel

    def shape(self, B: int, H: int, K: int) -> Tuple[int, ...]:
        return (B, H, K if self.per_channel else 1)

    @staticmethod
    def apply(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return A.unsqueeze(-1) * X  # diagonal: its own transpose

    @staticmethod
    def compose(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        return later * earlier

    @staticmethod
    def transpose(A: torch.Tensor) -> torch.Tensor:
        return A

    @staticmethod
    def entry_states(S: torch.Tensor, Lam: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """S [B, H, M, K, V] + Λ [B, H, M, Kg] P [B, H, K, V]."""
        return torch.addcmul(S, Lam.unsqueeze(-1), P.unsqueeze(2))

    def adjoint_sum(self, Lam: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
        """sum_n Λ_n dS_n, Λ [B, H, M, Kg], dS [B, H, M, K, V] -> [B, H, K, V]."""
        if not self.per_channel:  # a batched matmul over n, no [M, K, V] temporary
            return torch.einsum("bhn,bhnkv->bhkv", Lam.squeeze(-1), dS)
        return (Lam.unsqueeze(-1) * dS).sum(2)

    def stacked_grad(self, Lam: torch.Tensor, dX: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """dL/dΛ [B, H, M, Kg] for X_n = Λ_n P: the diagonal of dX_n P^T (its trace when Kg = 1)."""
        if not self.per_channel:
            return torch.einsum("bhnkv,bhkv->bhn", dX, P).unsqueeze(-1)
        return torch.einsum("bhnkv,bhkv->bhnk", dX, P)

    def grad(self, D: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """dL/dÂ [B, H, Kg] for Y = Â P, D = dL/dY [B, H, K, V]."""
        return self.stacked_grad(None, D.unsqueeze(2), P).squeeze(2)


class MatrixAlgebra:
    """Â a K x K matrix [..., K, K] acting on states [..., K, V] from the left (the delta rule:
    a product of Householder-like factors mixes the rows, so no vector form exists)."""

    per_channel = True

    @staticmethod
    def shape(B: int, H: int, K: int) -> Tuple[int, ...]:
        return (B, H, K, K)

    @staticmethod
    def apply(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return (A.transpose(-1, -2) if transpose else A) @ X

    @staticmethod
    def compose(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        return later @ earlier

    @staticmethod
    def transpose(A: torch.Tensor) -> torch.Tensor:
        return A.transpose(-1, -2)

    @staticmethod
    def entry_states(S: torch.Tensor, Lam: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """S [B, H, M, K, V] + Λ [B, H, M, K, K] P [B, H, K, V], as one stacked matmul."""
        return S + _stacked(Lam, P).reshape(S.shape)

    @staticmethod
    def adjoint_sum(Lam: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
        """sum_n Λ_n^T dS_n: one matmul over the stacked rows, [B, H, K, V]."""
        B, H, M, K, V = dS.shape
        return Lam.reshape(B, H, M * K, K).transpose(-1, -2) @ dS.reshape(B, H, M * K, V)

    @staticmethod
    def stacked_grad(Lam: Optional[torch.Tensor], dX: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """dL/dΛ_n = dX_n P^T, [B, H, M, K, K]."""
        return _stacked(dX, P.transpose(-1, -2)).reshape(*dX.shape[:-1], P.shape[-2])

    @staticmethod
    def grad(D: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """dL/dÂ = D P^T [B, H, K, K] for Y = Â P."""
        return D @ P.transpose(-1, -2)


def _stacked(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """[B, H, M, R, C] @ [B, H, C, D] as one [B, H, M * R, C] @ [B, H, C, D] matmul, [B, H, M * R, D]
    (broadcasting Y over M instead would copy it M times)."""
    B, H, M, R, C = X.shape
    return X.reshape(B, H, M * R, C) @ Y


SCALAR_DECAYS = DecayAlgebra(per_channel=False)
CHANNEL_DECAYS = DecayAlgebra(per_channel=True)
MATRICES = MatrixAlgebra()


@dataclass(frozen=True, eq=False)
class Kind:
    """One kind of transition (module docstring table).

    name: its name. gate: the gate it takes when one is given: None (none), "scalar" g [B, T, H]
    or "channel" g [B, T, H, K]. delta: the delta rule (beta [B, T, H] required). algebra: how
    its Â is stored and acts (``DecayAlgebra`` / ``MatrixAlgebra``). unsupported: None, or why a
    declared kind is refused (``classify`` raises it as the ValueError).
    """

    name: str
    gate: Optional[str]
    delta: bool
    algebra: object
    unsupported: Optional[str] = None

    @property
    def matrix(self) -> bool:
        """Â is a K x K matrix (the delta-rule kinds)."""
        return isinstance(self.algebra, MatrixAlgebra)

    def gate_channels(self, g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """g as [B, T, H, Kg] (Kg = 1 for a scalar gate, K per channel), or None."""
        if g is None or self.gate == "channel":
            return g
        return g.unsqueeze(-1)

    # the algebra, under the kind's name (the strategies call these)
    def apply(self, A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return self.algebra.apply(A, X, transpose)

    def compose(self, later, earlier):
        """(Â2, X2) after (Â1, X1) = (Â2 Â1, Â2 X1 + X2) (DESIGN §1); associative, not
        commutative. X may be a state or any term Â acts on (the backward scans compose
        (Â^T, G) the same way)."""
        (A2, X2), (A1, X1) = later, earlier
        return self.algebra.compose(A2, A1), self.algebra.apply(A2, X1) + X2

    def transpose(self, A: torch.Tensor) -> torch.Tensor:
        return self.algebra.transpose(A)

    def grad(self, D: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        return self.algebra.grad(D, P)

    def __repr__(self) -> str:
        return f"Kind({self.name})"


IDENTITY = Kind("identity", None, False, SCALAR_DECAYS)
SCALAR = Kind("scalar", "scalar", False, SCALAR_DECAYS)
DIAGONAL = Kind("diagonal", "channel", False, CHANNEL_DECAYS)
MATRIX = Kind("matrix", "scalar", True, MATRICES)
CHANNEL_MATRIX = Kind("channel_matrix", "channel", True, MATRICES)  # KDA
KINDS = (IDENTITY, SCALAR, DIAGONAL, MATRIX, CHANNEL_MATRIX)

# (the gate given, beta given) -> kind; the delta rule's gate is optional.
_BY_ARGUMENTS = {(None, False): IDENTITY, ("scalar", False): SCALAR, ("channel", False): DIAGONAL,
                 (None, True): MATRIX, ("scalar", True): MATRIX, ("channel", True): CHANNEL_MATRIX}


def gate_of(g: Optional[torch.Tensor]) -> Optional[str]:
    """The gate a g names: None, "scalar" ([B, T, H]) or "channel" ([B, T, H, K]); shapes and
    values are checked by ``lasp2.validation.check_gate``."""
    if g is None:
        return None
    return "scalar" if g.dim() == 3 else "channel"


def kind_of(gate: Optional[str], delta: bool) -> Kind:
    """The kind of a recurrence with ``gate`` (None, "scalar" or "channel") and the delta rule or
    not. The one place a declared but unsupported kind is refused: raises its ValueError."""
    kind = _BY_ARGUMENTS[gate, bool(delta)]
    if kind.unsupported is not None:
        raise ValueError(kind.unsupported)
    return kind


def classify(g: Optional[torch.Tensor], beta: Optional[torch.Tensor]) -> Kind:
    """The kind the arguments name (module docstring table); ValueError for a declared but
    unsupported kind (``kind_of``)."""
    return kind_of(gate_of(g), beta is not None)
