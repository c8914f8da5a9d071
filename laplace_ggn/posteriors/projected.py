r"""Projected (null-space) posterior: the prior restricted to the kernel of the GGN.

Miani, Roy & Hauberg, "Bayes without Underfitting: Fully Correlated Deep Learning Posteriors
via Alternating Projections" (AISTATS 2025).  With :math:`U` ``(P, R)`` an orthonormal basis
of the range of the stacked Jacobian :math:`J^\top` (the range of the GGN, up to the softmax's
logit shifts, see below) and :math:`P_{ker} = I - UU^\top`, the posterior of a scalar prior α
is

.. math::
    \theta \sim N(\theta_*, \alpha^{-1} P_{ker}),

so every sample leaves the linearised outputs on the training inputs unchanged: the
linearised predictive on the training data is the MAP's.  It is the limit of
:math:`(sJ^\top J + \alpha I)^{-1}` as :math:`s \to \infty` (for regression
:math:`J^\top J = \sigma^2 G`: the Laplace posterior with an infinite curvature scale).  A
layerwise or per-parameter prior :math:`D` gives the same limit,

.. math::
    \Sigma = D^{-1} - D^{-1}U (U^\top D^{-1} U)^{-1} U^\top D^{-1},

the prior :math:`N(0, D^{-1})` conditioned on :math:`U^\top(\theta - \theta_*) = 0`.

**The kernel.**  :math:`\ker G = \bigcap_n \ker(L_n^\top J_n)`.  For a Gaussian or Bernoulli
likelihood :math:`\Lambda_n` is invertible and this is the kernel of the stacked Jacobian J.
For the softmax, :math:`\Lambda_n = \mathrm{diag}(p) - pp^\top` also has the kernel
:math:`\mathbf 1`, so :math:`\ker G` further holds the directions that shift every logit of a
training input by a common amount.  They include the exact symmetries of the softmax (the
output bias and the last layer's rows along :math:`\mathbf 1`), which change no prediction
anywhere; a posterior along them adds nothing to the predictive but a variance along
:math:`\mathbf 1` to every logit, which the probit link, not shift-invariant, reads as
uncertainty (on the digits benchmark it made the in-distribution NLL about 5% worse than the
MAP's).  The
projected posterior therefore uses :math:`\ker J \subseteq \ker G` for every likelihood, as
Miani et al.'s implementation does: every logit on the training inputs stays fixed.  The
rows are :math:`J_n` itself, not :math:`L_n^\top J_n`, so they do not fade as the softmax
saturates: a network that interpolates its training set (where :math:`\Lambda_n \approx 0`
and G, in floating point, constrains almost nothing) keeps its training logits, which is
what keeps the MAP's accuracy and confidence in distribution.

**Which directions count as kernel.**  ``rank=None`` takes every row (``N·C`` rows): it keeps
them while ``N·C <= P`` and takes their SVD, or accumulates the Gram matrix
:math:`J^\top J = \sum_n J_n^\top J_n` ``(P, P)`` once there are more rows than parameters and
takes its ``eigh``; either way the range is spanned by the eigenvectors whose eigenvalue
exceeds ``max(P, N·C)·eps·λ_max`` (the numerical rank).  ``rank=k`` keeps the top-k
eigenvectors of that Gram matrix from a randomised Nyström sketch (one pass, ``2·P·(k+10)``
memory), so that the kernel is the complement of the k most constrained directions.

**Evidence.**  The Laplace evidence diverges in that limit, but only through a term that does
not depend on the prior: with :math:`\log|\Lambda| = \sum_{i \le R}\log(s\lambda_i + \alpha)
+ (P - R)\log\alpha`, the first sum tends to :math:`\sum\log s\lambda_i`.  :meth:`log_det`
returns the rest, the log pseudo-determinant of :math:`\Sigma^+` (``(P - R) log α`` for a
scalar prior, :math:`\log|D| + \log|U^\top D^{-1} U|` otherwise), so the evidence is
:math:`-\ell - \tfrac\alpha2\lVert\theta_*\rVert^2 + \tfrac R2\log\alpha` + const, maximised
at :math:`\alpha = R / \lVert\theta_*\rVert^2` (MacKay's :math:`\gamma/\lVert\theta\rVert^2`
with :math:`\gamma = R` well-determined directions).  Compare evidences of this structure
across α, not with other structures.  For regression the projected posterior does not depend
on σ, and the evidence then gives the maximum-likelihood :math:`\sigma^2 = SSE/(NC)`.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ._common import Prior, PriorKind, check_J, check_V, robust_cholesky, standard_normal

__all__ = ["ProjectedPosterior"]


class ProjectedPosterior:
    r"""Gaussian posterior on the kernel of the Jacobian: :math:`N(\theta_*, \alpha^{-1}P_{ker})`.

    Args:
        mean: θ*, shape ``(P,)``.
        eigenvalues: Eigenvalues of :math:`J^\top J` on its range, shape ``(R,)`` (kept for
            reports; the posterior depends on the range only).
        eigenvectors: U, an orthonormal basis of the range of :math:`J^\top`, shape ``(P, R)``.
        prior: Scalar, layerwise or per-parameter prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``; the projected posterior is its
            s → ∞ limit and does not depend on it (kept for :meth:`with_prior`).

    Example:
        >>> from laplace_ggn.functional import ParamLayout
        >>> from laplace_ggn.posteriors import make_prior
        >>> lay = ParamLayout(("w",), (torch.Size([3]),))
        >>> prior = make_prior(2.0, lay, dtype=torch.float64, device="cpu")
        >>> U = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
        >>> post = ProjectedPosterior(torch.zeros(3, dtype=torch.float64), torch.ones(1), U, prior)
        >>> post.to_dense().diagonal()
        tensor([0.0000, 0.5000, 0.5000], dtype=torch.float64)
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
        """R, the dimension of the range (P - R is the dimension of the support)."""
        return self.eigenvectors.shape[1]

    # -- factorisations ------------------------------------------------------------------------

    @cached_property
    def _dinv(self) -> Tensor:
        return 1.0 / self.prior.diag()

    @cached_property
    def _gram_chol(self) -> Tensor:
        """Cholesky factor of E = Uᵀ D⁻¹ U, shape ``(R, R)`` (non-scalar priors)."""
        U = self.eigenvectors
        E = U.T @ (U * self._dinv.unsqueeze(1))
        return robust_cholesky(E, "projected prior Gram matrix Uᵀ Λ₀⁻¹ U")

    def _sigma_rows(self, X: Tensor) -> Tensor:
        """Σ applied to the rows of ``X`` ``(M, P)`` (Σ is symmetric); shape ``(M, P)``."""
        if self.rank >= self.n_params:  # no kernel: Σ = 0 exactly
            return torch.zeros_like(X)
        U = self.eigenvectors
        if self.prior.is_scalar:
            return (X - (X @ U) @ U.T) / self.prior.precision
        Xd = X * self._dinv
        T = torch.cholesky_solve((Xd @ U).T, self._gram_chol)  # (R, M)
        return Xd - (T.T @ U.T) * self._dinv

    def _root_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`X S` with :math:`SS^\top = \Sigma` (Σ PSD by construction); ``(M, P)``.

        Scalar prior: :math:`S = P_{ker}/\sqrt\alpha`; otherwise :math:`S = \Sigma D^{1/2}`
        (:math:`\Sigma D\Sigma = \Sigma`).

        Returns:
            The rows, shape ``(M, P)``.
        """
        if self.prior.is_scalar:
            return self._sigma_rows(X) * self.prior.precision.sqrt()
        return self._sigma_rows(X) * self.prior.diag().sqrt()

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""Log pseudo-determinant of :math:`\Sigma^+`, the precision on the support; ``()``.

        ``(P - R) log α`` for a scalar prior, :math:`\log|D| + \log|U^\top D^{-1}U|` otherwise:
        log|Λ| of the Laplace precision without its prior-independent divergent part (see the
        module docstring).

        Returns:
            The log pseudo-determinant, shape ``()``.
        """
        if self.prior.is_scalar:
            return (self.n_params - self.rank) * torch.log(self.prior.precision)
        return self.prior.log_det() + 2 * torch.log(torch.diagonal(self._gram_chol)).sum()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._sigma_rows(W.T).T
        return out.squeeze(1) if V.ndim == 1 else out

    def to_dense(self) -> Tensor:
        r"""Σ, shape ``(P, P)`` (O(P²) memory: for tests and small models); singular."""
        eye = torch.eye(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        S = self._root_rows(eye)
        return S @ S.T

    def functional_covariance(self, J: Tensor) -> Tensor:
        r""":math:`J \Sigma J^\top` for Jacobians ``(B, C, P)``, without forming Σ; ``(B, C, C)``.

        Scalar prior: :math:`J_{ker}J_{ker}^\top/\alpha` with :math:`J_{ker} = J - (JU)U^\top`,
        O(B·C·P·R); a Gram matrix, so PSD in floating point too.

        Returns:
            J Σ Jᵀ, shape ``(B, C, C)``.
        """
        check_J(J, self.n_params)
        Bsz, C, P = J.shape
        A = self._root_rows(J.reshape(Bsz * C, P)).reshape(Bsz, C, P)
        return A @ A.transpose(1, 2)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``.

        Scalar prior: :math:`\theta_* + P_{ker} z/\sqrt\alpha`; otherwise
        :math:`\theta_* + \Sigma D^{1/2} z`, whose covariance is :math:`\Sigma D \Sigma = \Sigma`.

        Returns:
            The samples, shape ``(n, P)``.
        """
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        if self.prior.is_scalar:
            return self.mean + self._root_rows(z)
        return self.mean + self._sigma_rows(z * self.prior.diag().sqrt())

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> ProjectedPosterior:
        """A new posterior with another prior; reuses the basis of the range."""
        return ProjectedPosterior(
            self.mean,
            self.eigenvalues,
            self.eigenvectors,
            prior,
            self.scale if scale is None else scale,
        )

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        """For a scalar prior, ``inf`` on the R directions of the range and 0 on the kernel.

        The projected posterior is the limit of an infinite curvature on the range, so with a
        scalar prior λ is ``inf`` there (no variance, a constant log term left out) and 0 on
        the kernel; other priors have no shared basis (``None``).

        Args:
            kind: The prior structure.

        Returns:
            λ, shape ``(P,)``, or ``None``.
        """
        if kind is not PriorKind.SCALAR:
            return None
        lam = self.mean.new_zeros(self.n_params)
        lam[: self.rank] = torch.inf
        return lam

    def state_dict(self) -> dict[str, Tensor]:
        """The basis of the range and its eigenvalues (the prior is stored by the wrapper)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> ProjectedPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["eigenvalues"], state["eigenvectors"], prior, scale)
