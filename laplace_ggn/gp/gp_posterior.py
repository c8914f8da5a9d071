r"""The GP posterior on context rows: the Woodbury form, factorised in function space.

With the R = M·K context rows :math:`V^\top` (R × P; rows :math:`L_m^\top J_m` of the
context samples, scaled by :math:`\sqrt{N/M}`), the diagonal prior :math:`\Lambda_0 = D` and
the curvature scale s, every quantity goes through the R × R matrix

.. math::
    C = I + s\,V^\top D^{-1} V = LL^\top
    \qquad(\text{the kernel Gram of the context, } sL^\top\kappa(X, X)L,\ \text{plus } I),

.. math::
    \Sigma = D^{-1} - s\,D^{-1}V C^{-1} V^\top D^{-1}, \qquad
    \log|\Lambda| = \log|D| + \log|C|.

Predictive covariances are the GP formula
:math:`J\Sigma J^\top = \tilde J\tilde J^\top - YY^\top` with :math:`\tilde J = JD^{-1/2}`
and :math:`Y = \sqrt s\,JD^{-1}VL^{-\top}` (the kernel cross-covariances, whitened by L), as
in every GP: a difference of two terms, accurate to about ``eps·κ(x,x)`` (float32 on the
benchmark problem: 0.3 % median relative error of the predictive variance against float64),
with rounding below zero on the diagonal clamped at 0.  A square-root form
:math:`S = I - AGA^\top`, :math:`G = L^{-\top}(I + L^{-1})^{-1}L^{-1}` (PSD by construction)
was tried and dropped: the inverse of the ill-conditioned L made it 100 % wrong in float32.
:meth:`GPPosterior.to_dense` and :meth:`GPPosterior.covariance_sqrt_rows` (the diagnostics)
go through the eigenpairs of :math:`G = VV^\top` instead (thin QR of V, computed on first
use), whose squared norms are PSD and accurate whatever the conditioning.  Samples are drawn pathwise (Matheron's
rule): :math:`\theta = \theta_* + u - sD^{-1}VC^{-1}(V^\top u + \epsilon)` with
:math:`u \sim N(0, D^{-1})`, :math:`\epsilon \sim N(0, I/s)`.  For a scalar prior the prior-
free Gram :math:`V^\top V` (computed once, shared by :meth:`GPPosterior.with_prior`) gives C
for every α and s, and its eigenvalues, the nonzero eigenvalues of :math:`G = VV^\top`, give
the O(P) evidence of the tuning.  Memory: the R rows and R × R factors.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..posteriors import LowRankPosterior, Prior, PriorKind
from ..posteriors._common import check_J, check_V, robust_cholesky, standard_normal
from ..posteriors._output import LowRankOutputCovariance, check_head_features

__all__ = ["GPPosterior"]


class GPPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, (sVV^\top + \Lambda_0)^{-1})` from context rows.

    Args:
        mean: θ*, shape ``(P,)``.
        rows: :math:`V^\top`, shape ``(R, P)``.
        prior: Scalar, layerwise or per-parameter prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.
        gram: :math:`V^\top V`, shape ``(R, R)`` (computed if not given).
    """

    def __init__(
        self,
        mean: Tensor,
        rows: Tensor,
        prior: Prior,
        scale: Tensor | float = 1.0,
        gram: Tensor | None = None,
    ):
        self.mean = mean
        self.rows = rows
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)
        self.gram = rows @ rows.T if gram is None else gram

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        """R, the number of context rows."""
        return self.rows.shape[0]

    # -- factorisations ------------------------------------------------------------------------

    @cached_property
    def _dinv(self) -> Tensor:
        return 1.0 / self.prior.diag()

    @cached_property
    def _chol(self) -> Tensor:
        """L with LLᵀ = C = I + s VᵀD⁻¹V, shape ``(R, R)``."""
        if self.prior.is_scalar:
            K = self.gram / self.prior.precision
        else:
            K = self.rows @ (self.rows * self._dinv).T
        C = self.scale * K
        C.diagonal().add_(1.0)
        return robust_cholesky(0.5 * (C + C.T), "GP capacitance matrix I + sVᵀΛ₀⁻¹V")

    @cached_property
    def _A_t(self) -> Tensor:
        """Aᵀ = √s Vᵀ D^{-1/2}, shape ``(R, P)``."""
        return self.rows * (self.scale * self._dinv).sqrt()

    @cached_property
    def _lowrank(self) -> LowRankPosterior:
        """The same posterior from the eigenpairs of G = VVᵀ (squared-norm forms)."""
        lam, U = self._eigenbasis
        return LowRankPosterior(self.mean, lam, U, self.prior, self.scale)

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        """log|Λ| = log|Λ₀| + log|I + sVᵀΛ₀⁻¹V| of the precision (not of Σ); shape ``()``."""
        return self.prior.log_det() + 2 * torch.log(torch.diagonal(self._chol)).sum()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        DW = W * self._dinv.unsqueeze(1)
        t = torch.cholesky_solve(self.rows @ DW, self._chol)
        out = DW - self.scale * (self.rows.T @ t) * self._dinv.unsqueeze(1)
        return out.squeeze(1) if V.ndim == 1 else out

    def covariance_sqrt_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`XS` with :math:`SS^\top = \Sigma`, ``(M, P) -> (M, P)`` (from the eigenpairs of G).

        Returns:
            Shape ``(M, P)``.
        """
        return self._lowrank.covariance_sqrt_rows(X)

    def variance(self) -> Tensor:
        """Diagonal of Σ, shape ``(P,)`` (rounding below 0 clamped).

        Returns:
            The variances, shape ``(P,)``.
        """
        Y = torch.linalg.solve_triangular(self._chol, self._A_t, upper=False)
        return ((1.0 - (Y**2).sum(0)) * self._dinv).clamp_min(0)

    def to_dense(self) -> Tensor:
        """Σ, shape ``(P, P)`` (O(P²) memory: for tests and small models).

        Returns:
            Σ from the eigenpairs of G (PSD, accurate diagonal), shape ``(P, P)``.
        """
        return self._lowrank.to_dense()

    def functional_covariance(self, J: Tensor) -> Tensor:
        r"""J Σ Jᵀ = J̃J̃ᵀ − YYᵀ for Jacobians ``(B, C, P)`` (the GP formula); returns ``(B, C, C)``.

        Returns:
            J Σ Jᵀ, shape ``(B, C, C)``, symmetric, its diagonal clamped at 0.
        """
        check_J(J, self.n_params)
        B, C, P = J.shape
        Jd = J * self._dinv.sqrt()
        Y = self._whitened_cross(J.reshape(B * C, P)).reshape(B, C, -1)
        out = Jd @ Jd.transpose(1, 2) - Y @ Y.transpose(1, 2)
        out = 0.5 * (out + out.transpose(1, 2))
        out.diagonal(dim1=1, dim2=2).clamp_(min=0)
        return out

    def _whitened_cross(self, X: Tensor) -> Tensor:
        r""":math:`\sqrt s\,XD^{-1}VL^{-\top}` for rows X ``(n, P)``; shape ``(n, R)``."""
        XA = (X * self._dinv.sqrt()) @ self._A_t.T
        return torch.linalg.solve_triangular(self._chol, XA.T, upper=False).T

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> LowRankOutputCovariance:
        r""":math:`J_n\Sigma J_n^\top` for a Linear head, :math:`J_n = I_C\otimes\tilde\phi_n^\top`, without Jacobians.

        :math:`M_n = J_nD^{-1}J_n^\top - Y_nY_n^\top` with :math:`Y_n = \sqrt s\,J_nD^{-1}VL^{-\top}`.

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances (O(N·C·R) memory).

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        index = index.to(self.mean.device)
        dinv = self._dinv[index]  # (C, D)
        JDV = torch.einsum("nd,cd,rcd->ncr", phi, dinv, self.rows[:, index])
        N, C, R = JDV.shape
        Y = torch.linalg.solve_triangular(
            self._chol, self.scale.sqrt() * JDV.reshape(-1, R).T, upper=False
        ).T.reshape(N, C, R)
        return LowRankOutputCovariance(phi.pow(2) @ dinv.T, Y, -phi.new_ones(R))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ ~ N(θ*, Σ) pathwise, shape ``(n, P)``.

        Returns:
            The samples, shape ``(n, P)``.

        Raises:
            ValueError: If ``n`` is not a positive integer.
        """
        kw = {"dtype": self.mean.dtype, "device": self.mean.device, "generator": generator}
        u = standard_normal(n, self.n_params, **kw) * self._dinv.sqrt()
        e = standard_normal(n, self.rank, **kw) / self.scale.sqrt()
        t = torch.cholesky_solve((u @ self.rows.T + e).T, self._chol)  # (R, n)
        return self.mean + u - self.scale * (t.T @ self.rows) * self._dinv

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> GPPosterior:
        """A new posterior with another prior (and curvature scale); reuses the rows and VᵀV."""
        s = self.scale if scale is None else scale
        return GPPosterior(self.mean, self.rows, prior, s, self.gram)

    @cached_property
    def _gram_eigenvalues(self) -> Tensor:
        lam = torch.linalg.eigvalsh(self.gram).flip(0).clamp_min(0)
        return lam[: self.n_params]

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        """For a scalar prior, the eigenvalues of G = VVᵀ (those of VᵀV, then zeros), else ``None``.

        Returns:
            λ with log|Λ| = Σ log(sλ + α), shape ``(P,)``, or ``None``.
        """
        if kind is not PriorKind.SCALAR:
            return None
        lam = self._gram_eigenvalues
        return torch.cat([lam, lam.new_zeros(self.n_params - lam.shape[0])])

    @cached_property
    def _eigenbasis(self) -> tuple[Tensor, Tensor]:
        Q, R = torch.linalg.qr(self.rows.T)
        lam, Y = torch.linalg.eigh(R @ R.T)
        lam, Y = lam.flip(0), Y.flip(1)
        keep = lam > lam[0] * max(self.rows.shape) * torch.finfo(lam.dtype).eps
        return lam[keep], Q @ Y[:, keep]

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """Eigenpairs of G = VVᵀ on its range (thin QR of V, then RRᵀ); computed on first use.

        Returns:
            λ ``(R',)`` and orthonormal U ``(P, R')``; the complement carries the prior only.
        """
        return self._eigenbasis

    def state_dict(self) -> dict[str, Tensor]:
        """The context rows (the prior is stored by the wrapper)."""
        return {"rows": self.rows}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> GPPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["rows"], prior, scale)
