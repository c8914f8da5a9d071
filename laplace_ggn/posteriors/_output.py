r"""Batches of output covariances :math:`M_n = J_n \Sigma J_n^\top` kept in factored form.

A predictive needs only the diagonal of :math:`M_n`, its row sums :math:`M_n 1` (the bridges)
and one product :math:`M_n v_n` per input (probit); only the ``mc`` link needs the dense
``(C, C)`` matrices.  For a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`, the posteriors
give :math:`M_n` in a factored form whose diagonal and products cost O(C²) or less per input
(see ``linear_head_covariance`` on each posterior), so a 1,000-class head never forms a
``(B, C, P)`` Jacobian.  Every form here has the same three methods:

- ``diagonal()``: :math:`\mathrm{diag}(M_n)`, shape ``(N, C)`` (computed once per object);
- ``row_sums()``: :math:`M_n 1`, shape ``(N, C)``;
- ``matvec(V)``: :math:`M_n v_n` for ``V`` of shape ``(N, C)``;
- ``to_dense()``: the matrices, shape ``(N, C, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._checks import shape_str

__all__ = [
    "DenseOutputCovariance",
    "EigenOutputCovariance",
    "KronDenseOutputCovariance",
    "KronHeadFactors",
    "KronHeadOutputCovariance",
    "LowRankOutputCovariance",
    "OutputCovariance",
    "as_output_covariance",
    "check_head_features",
]


@runtime_checkable
class OutputCovariance(Protocol):
    """A batch of N symmetric ``(C, C)`` output covariances."""

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)``."""

    def row_sums(self) -> Tensor:
        """Row sums :math:`M_n 1`, shape ``(N, C)``."""

    def matvec(self, V: Tensor) -> Tensor:
        """Products with one vector per input, ``(N, C) -> (N, C)``."""

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""


@dataclass(frozen=True)
class DenseOutputCovariance:
    """Explicit matrices ``M`` of shape ``(N, C, C)``."""

    M: Tensor

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)``."""
        return torch.diagonal(self.M, dim1=-2, dim2=-1)

    def row_sums(self) -> Tensor:
        """``M_n 1``, shape ``(N, C)``."""
        return self.M.sum(-1)

    def matvec(self, V: Tensor) -> Tensor:
        """``M_n v_n``, shape ``(N, C)``."""
        return (self.M @ V.unsqueeze(-1)).squeeze(-1)

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""
        return self.M


@dataclass(frozen=True)
class EigenOutputCovariance:
    r""":math:`M_n = Q\,\mathrm{diag}(e_n)\,Q^\top` with a shared orthogonal ``Q``.

    Attributes:
        Q: Shape ``(C, O)``, or ``None`` for :math:`Q = I` (diagonal matrices).
        e: Shape ``(N, O)``.
    """

    Q: Tensor | None
    e: Tensor

    @cached_property
    def _diagonal(self) -> Tensor:
        return self.e if self.Q is None else self.e @ (self.Q**2).T

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)`` (computed once)."""
        return self._diagonal

    def row_sums(self) -> Tensor:
        """``M_n 1``, shape ``(N, C)``."""
        return self.e if self.Q is None else (self.e * self.Q.sum(0)) @ self.Q.T

    def matvec(self, V: Tensor) -> Tensor:
        """``M_n v_n``, shape ``(N, C)``."""
        if self.Q is None:
            return self.e * V
        return ((V @ self.Q) * self.e) @ self.Q.T

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""
        if self.Q is None:
            return torch.diag_embed(self.e)
        return (self.Q * self.e.unsqueeze(1)) @ self.Q.T


@dataclass(frozen=True)
class LowRankOutputCovariance:
    r""":math:`M_n = \mathrm{diag}(d_n) + Y_n \mathrm{diag}(w) Y_n^\top`.

    Attributes:
        d: Shape ``(N, C)``.
        Y: Shape ``(N, C, R)``.
        w: Shape ``(R,)`` (may be negative).
    """

    d: Tensor
    Y: Tensor
    w: Tensor

    @cached_property
    def _diagonal(self) -> Tensor:
        return self.d + (self.Y**2 * self.w).sum(-1)

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)`` (computed once)."""
        return self._diagonal

    def row_sums(self) -> Tensor:
        """``M_n 1``, shape ``(N, C)``."""
        return self.d + torch.einsum("ncr,nr->nc", self.Y, self.Y.sum(1) * self.w)

    def matvec(self, V: Tensor) -> Tensor:
        """``M_n v_n``, shape ``(N, C)``."""
        t = torch.einsum("ncr,nc->nr", self.Y, V) * self.w
        return self.d * V + torch.einsum("ncr,nr->nc", self.Y, t)

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""
        return torch.diag_embed(self.d) + (self.Y * self.w) @ self.Y.transpose(1, 2)


@dataclass(frozen=True)
class KronDenseOutputCovariance:
    r""":math:`(M_n)_{ab} = \tilde\phi_n^\top \Sigma_{a\cdot,b\cdot} \tilde\phi_n` for a dense Σ.

    Attributes:
        S: Σ of a Linear head in Kronecker order, shape ``(C, D, C, D)``.
        phi: Features, shape ``(N, D)``.
    """

    S: Tensor
    phi: Tensor

    @cached_property
    def _diagonal(self) -> Tensor:
        blocks = torch.diagonal(self.S, dim1=0, dim2=2).permute(2, 0, 1)  # (C, D, D)
        return torch.einsum("ni,cij,nj->nc", self.phi, blocks, self.phi)

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)`` (from the C diagonal ``(D, D)`` blocks of Σ, once)."""
        return self._diagonal

    def row_sums(self) -> Tensor:
        """``M_n 1``, shape ``(N, C)``."""
        return self.matvec(self.phi.new_ones(self.phi.shape[0], self.S.shape[0]))

    def matvec(self, V: Tensor) -> Tensor:
        """``M_n v_n = (I ⊗ φ̃ᵀ) Σ (v_n ⊗ φ̃)``, shape ``(N, C)``; memory O(N·C·D)."""
        C, D = self.S.shape[:2]
        X = (V.unsqueeze(2) * self.phi.unsqueeze(1)).reshape(-1, C * D)
        Y = (X @ self.S.reshape(C * D, C * D)).reshape(-1, C, D)
        return (Y * self.phi.unsqueeze(1)).sum(-1)

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""
        C, D = self.S.shape[:2]
        T = torch.einsum("nj,xj->nx", self.phi, self.S.reshape(C * D * C, D))  # (N, C·D·C)
        return torch.einsum("ni,naib->nab", self.phi, T.reshape(-1, C, D, C))


