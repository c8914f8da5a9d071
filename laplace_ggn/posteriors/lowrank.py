r"""Low-rank (Woodbury) posterior :math:`\Lambda = s\,U \mathrm{diag}(\lambda) U^\top + \Lambda_0`.

Two collectors produce the eigenpairs :math:`(\lambda, U)`, ``(R,)`` and ``(P, R)``, of the
unit-noise GGN; both see the data once.

- ``rank=None`` (:class:`~laplace_ggn.collectors.ExactLowRankCollector`): exact.  It stores
  every row of
  :math:`V^\top = (J_n^\top L_n)^\top` (N·C rows of length P, so O(P·N·C) memory, refused
  beyond the memory budget with the figure) and takes the thin SVD
  :math:`V = U S W^\top`, so that :math:`G = V V^\top = U \mathrm{diag}(S^2) U^\top` is
  the eigendecomposition of G restricted to its range (singular values below
  ``max(S)·max(P, NC)·eps`` are dropped).  This is the Woodbury form
  :math:`\Sigma = \alpha^{-1}(I - V(\alpha I/s + V^\top V)^{-1} V^\top)` written in the
  eigenbasis.
- ``rank=k`` (:class:`~laplace_ggn.collectors.NystromCollector`): the top-k eigenpairs by a
  randomized Nyström approximation from a one-pass sketch :math:`Y = G\Omega` (k + p
  columns, p = 10 by default; O(P·(k+p)) memory); the method, its error and why it was
  chosen over Lanczos are described in :mod:`laplace_ggn.collectors.nystrom`.

The log determinant of the precision uses, for a scalar prior α,
:math:`\log|\Lambda| = (P - R)\log\alpha + \sum\log(s\lambda + \alpha)`, and for a
layerwise or per-parameter prior :math:`D` the determinant lemma with
:math:`W = U\mathrm{diag}(\sqrt{s\lambda})` and the capacitance :math:`K = I + W^\top D^{-1} W`:
:math:`\log|\Lambda| = \log|D| + \log|K|`.  Covariance products, ``functional_covariance``,
``to_dense`` and ``sample`` use the eigenpairs of the *whitened* curvature: with
:math:`d = \mathrm{diag}(D)^{-1/2}` and the thin QR + SVD
:math:`\mathrm{diag}(d)\,W = Q\,\mathrm{diag}(\sigma)Z^\top` (for a scalar prior simply
:math:`Q = U`, :math:`\sigma^2 = s\lambda/\alpha`),

.. math::
    \Sigma = \mathrm{diag}(d)\big[(I - QQ^\top) + Q\,\mathrm{diag}(e)\,Q^\top\big]
    \mathrm{diag}(d), \qquad e = 1/(1 + \sigma^2) \in (0, 1],

which is :math:`\alpha^{-1}(I - UU^\top) + U\mathrm{diag}(1/(s\lambda + \alpha))U^\top` for a
scalar prior and the Woodbury form :math:`D^{-1} - D^{-1}WK^{-1}W^\top D^{-1}` otherwise.
Quadratic forms are evaluated as squared norms, e.g.
:math:`J\Sigma J^\top = RR^\top + (\tilde J Q e^{1/2})(\tilde J Q e^{1/2})^\top` with
:math:`\tilde J = J\,\mathrm{diag}(d)` and the residual :math:`R = \tilde J - (\tilde J Q)Q^\top`,
never as a difference such as :math:`\alpha^{-1}(JJ^\top - JUU^\top J^\top)`.  That
difference cancels catastrophically when the prior precision is small (in float32 with
α = 1e-6 it gave negative predictive variances on training inputs); the squared forms are
positive semi-definite by construction, whatever the prior.  Samples are
:math:`\theta = \theta_* + \mathrm{diag}(d)[(z - QQ^\top z) + Q\,\mathrm{diag}(e^{1/2})
Q^\top z]`.  All operations cost O(P·R) memory (``to_dense`` O(P²)); ``with_prior`` reuses
the eigenpairs.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ._common import Prior, PriorKind, check_J, check_V, robust_cholesky, standard_normal
from ._output import LowRankOutputCovariance, check_head_features

__all__ = ["LowRankPosterior"]


class LowRankPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, (sU\mathrm{diag}(\lambda)U^\top + \Lambda_0)^{-1})`.

    Args:
        mean: θ*, shape ``(P,)``.
        eigenvalues: λ of the unit-noise GGN, shape ``(R,)``, >= 0.
        eigenvectors: U, shape ``(P, R)``, orthonormal columns.
        prior: Scalar, layerwise or per-parameter prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.
    """

    def __init__(
        self,
        mean: Tensor,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        prior: Prior,
        scale: Tensor | float = 1.0,
    ):
        self.mean = mean
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        """R, the number of eigenpairs."""
        return self.eigenvalues.shape[0]

    # -- factorisations ------------------------------------------------------------------------

    @cached_property
    def _eig_precision(self) -> Tensor:
        """sλ + α (scalar prior), shape ``(R,)``."""
        return self.scale * self.eigenvalues + self.prior.precision

    @cached_property
    def _W(self) -> Tensor:
        """U diag(√(sλ)), shape ``(P, R)``."""
        return self.eigenvectors * (self.scale * self.eigenvalues).sqrt()

    @cached_property
    def _dinv(self) -> Tensor:
        return 1.0 / self.prior.diag()

    @cached_property
    def _cap_chol(self) -> Tensor:
        """Cholesky factor of K = I + Wᵀ D⁻¹ W, shape ``(R, R)``."""
        W = self._W
        K = torch.eye(self.rank, dtype=W.dtype, device=W.device) + W.T @ (
            W * self._dinv.unsqueeze(1)
        )
        return robust_cholesky(K, "low-rank capacitance matrix I + WᵀΛ₀⁻¹W")

    @cached_property
    def _whitened(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(r, Q, e)`` with :math:`\Sigma = \mathrm{diag}(d)[(I - QQ^\top) + Q\mathrm{diag}(e)Q^\top]\mathrm{diag}(d)`.

        r is :math:`\Lambda_0^{1/2} = 1/d`, shape ``()`` for a scalar prior and ``(P,)``
        otherwise (divided by, never inverted: d² = 1/α overflows before 1/α does); Q
        ``(P, R)`` has orthonormal columns; e ``(R,)`` lies in (0, 1].
        """
        U, lam = self.eigenvectors, self.eigenvalues
        if self.prior.is_scalar:
            a = self.prior.precision
            return a.sqrt(), U, a / self._eig_precision
        r = self.prior.diag().sqrt()
        if self.rank == 0:
            return r, U, lam
        Wt = (U / r.unsqueeze(1)) * (self.scale * lam).sqrt()  # whitened W, (P, R)
        Q1, Rm = torch.linalg.qr(Wt)
        Z, sig, _ = torch.linalg.svd(Rm)
        return r, Q1 @ Z, 1.0 / (1.0 + sig**2)

    def _sigma_rows(self, X: Tensor) -> Tensor:
        """Σ applied to the rows of ``X`` ``(M, P)`` (Σ is symmetric); shape ``(M, P)``."""
        r, Q, e = self._whitened
        Xd = X / r
        XQ = Xd @ Q
        return ((Xd - XQ @ Q.T) + (XQ * e) @ Q.T) / r

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""log|Λ| of the precision Λ = sUdiag(λ)Uᵀ + Λ₀ (not of Σ), by the determinant lemma; ``()``."""
        if self.prior.is_scalar:
            P, R = self.n_params, self.rank
            return (P - R) * torch.log(self.prior.precision) + torch.log(self._eig_precision).sum()
        return self.prior.log_det() + 2 * torch.log(torch.diagonal(self._cap_chol)).sum()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._sigma_rows(W.T).T
        return out.squeeze(1) if V.ndim == 1 else out

    def covariance_sqrt_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`XS` for the symmetric square root S of Σ (:math:`SS^\top = \Sigma`).

        :math:`S = \mathrm{diag}(d)[(I - QQ^\top) + Q\mathrm{diag}(e^{1/2})Q^\top]`, so quadratic
        forms :math:`x\Sigma x^\top = \|xS\|^2` computed from it are >= 0 by construction.

        Args:
            X: Rows, shape ``(M, P)``.

        Returns:
            Shape ``(M, P)``.
        """
        r, Q, e = self._whitened
        Xd = X / r
        XQ = Xd @ Q
        return (Xd - XQ @ Q.T) + (XQ * e.sqrt()) @ Q.T

    def variance(self) -> Tensor:
        r"""Diagonal of Σ, shape ``(P,)``, >= 0, in O(P·R).

        :math:`\Sigma_{pp} = d_p^2\big[(1 - \|Q_{p\cdot}\|^2) + \sum_r e_r Q_{pr}^2\big]`, with
        the projector's diagonal :math:`1 - \|Q_{p\cdot}\|^2` (in [0, 1] in exact arithmetic)
        clamped at 0 against rounding; its absolute error is about :math:`\epsilon d_p^2`.
        :meth:`to_dense` has the more accurate diagonal (squared row norms, O(P²·R)).

        Returns:
            The variances, shape ``(P,)``.
        """
        r, Q, e = self._whitened
        Q2 = Q**2
        return ((1.0 - Q2.sum(1)).clamp_min(0) + Q2 @ e) / r / r

    def to_dense(self) -> Tensor:
        r"""Σ = Λ⁻¹, shape ``(P, P)`` (O(P²) memory: for tests and small models).

        The diagonal of the projector :math:`I - QQ^\top` is taken as its squared row norms
        (equal in exact arithmetic, as the projector is idempotent), so that every variance
        :math:`\Sigma_{pp}` is >= 0 and accurate even when :math:`1/\alpha` is huge.

        Returns:
            Σ, shape ``(P, P)``.
        """
        r, Q, e = self._whitened
        Ker = -(Q @ Q.T)
        Ker.diagonal().add_(1.0)
        Ker = 0.5 * (Ker + Ker.T)
        Ker.diagonal().copy_(torch.linalg.vector_norm(Ker, dim=1) ** 2)
        S = Ker + (Q * e) @ Q.T
        S = 0.5 * (S + S.T)
        if r.ndim == 0:
            return S / r / r
        return S / r.unsqueeze(1) / r.unsqueeze(0)

    def functional_covariance(self, J: Tensor) -> Tensor:
        r"""J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``.

        Computed as :math:`RR^\top + (\tilde JQe^{1/2})(\cdot)^\top` with the residual
        :math:`R = \tilde J - \tilde JQQ^\top` (see the module docstring): positive
        semi-definite by construction, with no cancellation for small prior precisions.

        Returns:
            J Σ Jᵀ, shape ``(B, C, C)``.
        """
        check_J(J, self.n_params)
        r, Q, e = self._whitened
        Jd = J / r
        JQ = Jd @ Q
        Res = Jd - JQ @ Q.T
        JQe = JQ * e.sqrt()
        return Res @ Res.transpose(1, 2) + JQe @ JQe.transpose(1, 2)

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> LowRankOutputCovariance:
        r"""J Σ Jᵀ for a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`, without Jacobians.

        :math:`J_n U` is the contraction of φ̃ with U reshaped to ``(C, D, R)``; with a scalar
        prior :math:`M_n = \alpha^{-1}\|\tilde\phi_n\|^2 I + (J_nU)\,\mathrm{diag}(
        1/(s\lambda+\alpha) - 1/\alpha)\,(J_nU)^\top`, otherwise
        :math:`M_n = J_n D^{-1} J_n^\top - Y_n Y_n^\top` with
        :math:`Y_n = J_n D^{-1} W L_K^{-\top}`.  Cost O(N·C·D·R), memory O(N·C·R).

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances.

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        index = index.to(self.mean.device)
        C, D = index.shape
        if self.prior.is_scalar:
            a = self.prior.precision
            JU = torch.einsum("nd,cdr->ncr", phi, self.eigenvectors[index])
            d = (phi.pow(2).sum(-1, keepdim=True) / a).expand(-1, C)
            return LowRankOutputCovariance(d, JU, 1.0 / self._eig_precision - 1.0 / a)
        dinv = self._dinv[index]  # (C, D)
        JDW = torch.einsum("nd,cdr->ncr", phi, dinv.unsqueeze(-1) * self._W[index])
        Y = torch.linalg.solve_triangular(
            self._cap_chol, JDW.reshape(-1, self.rank).T, upper=False
        ).T.reshape(JDW.shape)
        w = -torch.ones(self.rank, dtype=phi.dtype, device=phi.device)
        return LowRankOutputCovariance(phi.pow(2) @ dinv.T, Y, w)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``.

        Returns:
            The samples, shape ``(n, P)``.

        Raises:
            ValueError: If ``n`` is not a positive integer.
        """
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        r, Q, e = self._whitened
        zQ = z @ Q
        return self.mean + ((z - zQ @ Q.T) + (zQ * e.sqrt()) @ Q.T) / r

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> LowRankPosterior:
        """A new posterior with another prior (and curvature scale); reuses the eigenpairs."""
        return LowRankPosterior(
            self.mean,
            self.eigenvalues,
            self.eigenvectors,
            prior,
            self.scale if scale is None else scale,
        )

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        """For a scalar prior, the R eigenvalues of G followed by P - R zeros, else ``None``.

        Args:
            kind: The prior structure; only a scalar prior shares the eigenbasis of G.

        Returns:
            λ with log|Λ| = Σ log(sλ + α), shape ``(P,)``, or ``None``.
        """
        if kind is not PriorKind.SCALAR:
            return None
        lam = self.eigenvalues
        return torch.cat([lam, lam.new_zeros(self.n_params - lam.shape[0])])

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """The held eigenpairs of G: λ ``(R,)`` and orthonormal U ``(P, R)``.

        Returns:
            ``(λ, U)``; the complement of the columns of U carries the prior only.
        """
        return self.eigenvalues, self.eigenvectors

    def state_dict(self) -> dict[str, Tensor]:
        """The eigenpairs (the prior is stored by the wrapper)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> LowRankPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["eigenvalues"], state["eigenvectors"], prior, scale)
