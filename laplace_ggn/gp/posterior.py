r"""ELLA's posterior: a Gaussian on the span of K Nyström features, nothing outside it.

With U (P × K, orthonormal) the features rotated to the eigenbasis of the projected GGN,
:math:`U^\top G U = \mathrm{diag}(\lambda)`, the linearised network is restricted to
:math:`\theta = \theta_* + Uw` and the prior of θ to that subspace, :math:`w \sim
N(0, (U^\top\Lambda_0U)^{-1})`.  The posterior of w has the K × K precision

.. math::
    A = s\,\mathrm{diag}(\lambda) + U^\top\Lambda_0 U, \qquad
    \Sigma = U A^{-1} U^\top, \qquad
    J(x)\Sigma J(x)^\top = \phi(x) A^{-1}\phi(x)^\top,\ \phi(x) = J(x)U,

ELLA's predictive (Deng et al., 2022; for a scalar prior :math:`A = s\,\mathrm{diag}(\lambda)
+ \alpha I`).  Σ has rank K: no variance outside the features.  The evidence is the
K-dimensional Laplace evidence, :math:`-\ell - \tfrac12\theta_*^\top\Lambda_0\theta_*
- \tfrac12\log|A| + \tfrac12\log|U^\top\Lambda_0U|`; :meth:`EllaPosterior.log_det` returns
:math:`\log|\Lambda| = \log|A| - \log|U^\top\Lambda_0U| + \log|\Lambda_0|`, the log
determinant of the precision :math:`\Lambda = s\hat G + \Lambda_0` of the projected curvature
for a scalar prior (and the precision whose restriction to the features is A otherwise), so
that the evidence of :mod:`laplace_ggn.marglik` is that one.  Every quadratic form is a
squared norm through the Cholesky factor of A (PSD by construction).  O(K·P) memory.  It
offers no ``eigenbasis()``: outside the features it holds no variance, not the prior's.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..posteriors import Prior, PriorKind
from ..posteriors._common import check_J, check_V, robust_cholesky, standard_normal
from ..posteriors._output import LowRankOutputCovariance, check_head_features

__all__ = ["EllaPosterior"]


class EllaPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, UA^{-1}U^\top)` on the span of K features.

    Args:
        mean: θ*, shape ``(P,)``.
        eigenvalues: λ of the projected unit-noise GGN, shape ``(K,)``, >= 0.
        eigenvectors: U, shape ``(P, K)``, orthonormal columns.
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
        """K, the number of features."""
        return self.eigenvalues.shape[0]

    @cached_property
    def _prior_gram(self) -> Tensor:
        r""":math:`U^\top\Lambda_0U`, shape ``(K, K)``."""
        U = self.eigenvectors
        if self.prior.is_scalar:
            return self.prior.precision * torch.eye(self.rank, dtype=U.dtype, device=U.device)
        return U.T @ (U * self.prior.diag().unsqueeze(1))

    @cached_property
    def _chol(self) -> Tensor:
        """Cholesky factor of A = s diag(λ) + UᵀΛ₀U, shape ``(K, K)``."""
        A = self._prior_gram + torch.diag(self.scale * self.eigenvalues)
        return robust_cholesky(0.5 * (A + A.T), "ELLA feature-space precision A")

    def _factor(self, X: Tensor) -> Tensor:
        r""":math:`(XU)L^{-\top}` for rows X ``(..., P)``: its squared norms are :math:`X\Sigma X^\top`."""
        XU = X @ self.eigenvectors
        shape = XU.shape
        Y = torch.linalg.solve_triangular(self._chol, XU.reshape(-1, self.rank).T, upper=False)
        return Y.T.reshape(shape)

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""log|Λ| = log|A| − log|UᵀΛ₀U| + log|Λ₀| of the precision (not of Σ); shape ``()``."""
        log_a = 2 * torch.log(torch.diagonal(self._chol)).sum()
        if self.prior.is_scalar:
            P, K = self.n_params, self.rank
            return log_a + (P - K) * torch.log(self.prior.precision)
        L0 = robust_cholesky(self._prior_gram, "projected prior precision UᵀΛ₀U")
        return log_a - 2 * torch.log(torch.diagonal(L0)).sum() + self.prior.log_det()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        UtV = self.eigenvectors.T @ W
        out = self.eigenvectors @ torch.cholesky_solve(UtV, self._chol)
        return out.squeeze(1) if V.ndim == 1 else out

    def covariance_sqrt_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`XS` with :math:`S = UL^{-\top}U^\top`, :math:`SS^\top = \Sigma`; ``(M, P) -> (M, P)``."""
        return self._factor(X) @ self.eigenvectors.T

    def variance(self) -> Tensor:
        """Diagonal of Σ, shape ``(P,)``.

        Returns:
            The variances, shape ``(P,)``.
        """
        F = torch.linalg.solve_triangular(self._chol, self.eigenvectors.T, upper=False)
        return (F**2).sum(0)

    def to_dense(self) -> Tensor:
        """Σ = U A⁻¹ Uᵀ, shape ``(P, P)`` (rank K; O(P²) memory, for tests and small models).

        Returns:
            Σ, shape ``(P, P)``.
        """
        F = torch.linalg.solve_triangular(self._chol, self.eigenvectors.T, upper=False)
        return F.T @ F

    def functional_covariance(self, J: Tensor) -> Tensor:
        r"""φ A⁻¹ φᵀ with φ = J U for Jacobians ``(B, C, P)``; returns ``(B, C, C)``.

        Returns:
            J Σ Jᵀ, shape ``(B, C, C)``, a Gram of rows (PSD by construction).
        """
        check_J(J, self.n_params)
        Y = self._factor(J)
        return Y @ Y.transpose(1, 2)

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> LowRankOutputCovariance:
        r""":math:`J_n\Sigma J_n^\top` for a Linear head, :math:`J_n = I_C\otimes\tilde\phi_n^\top`, without Jacobians.

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances (O(N·C·K) memory).

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        index = index.to(self.mean.device)
        JU = torch.einsum("nd,cdk->nck", phi, self.eigenvectors[index])
        N, C, K = JU.shape
        Y = torch.linalg.solve_triangular(self._chol, JU.reshape(-1, K).T, upper=False)
        Y = Y.T.reshape(N, C, K)
        return LowRankOutputCovariance(phi.new_zeros(N, C), Y, phi.new_ones(K))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ = θ* + U L⁻ᵀ z, shape ``(n, P)``.

        Returns:
            The samples, shape ``(n, P)``.

        Raises:
            ValueError: If ``n`` is not a positive integer.
        """
        z = standard_normal(
            n, self.rank, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        w = torch.linalg.solve_triangular(self._chol.T, z.T, upper=True).T
        return self.mean + w @ self.eigenvectors.T

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> EllaPosterior:
        """A new posterior with another prior (and curvature scale); reuses the features."""
        return EllaPosterior(
            self.mean,
            self.eigenvalues,
            self.eigenvectors,
            prior,
            self.scale if scale is None else scale,
        )

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        """For a scalar prior, the K eigenvalues of the projected G and P − K zeros, else ``None``.

        Returns:
            λ with log|Λ| = Σ log(sλ + α), shape ``(P,)``, or ``None``.
        """
        if kind is not PriorKind.SCALAR:
            return None
        lam = self.eigenvalues
        return torch.cat([lam, lam.new_zeros(self.n_params - lam.shape[0])])

    def state_dict(self) -> dict[str, Tensor]:
        """The eigenpairs of the projected GGN (the prior is stored by the wrapper)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> EllaPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["eigenvalues"], state["eigenvectors"], prior, scale)