@dataclass(frozen=True)
class KronHeadFactors:
    r"""What the diagonals and row sums of a Kronecker head's covariances need, once per posterior.

    For :math:`\Sigma = (Q_B \otimes Q_A)\,\mathrm{diag}(d)^{-1}(Q_B \otimes Q_A)^\top` and
    :math:`J_n = I_C \otimes \tilde\phi_n^\top`, with :math:`\psi_n = Q_A^\top\tilde\phi_n`,
    :math:`M_n = Q_B\,\mathrm{diag}(e_n)\,Q_B^\top`, :math:`e_n = (\psi_n^2)^\top E`, :math:`E = (1/d)^\top`, so

    .. math::
        \mathrm{diag}(M_n) = (\psi_n^2)^\top K, \quad K = E\,(Q_B^{\circ 2})^\top, \qquad
        M_n 1 = (\psi_n^2)^\top K_1, \quad K_1 = (E \odot (Q_B^\top 1)^\top)\,Q_B^\top:

    O(D·C) per input instead of O(C²).

    Attributes:
        Q: :math:`Q_B`, shape ``(C, O)``.
        E: :math:`(1/d)^\top`, shape ``(D, O)``.
        K: Shape ``(D, C)``.
        K1: Shape ``(D, C)``.
    """

    Q: Tensor
    E: Tensor
    K: Tensor
    K1: Tensor

    @classmethod
    def of(cls, Q: Tensor, d: Tensor) -> KronHeadFactors:
        """From :math:`Q_B` ``(C, O)`` and the eigenvalues ``d`` ``(O, D)`` of the precision."""
        E = (1.0 / d).T
        return cls(Q, E, E @ (Q**2).T, (E * Q.sum(0)) @ Q.T)


@dataclass(frozen=True)
class KronHeadOutputCovariance:
    r""":math:`M_n = Q_B\,\mathrm{diag}((\psi_n^2)^\top E)\,Q_B^\top` (see :class:`KronHeadFactors`).

    Attributes:
        factors: The posterior's :class:`KronHeadFactors`.
        w: :math:`\psi_n^2`, shape ``(N, D)``.
    """

    factors: KronHeadFactors
    w: Tensor

    @cached_property
    def _diagonal(self) -> Tensor:
        return self.w @ self.factors.K

    @cached_property
    def e(self) -> Tensor:
        """Eigenvalues :math:`e_n`, shape ``(N, O)`` (computed once, for products)."""
        return self.w @ self.factors.E

    def diagonal(self) -> Tensor:
        """Diagonals, shape ``(N, C)``: one ``(N, D) × (D, C)`` product (computed once)."""
        return self._diagonal

    def row_sums(self) -> Tensor:
        """``M_n 1``, shape ``(N, C)``: one ``(N, D) × (D, C)`` product."""
        return self.w @ self.factors.K1

    def matvec(self, V: Tensor) -> Tensor:
        """``M_n v_n``, shape ``(N, C)``: two ``(N, C) × (C, C)`` products."""
        Q = self.factors.Q
        return ((V @ Q) * self.e) @ Q.T

    def to_dense(self) -> Tensor:
        """The matrices, shape ``(N, C, C)``."""
        Q = self.factors.Q
        return (Q * self.e.unsqueeze(1)) @ Q.T


def as_output_covariance(cov: Tensor | OutputCovariance) -> OutputCovariance:
    """Wrap matrices ``(N, C, C)`` or diagonals ``(N, C)``; factored forms pass through.

    Returns:
        The :class:`OutputCovariance` of the matrices.

    Raises:
        ValueError: If a tensor is neither 2-D nor 3-D.
    """
    if not isinstance(cov, Tensor):
        return cov
    if cov.ndim == 3:
        return DenseOutputCovariance(cov)
    if cov.ndim == 2:
        return EigenOutputCovariance(None, cov)
    raise ValueError(
        f"cov must have shape (B, C, C) or (B, C) (diagonals); got {shape_str(cov.shape)}."
    )


def check_head_features(phi: Tensor, index: Tensor, P: int) -> None:
    """Check features ``(N, D)`` and a Kronecker index ``(C, D)`` covering all P parameters.

    Raises:
        ValueError: If the shapes do not fit or the index is not a permutation of ``range(P)``.
    """
    if index.ndim != 2 or index.numel() != P:
        raise ValueError(
            f"index must have shape (C, D) with C·D = P = {P} (the posterior must be of one "
            f"Linear layer's parameters); got {shape_str(index.shape)}."
        )
    if phi.ndim != 2 or phi.shape[1] != index.shape[1]:
        raise ValueError(
            f"phi must have shape (N, {index.shape[1]}) (features with the bias column); got "
            f"{shape_str(phi.shape)}."
        )
