r"""Dense posterior: :math:`\Lambda = s\,G + \Lambda_0`, :math:`\Sigma = \Lambda^{-1}`, P×P.

``s = 1/(τσ²)`` is the curvature scale (temperature τ, regression noise σ).  Factorisations
of G are computed lazily and shared by every posterior derived with
:meth:`FullPosterior.with_prior`: with a scalar prior the log determinant needs only the
eigenvalues of G (``eigvalsh``, computed once; each new prior then costs O(P)).  Covariance
products, ``functional_covariance``, ``to_dense`` and samples always use a Cholesky factor of
Λ (several times cheaper than a full ``eigh``), and the log determinant always the
``eigvalsh`` eigenvalues, whatever else has been computed before: the eigendecomposition
:attr:`FullPosterior.eig` (for the kernel decomposition or the user) is never substituted,
so a seeded draw, a covariance or the evidence does not depend on the history of calls.

When Λ is not numerically positive definite — a tiny prior precision against the rounding of
G, e.g. α = 1e-8 in float32 with P ≫ N·C, where G's kernel eigenvalues come out at ±1e-5 —
the Cholesky factorisation is replaced by the eigendecomposition of the whitened curvature,

.. math::
    \Lambda = D^{1/2}\,(s D^{-1/2} G D^{-1/2} + I)\,D^{1/2}, \qquad
    \Sigma = S S^\top, \quad S = D^{-1/2} U (\Lambda_s + I)^{-1/2},

with :math:`U \Lambda_s U^\top` the eigendecomposition of :math:`sD^{-1/2}GD^{-1/2}`, its
rounding-negative eigenvalues set to 0 (a scalar prior uses :attr:`FullPosterior.eig`
directly).  No jitter is added, so the prior is kept exactly; the choice depends only on Λ,
never on the history of calls.  Eigenvalues negative beyond rounding (an indefinite
curvature) are still refused.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ._common import Prior, PriorKind, check_J, check_V, standard_normal
from ._output import KronDenseOutputCovariance, check_head_features

__all__ = ["FullPosterior"]

#: Eigenvalues of sG below ``-_ROUNDING * eps * max|λ|`` are not rounding: G is indefinite.
_ROUNDING = 1e3


class _CholeskyRoot:
    """Σ = L⁻ᵀL⁻¹ from the Cholesky factor L of Λ (its square root S = L⁻ᵀ)."""

    def __init__(self, L: Tensor):
        self.L = L

    def rows(self, X: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.L, X.T, upper=False).T

    def solve(self, W: Tensor) -> Tensor:
        return torch.cholesky_solve(W, self.L)

    def inverse(self) -> Tensor:
        return torch.cholesky_inverse(self.L)

    def draw(self, z: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.L.T, z.T, upper=True).T

    def log_det(self) -> Tensor:
        return 2 * torch.log(torch.diagonal(self.L)).sum()


class _EigenRoot:
    """Σ = S Sᵀ with S = D^{-1/2} U (Λ_s + I)^{-1/2} (see the module docstring)."""

    def __init__(self, S: Tensor, log_det: Tensor):
        self.S, self._log_det = S, log_det

    def rows(self, X: Tensor) -> Tensor:
        return X @ self.S

    def solve(self, W: Tensor) -> Tensor:
        return self.S @ (self.S.T @ W)

    def inverse(self) -> Tensor:
        return self.S @ self.S.T

    def draw(self, z: Tensor) -> Tensor:
        return z @ self.S.T

    def log_det(self) -> Tensor:
        return self._log_det


class FullPosterior:
    r"""Gaussian posterior :math:`N(\theta_*, (sG + \Lambda_0)^{-1})` with a dense GGN.

    Args:
        mean: θ*, shape ``(P,)``.
        ggn: Unit-noise GGN G, shape ``(P, P)``.
        prior: The prior.
        scale: Curvature scale s = 1/(τσ²), shape ``()``.
        eig: Optional precomputed ``(λ, U)`` of G (shared between priors).
    """

    def __init__(
        self,
        mean: Tensor,
        ggn: Tensor,
        prior: Prior,
        scale: Tensor | float = 1.0,
        *,
        eig: tuple[Tensor, Tensor] | None = None,
        _cache: dict | None = None,
    ):
        self.mean = mean
        self.ggn = ggn
        self.prior = prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)
        # factorisations of G, shared (by reference) with every posterior made by with_prior
        self._cache = {} if _cache is None else _cache
        if eig is not None:
            self._cache["eig"] = eig

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    # -- factorisations ------------------------------------------------------------------------

    @property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(P,)`` (clamped at 0) and eigenvectors ``(P, P)`` of G (computed once)."""
        if "eig" not in self._cache:
            lam, U = torch.linalg.eigh(self.ggn)
            self._cache["eig_min"] = lam.min()
            self._cache["eig"] = (lam.clamp_min(0), U)
        return self._cache["eig"]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of G ``(P,)`` from ``eigvalsh``, clamped at 0 (computed once).

        Always from ``eigvalsh``, even when :attr:`eig` is known (the two LAPACK routines can
        differ in the last bits), so that the log determinant does not depend on call history.
        """
        if "eigenvalues" not in self._cache:
            self._cache["eigenvalues"] = torch.linalg.eigvalsh(self.ggn).clamp_min(0)
        return self._cache["eigenvalues"]

    @cached_property
    def _eig_precision(self) -> Tensor:
        """Eigenvalues of Λ = sG + αI (scalar prior only), shape ``(P,)``."""
        return self.scale * self.eigenvalues + self.prior.precision

    def precision(self) -> Tensor:
        r"""Λ = sG + Λ₀, shape ``(P, P)``."""
        return self.scale * self.ggn + torch.diag(self.prior.diag())

    @cached_property
    def _root(self) -> _CholeskyRoot | _EigenRoot:
        """A square root of Σ: Cholesky of Λ, or the whitened eigenbasis if that fails."""
        L, info = torch.linalg.cholesky_ex(self.precision())
        if int(info) == 0:
            return _CholeskyRoot(L)
        d = self.prior.diag()
        if self.prior.is_scalar:
            lam, U = self.eig  # shared by every prior; clamped at 0
            raw = self._cache.get("eig_min", lam.min())  # (given eig: clamped already)
            d_s = self.scale * lam / self.prior.precision + 1
        else:  # whitened: s D^{-1/2} G D^{-1/2} = U diag(λ) Uᵀ
            w = d.rsqrt()
            lam, U = torch.linalg.eigh(self.scale * (w[:, None] * self.ggn * w[None, :]))
            raw, lam = lam.min(), lam.clamp_min(0)
            d_s = lam + 1
        if float(raw) < -_ROUNDING * torch.finfo(lam.dtype).eps * float(lam.abs().max()):
            raise RuntimeError(
                "posterior precision must be positive definite; the curvature has an eigenvalue "
                f"of {float(raw):.3g}, negative beyond rounding (an indefinite curvature). "
                "Increase prior_precision or check the curvature for NaN."
            )
        S = d.rsqrt()[:, None] * U * d_s.rsqrt()
        return _EigenRoot(S, torch.log(d_s).sum() + torch.log(d).sum())

    # -- optional protocol members ------------------------------------------------------------

    def spectrum(self, kind: PriorKind) -> Tensor | None:
        """Eigenvalues of G ``(P,)`` (:attr:`eigenvalues`) for a scalar prior, else ``None``.

        Args:
            kind: The prior structure; only a scalar prior shares the eigenbasis of G.

        Returns:
            λ with log|sG + αI| = Σ log(sλ + α), shape ``(P,)``, or ``None``.
        """
        return self.eigenvalues if kind is PriorKind.SCALAR else None

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(P,)`` and eigenvectors ``(P, P)`` of G (:attr:`eig`).

        Returns:
            ``(λ, U)`` with G = U diag(λ) Uᵀ, λ clamped at 0.
        """
        return self.eig

    # -- Posterior protocol ----------------------------------------------------------------

    def log_det(self) -> Tensor:
        r"""log|Λ| of the precision Λ = sG + Λ₀ (not of Σ), shape ``()``."""
        if self.prior.is_scalar:
            return torch.log(self._eig_precision).sum()  # O(P) once the eigenvalues are known
        return self._root.log_det()

    def to_dense(self) -> Tensor:
        r"""Σ = Λ⁻¹, shape ``(P, P)``."""
        return self._root.inverse()

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V for ``V`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        check_V(V, self.n_params)
        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._root.solve(W)
        return out.squeeze(1) if V.ndim == 1 else out

    def covariance_sqrt_rows(self, X: Tensor) -> Tensor:
        r"""Rows of :math:`XS` for a square root S of Σ (:math:`SS^\top = \Sigma`).

        :math:`S = L^{-\top}` for the Cholesky factor :math:`\Lambda = LL^\top` (or the
        eigenbasis root of the module docstring), so quadratic forms
        :math:`x\Sigma x^\top = \|xS\|^2` computed from it are >= 0 by construction.

        Args:
            X: Rows, shape ``(M, P)``.

        Returns:
            Shape ``(M, P)``.
        """
        return self._root.rows(X)

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians ``(B, C, P)``; returns ``(B, C, C)``."""
        check_J(J, self.n_params)
        B, C, P = J.shape
        W = self.covariance_sqrt_rows(J.reshape(B * C, P)).reshape(B, C, P)
        return W @ W.transpose(1, 2)

    @cached_property
    def _sigma(self) -> Tensor:
        """Σ, shape ``(P, P)``, computed once per posterior (Linear-head products)."""
        return self.to_dense()

    def linear_head_covariance(self, phi: Tensor, index: Tensor) -> KronDenseOutputCovariance:
        r"""J Σ Jᵀ for a Linear head, :math:`J_n = I_C \otimes \tilde\phi_n^\top`, without Jacobians.

        Σ is permuted once into Kronecker order ``(C, D, C, D)``; diagonals cost O(N·C·D²),
        products O(N·P²) with O(N·P) memory (never ``(N, C, P)``).

        Args:
            phi: Features entering the layer with the bias column, shape ``(N, D)``.
            index: Flat positions of ``[W b]`` in Kronecker order, shape ``(C, D)``.

        Returns:
            The factored covariances.

        Raises:
            ValueError: If the shapes do not fit.
        """
        check_head_features(phi, index, self.n_params)
        idx = index.reshape(-1).to(self.mean.device)
        S = self._sigma[idx][:, idx].reshape(*index.shape, *index.shape)
        return KronDenseOutputCovariance(S, phi)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` parameter vectors θ ~ N(θ*, Σ), shape ``(n, P)``."""
        z = standard_normal(
            n, self.n_params, dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        # θ = θ* + S z with S Sᵀ = Σ (S = L⁻ᵀ for Λ = L Lᵀ) has covariance Σ
        return self.mean + self._root.draw(z)

    def with_prior(self, prior: Prior, scale: Tensor | float | None = None) -> FullPosterior:
        """A new posterior with another prior (and curvature scale); no new pass over data."""
        scale = self.scale if scale is None else scale
        return FullPosterior(self.mean, self.ggn, prior, scale, _cache=self._cache)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the curvature part (the prior is stored by the wrapper)."""
        return {"ggn": self.ggn}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], mean: Tensor, prior: Prior, scale: Tensor
    ) -> FullPosterior:
        """Rebuild from :meth:`state_dict`."""
        return cls(mean, state["ggn"], prior, scale)
